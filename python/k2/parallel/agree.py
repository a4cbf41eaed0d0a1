"""Agreement across ranks: the few values every rank must see identically.

Under data parallelism each rank sees its own micro-batches, yet some decisions must be the same
everywhere or the replicas drift apart:

* whether a step is skipped because something was not finite (MAX of a flag: one rank's NaN
  skips the step on every rank);
* the max attention logit per head that QK-Clip acts on (MAX, so every rank clips the same
  heads by the same factor);
* the expert loads the router-bias update reads (SUM, so every rank moves the same biases);
* scalar metrics such as the training loss (MEAN).

Each helper is one collective over the given process group (``None``: the default group) and a
no-op when ``torch.distributed`` is not initialized, so single-process code calls them
unconditionally. Collectives run on the GPU for NCCL groups and on the CPU for gloo; results come
back on the CPU. This module is the only place k2's optimizers and loops call ``all_reduce``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def active_group(group: dist.ProcessGroup | None = None) -> dist.ProcessGroup | None:
    """The group to agree over (``group``, else the default one), or None when running alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return group or dist.group.WORLD


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor must live for a collective on ``group``: the current GPU for NCCL, else the
    CPU."""
    group = active_group(group)
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    group = active_group(group)
    if group is None:
        return flag
    t = torch.tensor([float(flag)], device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _reduce(tensors: list[Tensor], op: dist.ReduceOp, group: dist.ProcessGroup | None) -> list[Tensor]:
    """``tensors`` reduced element-wise with ``op`` over ``group`` in one collective, as fp32 on
    the CPU (fp64 when one of them is fp64), in their own shapes."""
    if not tensors:
        return []
    group = active_group(group)
    device = collective_device(group)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.cat([t.detach().reshape(-1).to(device, dtype) for t in tensors])
    if group is not None:
        dist.all_reduce(flat, op=op, group=group)
    flat = flat.cpu()  # one device sync for all of them
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def max_over_ranks(tensors: list[Tensor], group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """Each tensor's element-wise maximum over the ranks (fp32 or fp64, on the CPU)."""
    return _reduce(tensors, dist.ReduceOp.MAX, group)


def sum_over_ranks(tensors: list[Tensor], group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """Each tensor's element-wise sum over the ranks (fp32 or fp64, on the CPU)."""
    return _reduce(tensors, dist.ReduceOp.SUM, group)


def mean_over_ranks(value: Tensor | float, group: dist.ProcessGroup | None = None) -> float:
    """The mean of a scalar over the ranks."""
    value = torch.as_tensor(value)
    value = value.double() if value.dtype == torch.float64 else value.float()
    group = active_group(group)
    if group is None:
        return float(value)
    (total,) = sum_over_ranks([value], group)
    return float(total) / dist.get_world_size(group)
