"""The MLA kernels' own CUDA source, run on the CPU.

cuda/mla_decode.cu and cuda/mla_attention.cu are compiled with the host C++ compiler against
tests/test_kernels_mla_host.h, which runs every CUDA thread of a block as a fiber and emulates
``__syncthreads``, warp shuffles, ``cp.async`` commit groups (copies land only when a wait retires
them) and ``mma.sync`` m16n8k16 with the PTX ISA's fragment layouts. So the kernels' index
arithmetic — fragment loads, tile masks, split ranges, the double-buffered key pipeline, the
online softmax, the combine, the max logit — is exercised as written, and judged by the GPU
tests' criterion against the fp64 references. What this cannot show: timing, memory-model races
beyond the barrier order one schedule exercises, and the hardware's own mma summation order.
Skipped without a C++ compiler (g++ or c++).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from k2.kernels import mla_attention as ma
from k2.kernels import mla_decode as md
from k2.kernels.nvrtc import cuda_source_dir

HEADER = Path(__file__).resolve().parent / "test_kernels_mla_host.h"
CXX = shutil.which("g++") or shutil.which("c++")

c_ll, c_int, c_float, c_ptr, c_uint = ctypes.c_longlong, ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_uint

WRAPPERS = {
    "mla_decode.cu": """
extern "C" void run_partial(unsigned gx, unsigned gy, unsigned gz, const void* q, long long q_bstride,
    int M, int heads, int T, const void* c, long long c_bstride, long long c_rstride, const void* kpe,
    long long kpe_bstride, long long kpe_rstride, const int* starts, const int* ends, int R, int P,
    float scale, int splits, float* o_part, float* lse_part) {
  typedef const __nv_bfloat16* B;
  k2emu::launch({gx, gy, gz}, 256, [&] {
    mla_decode_partial((B)q, q_bstride, M, heads, T, (B)c, c_bstride, c_rstride, (B)kpe, kpe_bstride,
                       kpe_rstride, starts, ends, R, P, scale, splits, o_part, lse_part);
  });
}
extern "C" void run_combine(unsigned M, unsigned Bn, const float* o_part, const float* lse_part,
    int R, int splits, void* out, float* lse) {
  k2emu::launch({M, Bn, 1}, 128, [&] {
    mla_decode_combine(o_part, lse_part, (int)M, R, splits, (__nv_bfloat16*)out, lse);
  });
}
""",
    "mla_attention.cu": """
extern "C" void run_forward(unsigned gx, unsigned gy, unsigned gz, const void* q, long long q_sb,
    long long q_sh, long long q_st, const void* k, long long k_sb, long long k_sh, long long k_st,
    const void* v, long long v_sb, long long v_sh, long long v_st, const int* doc_start, int H, int T,
    int Dk, int Dv, float scale, void* out, float* lse, float* max_part) {
  typedef const __nv_bfloat16* B;
  k2emu::launch({gx, gy, gz}, 128, [&] {
    mla_attention_forward((B)q, q_sb, q_sh, q_st, (B)k, k_sb, k_sh, k_st, (B)v, v_sb, v_sh, v_st,
                          doc_start, H, T, Dk, Dv, scale, (__nv_bfloat16*)out, lse, max_part);
  });
}
""",
}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The two kernel files built as host shared libraries."""
    if CXX is None:
        pytest.skip("needs a host C++ compiler (g++ or c++)")
    out = tmp_path_factory.mktemp("mla_host")
    libs = {}
    for name, wrapper in WRAPPERS.items():
        src = out / f"{Path(name).stem}.cpp"
        src.write_text(f'#include "{HEADER}"\n#include "{cuda_source_dir() / name}"\n{wrapper}')
        lib = out / f"{Path(name).stem}.so"
        subprocess.run([CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-o", str(lib), str(src)],
                       check=True, capture_output=True, text=True)
        libs[name] = ctypes.CDLL(str(lib))
    return libs


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return c_ptr(t.data_ptr())


def host_decode(lib, ql, qp, c, kp, starts, ends, scale, splits):
    """mla_decode_cuda's launch sequence, on the host library."""
    B, T, H, R = ql.shape
    P = qp.shape[-1]
    M = T * H
    assert md.partial_smem_bytes(R, P) <= 256 * 1024
    q = torch.cat((ql, qp), -1).contiguous()
    starts, ends = starts.to(torch.int32).contiguous(), ends.to(torch.int32).contiguous()
    o_part = torch.empty(B, splits, M, R)
    lse_part = torch.empty(B, splits, M)
    out = torch.empty(B, T, H, R, dtype=torch.bfloat16)
    lse = torch.empty(B, T, H)
    groups = (M + md.ROWS - 1) // md.ROWS
    lib.run_partial(c_uint(splits), c_uint(groups), c_uint(B), ptr(q), c_ll(M * (R + P)), c_int(M),
                    c_int(H), c_int(T), ptr(c), c_ll(c.stride(0)), c_ll(c.stride(1)), ptr(kp),
                    c_ll(kp.stride(0)), c_ll(kp.stride(1)), ptr(starts), ptr(ends), c_int(R), c_int(P),
                    c_float(scale), c_int(splits), ptr(o_part), ptr(lse_part))
    lib.run_combine(c_uint(M), c_uint(B), ptr(o_part), ptr(lse_part), c_int(R), c_int(splits), ptr(out), ptr(lse))
    return out, lse


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def decode_inputs(B, T, H, R, P, S, starts, seed):
    g = torch.Generator().manual_seed(seed)
    ql = torch.randn(B, T, H, R, generator=g).bfloat16()
    qp = torch.randn(B, T, H, P, generator=g).bfloat16()
    c_store = torch.randn(B, S + 8, R, generator=g).bfloat16()  # the cache is a strided view
    kp = torch.randn(B, S, P, generator=g).bfloat16()
    return ql, qp, c_store[:, :S], kp, torch.tensor(starts), torch.full((B,), S)


DECODE_CASES = [  # (B, T, H, R, P, S, starts, splits)
    pytest.param((3, 1, 4, 64, 16, 45, [0, 13, 44], 1), id="tiny-ragged"),
    pytest.param((3, 1, 4, 64, 16, 45, [0, 13, 44], 3), id="tiny-ragged-3splits"),
    pytest.param((2, 2, 4, 64, 16, 70, [0, 30], 2), id="tiny-two-tokens"),
    pytest.param((1, 2, 40, 128, 32, 50, [5], 2), id="two-row-groups"),
    pytest.param((1, 1, 64, 512, 64, 40, [3], 2), id="k2-dims"),
    pytest.param((2, 2, 64, 512, 64, 300, [0, 250], 5), id="k2-dims-two-tokens-5splits"),
    pytest.param((1, 1, 128, 512, 64, 100, [1], 1), id="128-heads"),
]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_kernel_source_matches_fp64_reference(host, case) -> None:
    B, T, H, R, P, S, starts, splits = case
    ql, qp, c, kp, starts, ends = decode_inputs(B, T, H, R, P, S, starts, seed=S + H)
    scale = 0.15
    ref, ref_lse = md.mla_decode_reference(ql.double(), qp.double(), c.double(), kp.double(), starts, ends, scale)
    torch_bf16, _ = md.mla_decode_reference(ql, qp, c, kp, starts, ends, scale)
    out, lse = host_decode(host["mla_decode.cu"], ql, qp, c, kp, starts, ends, scale, splits)
    e_kernel, e_torch = rel_err(out, ref), rel_err(torch_bf16, ref)
    assert e_kernel <= 2 * e_torch + 1e-3, (e_kernel, e_torch)
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-3


def test_decode_kernel_source_never_reads_outside_the_ranges(host) -> None:
    ql, qp, c, kp, starts, ends = decode_inputs(3, 1, 4, 64, 16, 45, [0, 13, 44], seed=1)
    ends = torch.tensor([45, 40, 45])
    clean, _ = host_decode(host["mla_decode.cu"], ql, qp, c, kp, starts, ends, 0.2, 2)
    outside = (torch.arange(45)[None, :] < starts[:, None]) | (torch.arange(45)[None, :] >= ends[:, None])
    c2, kp2 = c.clone(), kp.clone()
    c2[outside], kp2[outside] = float("nan"), float("nan")
    dirty, _ = host_decode(host["mla_decode.cu"], ql, qp, c2, kp2, starts, ends, 0.2, 2)
    assert torch.equal(dirty, clean)


def host_attention(lib, q, k, v, doc_start, scale):
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    ds = doc_start.to(torch.int32).contiguous()
    nqb = (T + ma.QTILE - 1) // ma.QTILE
    out = torch.empty(B, H, T, Dv, dtype=torch.bfloat16)
    lse = torch.empty(B, H, T)
    max_part = torch.empty(B, H, nqb)
    lib.run_forward(c_uint(nqb), c_uint(H), c_uint(B),
                    ptr(q), c_ll(q.stride(0)), c_ll(q.stride(1)), c_ll(q.stride(2)),
                    ptr(k), c_ll(k.stride(0)), c_ll(k.stride(1)), c_ll(k.stride(2)),
                    ptr(v), c_ll(v.stride(0)), c_ll(v.stride(1)), c_ll(v.stride(2)),
                    ptr(ds), c_int(H), c_int(T), c_int(Dk), c_int(Dv), c_float(scale),
                    ptr(out), ptr(lse), ptr(max_part))
    return out, lse, max_part.amax(dim=(0, 2))


ATTENTION_CASES = [  # (B, H, T, Dk, Dv, document lengths)
    pytest.param((2, 2, 70, 48, 32, [3, 40, 27]), id="tiny-docs"),
    pytest.param((1, 1, 80, 192, 128, [70, 10]), id="k2-dims"),
    pytest.param((1, 2, 200, 192, 128, [1, 64, 100, 35]), id="k2-dims-docs-across-tiles"),
]


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_kernel_source_matches_fp64_reference(host, case) -> None:
    B, H, T, Dk, Dv, docs = case
    g = torch.Generator().manual_seed(T + Dk)
    q = torch.randn(B, H, T, Dk, generator=g).bfloat16()
    k = torch.randn(B, H, T, Dk, generator=g).bfloat16()
    v = torch.randn(B, T, H, Dv, generator=g).bfloat16().transpose(1, 2)  # strided, as in the model
    positions = torch.cat([torch.arange(n) for n in docs])[None].repeat(B, 1)
    doc_start = ma.doc_starts(positions)
    scale = Dk**-0.5
    ref, ref_max = ma.mla_attention_reference(q.double(), k.double(), v.double(), doc_start, scale)
    torch_bf16, torch_max = ma.mla_attention_reference(q, k, v, doc_start, scale)
    out, lse, max_logits = host_attention(host["mla_attention.cu"], q, k, v, doc_start, scale)
    e_kernel, e_torch = rel_err(out, ref), rel_err(torch_bf16, ref)
    assert e_kernel <= 2 * e_torch + 1e-3, (e_kernel, e_torch)
    max_err, torch_err = (max_logits.double() - ref_max).abs(), (torch_max.double() - ref_max).abs()
    assert (max_err <= 2 * torch_err + 1e-5 * ref_max.abs().clamp_min(1)).all(), (max_err, torch_err)
    allowed = ma.allowed_pairs(doc_start)
    scores = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    assert (lse.double() - torch.logsumexp(scores, -1)).abs().max().item() <= 1e-3
