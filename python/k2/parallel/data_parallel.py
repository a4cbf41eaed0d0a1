"""``parallelize``: spread a model over its ranks, from outside the model.

Today k2 spreads over one dimension, data parallelism: every rank holds the whole model and
``torch.nn.parallel.DistributedDataParallel`` averages the gradients. Sharded data parallelism
(FSDP2) and expert parallelism come next (see ``docs/parallel.md``); each is one more step of
:func:`parallelize` over a ``DeviceMesh`` dimension, leaving the model and the optimizers as they
are. The optimizers keep finding the model's attention and MoE modules through a wrapper
(``module`` / ``_orig_mod`` are looked through), and reach other ranks only through
:mod:`k2.parallel.agree`.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn


def parallelize(model: nn.Module, world: int | None = None) -> nn.Module:
    """The module to train with on this rank: ``model`` itself when running alone, else ``model``
    wrapped for data parallelism (DDP over the default process group).

    Args:
        model: the bare model, already on this rank's device, with identical weights on every
            rank (initialize from the same seed).
        world: the number of ranks (default: the default group's size, or 1 without
            ``torch.distributed``).

    Returns:
        The module whose forward the training step calls. The bare ``model`` stays what
        checkpoints, evaluation and generation use.
    """
    if world is None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)
