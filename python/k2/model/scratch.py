"""Large CPU work buffers reused across training steps instead of faulted in afresh.

glibc hands blocks of more than a few MiB back to the system when they are freed, so a
training step that allocates a logits-sized tensor pays a page fault per 4 KiB to get it back
(about 15 ms per 64 MiB on the 2-core VM these figures come from). :func:`reusable_empty`
keeps one buffer per role, shape, dtype and thread, and hands it out again once nothing else
references its memory. GPU memory is left to the device's caching allocator.
"""

from __future__ import annotations

import threading

import torch

# The number of references to a storage. torch keeps it private; where it is missing nothing
# is pooled (every call allocates), which is slower but never wrong.
_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _Pool(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}


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
    buffer = _POOL.buffers.get(key)
    if buffer is None or not _only_pool_holds(buffer):
        buffer = _POOL.buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer.view(shape)  # a tensor of its own, so that whoever holds it is counted


def _only_pool_holds(buffer: torch.Tensor) -> bool:
    storage = buffer.untyped_storage()
    return _use_count(storage._cdata) <= 2  # ``buffer`` itself and ``storage`` above
