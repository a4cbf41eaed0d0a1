"""Every CUDA kernel compiles with NVRTC on the CPU (no GPU needed), for Ampere and Hopper."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2.errors import KernelError
from k2.kernels import nvrtc
from k2.kernels.nvrtc import KERNEL_SOURCES, compile_source, cuda_source_dir

REPO_CUDA = Path(__file__).resolve().parents[1] / "cuda"


def test_every_cu_file_is_listed() -> None:
    """A new .cu file cannot slip past the compile check."""
    on_disk = sorted(p.name for p in cuda_source_dir().glob("*.cu"))
    assert on_disk == sorted(KERNEL_SOURCES)
    assert sorted(p.name for p in REPO_CUDA.glob("*.cu")) == on_disk


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("name", KERNEL_SOURCES)
def test_kernel_compiles(name: str, arch: str) -> None:
    cubin = compile_source(name, arch, use_cache=False)
    assert cubin[:4] == b"\x7fELF", "NVRTC must return a cubin (an ELF image)"


def test_cubin_holds_every_entry_point() -> None:
    source = (cuda_source_dir() / "moe_dispatch.cu").read_text()
    cubin = compile_source("moe_dispatch.cu", "sm_80", use_cache=False)
    names = [line.split("(")[0].split()[-1] for line in source.splitlines()
             if line.startswith('extern "C" __global__')]
    assert len(names) >= 8
    for name in names:
        assert name.encode() in cubin, name


def test_compile_error_names_file_and_line(tmp_path, monkeypatch) -> None:
    for name in KERNEL_SOURCES:
        (tmp_path / name).write_text((cuda_source_dir() / name).read_text())
    broken = (tmp_path / "moe_dispatch.cu").read_text().replace(
        "constexpr int CHUNK = 256;", "constexpr int CHUNK = 256;\nthis is not C++;", 1)
    (tmp_path / "moe_dispatch.cu").write_text(broken)
    monkeypatch.setenv("K2_CUDA_DIR", str(tmp_path))
    with pytest.raises(KernelError) as info:
        compile_source("moe_dispatch.cu", "sm_80", use_cache=False)
    message = str(info.value)
    line = next(i for i, text in enumerate(broken.splitlines(), 1)
                if text.startswith("this is not C++;"))
    assert f"{tmp_path / 'moe_dispatch.cu'}({line})" in message


def test_cache_is_reused_and_keyed_by_source(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("K2_KERNEL_CACHE", str(tmp_path / "cache"))
    first = compile_source("newton_schulz.cu", "sm_80")
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].read_bytes() == first

    # A cached entry is returned as is: prove it by planting a marker in it.
    entries[0].write_bytes(b"marker")
    assert compile_source("newton_schulz.cu", "sm_80") == b"marker"

    # A different architecture, or changed source, is a different entry.
    compile_source("newton_schulz.cu", "sm_90a")
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    for name in KERNEL_SOURCES:
        text = (cuda_source_dir() / name).read_text()
        (src_dir / name).write_text(text + "\n// changed\n")
    monkeypatch.setenv("K2_CUDA_DIR", str(src_dir))
    assert compile_source("newton_schulz.cu", "sm_80")[:4] == b"\x7fELF"
    assert len(list((tmp_path / "cache").glob("*.cubin"))) == 3
    assert not list((tmp_path / "cache").glob(".*")), "no temporary file may be left behind"


def test_missing_source_dir_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("K2_CUDA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(KernelError, match="K2_CUDA_DIR"):
        compile_source("newton_schulz.cu", "sm_80")


def test_kernels_switch(monkeypatch) -> None:
    monkeypatch.setenv("K2_KERNELS", "0")
    assert not nvrtc.kernels_enabled()
    monkeypatch.setenv("K2_KERNELS", "1")
    assert nvrtc.kernels_enabled()


# --- MLA kernels (issue 24): entry points, registers and shared memory -------------------------

MLA_ENTRY_POINTS = {
    "mla_decode.cu": ("mla_decode_partial", "mla_decode_combine"),
    "mla_attention.cu": ("mla_attention_forward",),
}


def _ptxas_report(name: str, arch: str) -> str:
    """NVRTC's log of compiling cuda/<name> with ptxas' verbose resource report."""
    from k2.kernels.nvrtc import _OPTIONS, _log, _nvrtc, cuda_include_dirs

    lib = _nvrtc()
    source = (cuda_source_dir() / name).read_text()
    options = [*_OPTIONS, f"--gpu-architecture={arch}", *(f"-I{d}" for d in cuda_include_dirs()),
               "--ptxas-options=-v"]
    status, prog = lib.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    try:
        (status,) = lib.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
        assert status == lib.nvrtcResult.NVRTC_SUCCESS, _log(lib, prog)
        return _log(lib, prog)
    finally:
        lib.nvrtcDestroyProgram(prog)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("name", sorted(MLA_ENTRY_POINTS))
def test_mla_kernels_keep_their_accumulators_in_registers(name: str, arch: str) -> None:
    """Every MLA entry point is in the cubin, and ptxas spills nothing: the decode kernel's
    64 x R output tile and the attention kernel's query fragments live in registers by design
    (docs/kernels.md, "MLA"); a spill would mean the tiling no longer fits."""
    cubin = compile_source(name, arch, use_cache=False)
    for entry in MLA_ENTRY_POINTS[name]:
        assert entry.encode() in cubin, entry
    report = _ptxas_report(name, arch)
    functions = report.count("Compiling entry function")
    assert functions == len(MLA_ENTRY_POINTS[name]), report
    assert report.count("0 bytes spill stores, 0 bytes spill loads") == functions, report
    assert "bytes stack frame" in report


def test_mla_shared_memory_fits_ampere_and_hopper() -> None:
    """The decode kernel's dynamic shared memory at K2's dims (R 512, P 64) fits the sm_80 opt-in
    limit (163 KiB; Hopper allows 227 KiB); the attention kernel's static tile fits 48 KiB."""
    from k2.kernels.mla_decode import partial_smem_bytes

    assert partial_smem_bytes(512, 64) <= 163 * 1024
    assert partial_smem_bytes(64, 16) < partial_smem_bytes(512, 64)
    report = _ptxas_report("mla_attention.cu", "sm_80")
    smem = [int(part.split()[0]) for line in report.splitlines() if "bytes smem" in line
            for part in line.split(",") if "bytes smem" in part]
    assert smem and max(smem) <= 48 * 1024, report
