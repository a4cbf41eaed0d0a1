"""Reinforcement learning with verifiable rewards (docs/rl.md).

* :mod:`~k2.rl.rollout` — :class:`RolloutEngine`: batched sampling on the MLA KV cache with
  continuous batching, per-request random streams and per-token log-probabilities and weight
  versions (:mod:`~k2.rl.slots` holds its cache, :mod:`~k2.rl.sampling` its sampler);
* :mod:`~k2.rl.logprobs` — the same log-probabilities from a full forward, with gradients;
* :mod:`~k2.rl.objective` — the K1.5/K2 loss (:func:`k2_loss`) and GRPO (:func:`grpo_loss`);
* :mod:`~k2.rl.tasks` — verifiable-reward tasks (imported on its own: ``import k2.rl.tasks``);
* the RL loop (``k2 rl``, each imported on its own): :mod:`~k2.rl.config` (settings),
  :mod:`~k2.rl.job` (the step on the run harness), :mod:`~k2.rl.loop` (the run),
  :mod:`~k2.rl.episodes` (multi-turn tasks), :mod:`~k2.rl.workers` (rollout processes behind
  the weight broadcast), :mod:`~k2.rl.plots`.
"""

from k2.rl.logprobs import batch_logprobs, pad_logprobs, sequence_logprobs
from k2.rl.objective import grpo_loss, group_advantages, k2_loss
from k2.rl.rollout import Completion, Request, RolloutEngine, RolloutStats
from k2.rl.sampling import request_seed

__all__ = [
    "RolloutEngine",
    "Request",
    "Completion",
    "RolloutStats",
    "request_seed",
    "sequence_logprobs",
    "batch_logprobs",
    "pad_logprobs",
    "k2_loss",
    "grpo_loss",
    "group_advantages",
]
