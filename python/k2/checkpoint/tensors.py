"""Torch tensors as the raw bytes the native checkpoint code moves, and back.

The writer takes a tensor as ``(name, dtype, shape, buffer)`` where ``buffer`` is a ``uint8``
numpy view of the tensor's own memory (no copy); the reader hands back ``uint8`` numpy arrays
over its memory maps, which :func:`to_torch` reinterprets as the stored dtype (no copy).
"""

from __future__ import annotations

import numpy as np
import torch

from k2.errors import CheckpointError

# safetensors dtype names of the torch dtypes a checkpoint can hold.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}

Entry = tuple[str, str, list[int], np.ndarray]
"""A tensor as the native writer takes it: (name, dtype, shape, uint8 buffer)."""


def host_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a contiguous CPU tensor (copied only when it is not one already)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return tensor.contiguous()


def entry(name: str, tensor: torch.Tensor) -> Entry:
    """The writer's view of ``tensor``: its bytes as a ``uint8`` array sharing its memory.

    Args:
        name: the tensor's name in the checkpoint.
        tensor: any tensor of a dtype in :data:`DTYPE_NAMES`; moved to CPU and made contiguous
            only if it is not already.

    Returns:
        ``(name, dtype_name, shape, buffer)``; keep ``tensor`` alive while the buffer is used.
    """
    if tensor.dtype not in DTYPE_NAMES:
        raise CheckpointError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
    tensor = host_bytes(tensor)
    flat_bytes = tensor.reshape(-1).view(torch.uint8)  # [numel * element_size]
    return (name, DTYPE_NAMES[tensor.dtype], list(tensor.shape), flat_bytes.numpy())


def to_torch(array: np.ndarray, dtype: str, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Reinterpret a ``uint8`` array as a tensor of safetensors dtype ``dtype`` and ``shape``.

    The tensor shares the array's memory (for reader arrays: the checkpoint's memory map).
    """
    flat = torch.from_numpy(array)  # [bytes] uint8
    torch_dtype = TORCH_DTYPES.get(dtype)
    if torch_dtype is None:
        raise CheckpointError(f"checkpoint dtype {dtype} has no torch equivalent")
    if torch_dtype != torch.uint8:
        flat = flat.view(torch_dtype)
    return flat.reshape(shape)
