"""The MLA kernels against their fp64 PyTorch references, on a GPU (skipped without CUDA).

Criterion, as for the other kernels (tests/test_kernels_gpu.py): with
``rel_err(y) = ‖y − y_ref‖_F / ‖y_ref‖_F`` against the reference in fp64, the kernel must satisfy
``rel_err(kernel) <= 2 * rel_err(reference in bf16) + atol``. The shape tables include K2's
real dimensions (64 heads, kv_lora_rank 512, rope 64; q/k heads 192, v heads 128) and ragged
cache ranges; max logits must match the fp64 reference as closely as plain torch's do.
"""

from __future__ import annotations

import pytest
import torch

from k2.kernels import mla_attention as ma
from k2.kernels import mla_decode as md

pytestmark = pytest.mark.gpu

ATOL = 1e-3


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def require_kernels() -> None:
    from k2.kernels.launch import cuda_kernels_available

    if not cuda_kernels_available():
        pytest.fail("a CUDA device is present but the kernels cannot run (CuPy or cuda-python "
                    "missing, or K2_KERNELS=0): install 'k2-train[cuda,test]'")


# --- decode -----------------------------------------------------------------------------------

DECODE_SHAPES = [  # (B, T, H, R, P, S, lengths, layout)
    (1, 1, 4, 64, 16, 17, [17], "left"),                          # tiny preset
    (5, 1, 4, 64, 16, 300, [300, 1, 31, 32, 33], "right"),        # tiny, ragged slots
    (4, 2, 4, 64, 16, 129, [129, 2, 64, 100], "right"),           # two new tokens
    (2, 1, 64, 512, 64, 1, [1, 1], "left"),                       # K2 dims, a single key
    (8, 1, 64, 512, 64, 1000, [1000, 1, 33, 999, 512, 64, 65, 700], "right"),  # K2, ragged
    (3, 2, 64, 512, 64, 4096, [4096, 2, 3000], "left"),           # K2, 128 rows: 2 row groups
    (16, 1, 128, 512, 64, 777, [777 - 40 * i for i in range(16)], "right"),  # 128 heads
    (64, 1, 64, 512, 64, 4096, [4096] * 64, "left"),              # the benchmark's shape
    (2, 1, 8, 128, 32, 513, [513, 250], "left"),                  # the small preset
]


def decode_inputs(B, T, H, R, P, S, lengths, layout, seed=0, capacity_extra=24):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ql = torch.randn(B, T, H, R, generator=g).cuda().bfloat16()
    qp = torch.randn(B, T, H, P, generator=g).cuda().bfloat16()
    # The cache is a view of a larger buffer, as LatentCache / SlotCache hold it.
    c_store = torch.randn(B, S + capacity_extra, R, generator=g).cuda().bfloat16()
    kp_store = torch.randn(B, S + capacity_extra, P, generator=g).cuda().bfloat16()
    lengths = torch.tensor(lengths)
    if layout == "right":  # rollout slots: right-aligned, the newest token in the last column
        starts, ends = S - lengths, torch.full_like(lengths, S)
    else:                  # a per-sequence cache filled from column 0
        starts, ends = torch.zeros_like(lengths), lengths
    # Columns outside a sequence's range hold zeros (they are never read).
    valid = (torch.arange(S)[None, :] >= starts[:, None]) & (torch.arange(S)[None, :] < ends[:, None])
    c_store[:, :S][~valid.cuda()] = 0
    kp_store[:, :S][~valid.cuda()] = 0
    return ql, qp, c_store[:, :S], kp_store[:, :S], starts.cuda(), ends.cuda()


@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: f"B{s[0]}T{s[1]}H{s[2]}R{s[3]}S{s[5]}{s[7]}")
def test_decode_matches_fp64_reference(shape) -> None:
    require_kernels()
    B, T, H, R, P, S, lengths, layout = shape
    ql, qp, c, kp, starts, ends = decode_inputs(*shape, seed=S + H)
    scale = 192 ** -0.5
    ref, ref_lse = md.mla_decode_reference(ql.double(), qp.double(), c.double(), kp.double(), starts, ends, scale)
    torch_bf16, _ = md.mla_decode_reference(ql, qp, c, kp, starts, ends, scale)
    out, lse = md.mla_decode_cuda(ql, qp, c, kp, starts, ends, scale)
    assert out.shape == (B, T, H, R) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    e_kernel, e_torch = rel_err(out, ref), rel_err(torch_bf16, ref)
    assert e_kernel <= 2 * e_torch + ATOL, (e_kernel, e_torch)
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-3
    # The dispatch takes the kernel for these tensors.
    assert torch.equal(md.mla_decode(ql, qp, c, kp, starts, ends, scale)[0], out)


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
def test_decode_any_split_count_gives_the_answer(splits) -> None:
    require_kernels()
    shape = (4, 1, 64, 512, 64, 2000, [2000, 1, 700, 1999], "right")
    ql, qp, c, kp, starts, ends = decode_inputs(*shape, seed=1)
    ref, _ = md.mla_decode_reference(ql.double(), qp.double(), c.double(), kp.double(), starts, ends, 0.1)
    e_torch = rel_err(md.mla_decode_reference(ql, qp, c, kp, starts, ends, 0.1)[0], ref)
    out, _ = md.mla_decode_cuda(ql, qp, c, kp, starts, ends, 0.1, splits=splits)
    assert rel_err(out, ref) <= 2 * e_torch + ATOL


def test_decode_never_reads_outside_the_ranges() -> None:
    """NaN outside every sequence's range changes nothing (tiles past a range are zero-filled)."""
    require_kernels()
    shape = (3, 1, 64, 512, 64, 300, [300, 5, 100], "right")
    ql, qp, c, kp, starts, ends = decode_inputs(*shape, seed=2)
    clean, _ = md.mla_decode_cuda(ql, qp, c, kp, starts, ends, 0.1)
    valid = (torch.arange(300, device="cuda")[None, :] >= starts[:, None]) & \
        (torch.arange(300, device="cuda")[None, :] < ends[:, None])
    c2, kp2 = c.clone(), kp.clone()
    c2[~valid] = float("nan")
    kp2[~valid] = float("nan")
    dirty, _ = md.mla_decode_cuda(ql, qp, c2, kp2, starts, ends, 0.1)
    assert torch.equal(dirty, clean)


def test_absorbed_decode_on_the_gpu_matches_the_cpu_path() -> None:
    require_kernels()
    B, T, H, N, P, R, V, S = 4, 1, 64, 128, 64, 512, 128, 333
    g = torch.Generator().manual_seed(3)
    q_nope = torch.randn(B, T, H, N, generator=g).bfloat16()
    q_pe = torch.randn(B, T, H, P, generator=g).bfloat16()
    c = torch.randn(B, S, R, generator=g).bfloat16()
    kp = torch.randn(B, S, P, generator=g).bfloat16()
    w = (torch.randn(H * (N + V), R, generator=g) * R**-0.5).bfloat16()
    starts, ends = torch.tensor([0, 100, 300, 332]), torch.full((4,), S)
    ref = md.absorbed_decode(q_nope.double(), q_pe.double(), c.double(), kp.double(), w.double(), starts, ends, 0.07)
    cpu = md.absorbed_decode(q_nope, q_pe, c, kp, w, starts, ends, 0.07)
    gpu = md.absorbed_decode(*(t.cuda() for t in (q_nope, q_pe, c, kp, w, starts, ends)), 0.07)
    assert rel_err(gpu.cpu(), ref) <= 2 * rel_err(cpu, ref) + ATOL


# --- training attention with max logits -------------------------------------------------------

ATTENTION_SHAPES = [  # (B, H, T, Dk, Dv, document lengths per row)
    (2, 4, 64, 48, 32, [64]),                      # tiny preset head sizes
    (1, 4, 77, 48, 32, [77]),                      # T not a multiple of the tile
    (2, 4, 1000, 48, 32, [1, 300, 299, 400]),      # tiny, packed documents
    (2, 8, 512, 96, 64, [100, 412]),               # small preset
    (1, 64, 1024, 192, 128, [1024]),               # K2 heads, one document
    (2, 16, 4096, 192, 128, [1000, 3, 1500, 1593]),  # K2 heads, packed, tiles crossing documents
]


def attention_inputs(B, H, T, Dk, Dv, docs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Dk, generator=g).cuda().bfloat16()
    k = torch.randn(B, H, T, Dk, generator=g).cuda().bfloat16()
    # v as the naive path holds it: a [B, T, H, Dv] tensor seen as [B, H, T, Dv] (strided).
    v = torch.randn(B, T, H, Dv, generator=g).cuda().bfloat16().transpose(1, 2)
    positions = torch.cat([torch.arange(n) for n in docs])[None].repeat(B, 1).cuda()
    return q, k, v, ma.doc_starts(positions), positions


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}T{s[2]}Dk{s[3]}")
def test_attention_forward_and_max_logits_match_fp64_reference(shape) -> None:
    require_kernels()
    q, k, v, doc_start, _ = attention_inputs(*shape, seed=sum(shape[:5]))
    scale = shape[3] ** -0.5
    ref, ref_max = ma.mla_attention_reference(q.double(), k.double(), v.double(), doc_start, scale)
    torch_bf16, torch_max = ma.mla_attention_reference(q, k, v, doc_start, scale)
    out, lse, max_logits = ma.mla_attention_cuda(q, k, v, doc_start, scale)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    e_kernel, e_torch = rel_err(out, ref), rel_err(torch_bf16, ref)
    assert e_kernel <= 2 * e_torch + ATOL, (e_kernel, e_torch)
    max_err = (max_logits.double() - ref_max).abs()
    torch_err = (torch_max.double() - ref_max).abs()
    assert (max_err <= 2 * torch_err + 1e-5 * ref_max.abs().clamp_min(1)).all(), (max_err, torch_err)
    # The log-sum-exp the kernel keeps for a fused backward.
    allowed = ma.allowed_pairs(doc_start)
    ref_lse = torch.logsumexp((q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf")), -1)
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-2
    got, got_max = ma.mla_attention_forward(q, k, v, doc_start, scale)  # dispatch takes the kernel
    assert torch.equal(got, out) and torch.equal(got_max, max_logits)


def test_attention_gradients_use_the_reference_math() -> None:
    require_kernels()
    q0, k0, v0, _, positions = attention_inputs(1, 4, 200, 48, 32, [50, 150], seed=4)
    grad = torch.randn(1, 4, 200, 32, device="cuda").bfloat16()

    def grads(q, k, v, fn):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = fn(q, k, v)
        (out * grad.to(out.dtype)).sum().backward()
        return q.grad, k.grad, v.grad

    ds = ma.doc_starts(positions)
    mine = grads(q0, k0, v0, lambda q, k, v: ma.mla_attention(q, k, v, positions, 0.2)[0])
    ref = grads(q0.double(), k0.double(), v0.double(), lambda q, k, v: ma.mla_attention_reference(q, k, v, ds, 0.2)[0])
    low = grads(q0, k0, v0, lambda q, k, v: ma.mla_attention_reference(q, k, v, ds, 0.2)[0])
    for g_mine, g_ref, g_low in zip(mine, ref, low, strict=True):
        assert rel_err(g_mine, g_ref) <= 2 * rel_err(g_low, g_ref) + ATOL
