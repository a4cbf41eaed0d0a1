"""Pretraining: the learning-rate schedule, the n-gram baselines the model must beat, the metrics
log and its plots. The training loop itself (``k2 train``) lands with issue 9."""
