"""Training: the run harness every training command shares and pretraining on it.

* :mod:`k2.train.harness`    — run directory, records, metrics, checkpoint cadence, exact resume,
  Ctrl-C, progress: :class:`~k2.train.harness.Harness` runs a :class:`~k2.train.harness.Job`;
* :mod:`k2.train.pretrain`   — ``k2 train``: the language-modelling job and :class:`Trainer`;
* :mod:`k2.train.sft`        — ``k2 sft``: the masked-loss job on the same harness (docs/sft.md);
* :mod:`k2.train.config`     — the run's settings (defaults, TOML, flags, validation);
* :mod:`k2.train.optimizers` — MuonClip or the AdamW baseline for a run;
* :mod:`k2.train.schedule`, :mod:`k2.train.baseline`, :mod:`k2.train.metrics`,
  :mod:`k2.train.plots` — the WSD schedule, the n-gram baselines, the metrics log and its plots.

Design: ``docs/training.md``.
"""
