"""Load compiled kernels with CuPy and launch them on torch's current CUDA stream.

Tensors cross as raw device pointers (``cupy.uint64``), so bf16 data needs no CuPy dtype: the
kernels see ``__nv_bfloat16*``. Scalars are passed with explicit widths (``numpy.int32``,
``numpy.int64``, ``numpy.float32``) matching the kernel signatures.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from k2.errors import KernelError
from k2.kernels.nvrtc import compile_source, kernels_enabled


def _cupy():
    try:
        import cupy
    except ImportError as err:
        raise KernelError(
            "CUDA kernels need CuPy: pip install 'k2-train[cuda]' (any cupy-cudaXXx works), "
            "or set K2_KERNELS=0 to use the PyTorch references"
        ) from err
    return cupy


@lru_cache(maxsize=1)
def cuda_kernels_available() -> bool:
    """True when kernels can run here: a CUDA device, CuPy and NVRTC, and K2_KERNELS not 0."""
    if not kernels_enabled() or not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
        from cuda.bindings import nvrtc  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernel(*tensors: torch.Tensor) -> bool:
    """Whether the CUDA kernel (rather than the reference) should handle these tensors."""
    return all(t.is_cuda for t in tensors) and cuda_kernels_available()


def arch_of(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


@lru_cache(maxsize=None)
def _module(name: str, arch: str, device_index: int):
    cupy = _cupy()
    cubin = compile_source(name, arch)
    with cupy.cuda.Device(device_index):
        # RawModule loads from a path; the cache file may be shared, so write a private copy.
        tmp = Path(tempfile.mkdtemp(prefix="k2-kernel-")) / f"{name}.cubin"
        tmp.write_bytes(cubin)
        return cupy.RawModule(path=str(tmp))


def kernel(name: str, function: str, device: torch.device):
    """The kernel ``function`` of ``cuda/<name>``, compiled for ``device``'s architecture."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _module(name, arch_of(torch.device("cuda", index)), index).get_function(function)


def ptr(t: torch.Tensor | None):
    """A tensor's device pointer as a kernel argument (null for None)."""
    return np.uint64(0 if t is None else t.data_ptr())


def launch(fn, grid, block, args, device: torch.device, shared_mem: int = 0) -> None:
    """Launch ``fn`` on torch's current stream of ``device``."""
    cupy = _cupy()
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
        fn(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem)
