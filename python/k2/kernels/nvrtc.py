"""Compile k2's ``.cu`` files with NVRTC (through cuda-python) and cache the result.

The cache key is a hash of the source text, the options, the target architecture, the NVRTC
version and k2's version, so any change recompiles; entries are written to a temporary file and
renamed into place, so concurrent processes never read half a file. Compile errors raise
:class:`k2.errors.KernelError` with NVRTC's log, whose line numbers point into the real ``.cu``
file (the source is prefixed with a ``#line`` directive).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from k2.errors import KernelError

KERNEL_SOURCES = ("newton_schulz.cu", "moe_dispatch.cu", "mla_decode.cu", "mla_attention.cu")
"""The kernel files k2 ships, relative to the CUDA source directory."""

_OPTIONS = ("--std=c++17", "-default-device", "--use_fast_math")


def kernels_enabled() -> bool:
    """False when ``K2_KERNELS=0`` asks for the PyTorch references everywhere."""
    return os.environ.get("K2_KERNELS", "1").strip() not in ("0", "false", "off", "no")


def cuda_source_dir() -> Path:
    """Directory holding the ``.cu`` files: ``K2_CUDA_DIR`` if set, else the package's own
    ``k2/kernels/cuda/`` (the repository's top-level ``cuda/`` links to it)."""
    path = Path(os.environ.get("K2_CUDA_DIR") or Path(__file__).resolve().parent / "cuda")
    if not (path / KERNEL_SOURCES[0]).is_file():
        raise KernelError(
            f"cannot find k2's CUDA sources in {path}; set K2_CUDA_DIR to the directory "
            "holding newton_schulz.cu"
        )
    return path


def cuda_include_dirs() -> list[Path]:
    """Directories that provide ``cuda_bf16.h`` and what it includes."""
    dirs: list[Path] = []
    if os.environ.get("K2_CUDA_INCLUDE"):
        dirs.append(Path(os.environ["K2_CUDA_INCLUDE"]))
    for root in map(Path, sys.path):
        nvidia = root / "nvidia"
        if not nvidia.is_dir():
            continue
        # CUDA 13 wheels install into nvidia/cu13/include, CUDA 12 into nvidia/cuda_runtime/include.
        for sub in ("cu13/include", "cuda_runtime/include", "cu12/include"):
            if (nvidia / sub / "cuda_bf16.h").is_file():
                dirs.append(nvidia / sub)
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            dirs.append(Path(os.environ[env]) / "include")
    dirs.append(Path("/usr/local/cuda/include"))
    found = [d for d in dict.fromkeys(dirs) if (d / "cuda_bf16.h").is_file()]
    if not found:
        raise KernelError(
            "cannot find cuda_bf16.h: install the `nvidia-cuda-runtime` wheel (pip install "
            "'k2-train[test]'), or set K2_CUDA_INCLUDE or CUDA_HOME"
        )
    return found


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise KernelError(
            "NVRTC bindings are missing: install `cuda-bindings` and `nvidia-cuda-nvrtc` "
            f"(pip install 'k2-train[test]'): {err}"
        ) from err
    return nvrtc


@lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library that compiles k2's kernels."""
    nvrtc = _nvrtc()
    status, major, minor = nvrtc.nvrtcVersion()
    _check(nvrtc, status, "nvrtcVersion")
    return int(major), int(minor)


def cache_dir() -> Path:
    return Path(os.environ.get("K2_KERNEL_CACHE", Path.home() / ".cache" / "k2" / "kernels"))


def compile_source(name: str, arch: str, *, use_cache: bool = True) -> bytes:
    """Compile ``cuda/<name>`` for ``arch`` (e.g. ``"sm_80"``, ``"sm_90a"``) and return the cubin.

    Args:
        name: a file name from :data:`KERNEL_SOURCES`.
        arch: the real GPU architecture to build for.
        use_cache: read and write the on-disk cache.

    Raises:
        KernelError: naming the file and carrying NVRTC's log, if compilation fails.
    """
    from k2 import __version__

    path = cuda_source_dir() / name
    source = f'#line 1 "{path}"\n' + path.read_text()
    includes = tuple(f"-I{d}" for d in cuda_include_dirs())
    options = (*_OPTIONS, f"--gpu-architecture={arch}", *includes)
    key = hashlib.sha256(
        "\0".join([source, *options, repr(nvrtc_version()), __version__]).encode()
    ).hexdigest()[:32]
    cached = cache_dir() / f"{Path(name).stem}-{arch}-{key}.cubin"
    if use_cache and cached.is_file():
        return cached.read_bytes()
    cubin = _compile(source, str(path), options)
    if use_cache:
        _write_atomically(cached, cubin)
    return cubin


def _compile(source: str, filename: str, options: tuple[str, ...]) -> bytes:
    nvrtc = _nvrtc()
    status, prog = nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], [])
    _check(nvrtc, status, "nvrtcCreateProgram")
    try:
        encoded = [o.encode() for o in options]
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded)
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelError(f"NVRTC failed to compile {filename}:\n{_log(nvrtc, prog)}")
        status, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(nvrtc, status, "nvrtcGetCUBINSize")
        cubin = bytearray(size)
        (status,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        _check(nvrtc, status, "nvrtcGetCUBIN")
        return bytes(cubin)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _log(nvrtc, prog) -> str:
    status, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = bytearray(size)
    nvrtc.nvrtcGetProgramLog(prog, log)
    return log.rstrip(b"\0").decode(errors="replace")


def _check(nvrtc, status, call: str) -> None:
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelError(f"{call} failed: {status}")


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
