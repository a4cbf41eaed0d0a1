"""Speed tricks that are not model maths: reused CPU work buffers and a cached causal bias.

Nothing here changes a result; each function returns what a plain ``torch.empty`` or mask
construction would, only faster on the machines k2 is developed on. Kept apart from the model's
maths so that a reader of ``mla.py`` / ``loss.py`` can skip it, and so that it can be removed
if the runtime it works around (glibc, torch's CPU allocator) stops needing it.

**Reused buffers.** glibc hands blocks of more than a few MiB back to the system when they are freed, so a
training step that allocates a logits-sized tensor pays a page fault per 4 KiB to get it back
(about 15 ms per 64 MiB on the 2-core VM these figures come from). :func:`reusable_empty`
keeps one buffer per role, shape, dtype and thread (the four most recently used shapes of each
role), and hands it out again once nothing else references its memory. GPU memory is left to the device's caching allocator.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict

import torch

# The number of references to a storage. torch keeps it private; where it is missing nothing
# is pooled (every call allocates), which is slower but never wrong.
_use_count = getattr(torch._C, "_storage_Use_Count", None)


# At most this many shapes are pooled per role and thread (the most recently used): a run whose
# batches change shape every step (right-padded to the longest example) would otherwise keep one
# logits-sized buffer per width it ever saw — gigabytes after a few hundred steps.
_MAX_SHAPES_PER_ROLE = 4


class _Pool(threading.local):
    def __init__(self) -> None:
        self.buffers: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # least recently used first


_POOL = _Pool()


def reusable_empty(role: str, shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """An uninitialized tensor, from this thread's pool when on the CPU.

    The pooled buffer of ``(role, shape, dtype, device)`` is handed out again only when nothing
    but the pool references its memory any more (no tensor, view, saved autograd tensor or numpy
    array: the storage's use count says so), so memory someone still holds is never
    overwritten; otherwise a fresh buffer takes its place.

    Args:
        role: what the buffer is for (buffers of different roles are never shared).
        shape, dtype, device: as for ``torch.empty``.
    """
    if device.type != "cpu" or _use_count is None:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (role, tuple(shape), dtype, device)
    buffers = _POOL.buffers
    buffer = buffers.get(key)
    if buffer is None or not _only_pool_holds(buffer):
        buffer = buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        same_role = [k for k in buffers if k[0] == role]
        for old in same_role[: max(len(same_role) - _MAX_SHAPES_PER_ROLE, 0)]:
            del buffers[old]  # whoever still holds its memory keeps it; the pool lets go
    buffers.move_to_end(key)
    return buffer.view(shape)  # a tensor of its own, so that whoever holds it is counted


def _only_pool_holds(buffer: torch.Tensor) -> bool:
    storage = buffer.untyped_storage()
    return _use_count(storage._cdata) <= 2  # ``buffer`` itself and ``storage`` above


# At most this many (shape, dtype, device) causal biases are kept (one per sequence length in use).
_MAX_CAUSAL_BIASES = 16


@functools.lru_cache(maxsize=_MAX_CAUSAL_BIASES)
def causal_bias(queries: int, keys: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[T, S]: 0 where query t may see key s (s <= t), -inf elsewhere; cached.

    Adding it to a score tensor is cheaper than a broadcast boolean fill of the causal mask. The
    returned tensor is shared: read it, never write it.
    """
    future = torch.ones(queries, keys, dtype=torch.bool, device=device).triu_(1)
    return torch.zeros(queries, keys, dtype=dtype, device=device).masked_fill_(future, float("-inf"))
