"""The MLA kernels' block algorithms, emulated in NumPy (k2.kernels.mla_emulation), against the
fp64 references: the split boundaries, tile masks, online softmax and split combine of
cuda/mla_decode.cu, and the document-masked tile loop and max logit of cuda/mla_attention.cu,
judged by the GPU tests' criterion (error at most twice plain torch's in bf16, plus atol)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from k2.kernels import mla_attention as ma
from k2.kernels import mla_decode as md
from k2.kernels.mla_emulation import bf16, decode_split_range, emulate_attention, emulate_decode


def rel_err(y, ref) -> float:
    y, ref = torch.as_tensor(np.asarray(y, dtype=np.float64)), ref.double()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def test_bf16_rounding_matches_torch() -> None:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 100
    x[:4] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, 65504.0])  # ties go to even
    assert torch.equal(torch.from_numpy(bf16(x.numpy())), x.bfloat16().float())


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 40])
def test_decode_splits_partition_every_range(splits) -> None:
    for start, end in [(0, 1), (0, 31), (5, 37), (3, 1000), (100, 133)]:
        covered = []
        for split in range(splits):
            kbeg, kend = decode_split_range(start, end, splits, split)
            if kend > kbeg:
                assert (kbeg - start) % md.KEYS == 0  # splits begin on whole tiles
                covered.extend(range(kbeg, kend))
        assert covered == list(range(start, end))


def decode_case(B, T, H, R, P, S, starts, seed):
    g = torch.Generator().manual_seed(seed)
    ql = torch.randn(B, T, H, R, generator=g).bfloat16()
    qp = torch.randn(B, T, H, P, generator=g).bfloat16()
    c = torch.randn(B, S, R, generator=g).bfloat16()
    kp = torch.randn(B, S, P, generator=g).bfloat16()
    starts = torch.tensor(starts)
    ends = torch.full_like(starts, S)
    return ql, qp, c, kp, starts, ends


DECODE_CASES = [  # (B, T, H, R, P, S, starts, splits)
    (3, 1, 4, 64, 16, 45, [0, 13, 44], 1),         # tiny preset dims, ragged, one split
    (3, 1, 4, 64, 16, 45, [0, 13, 44], 3),         # ... split: the 1-key row has empty splits
    (2, 2, 4, 64, 16, 70, [0, 30], 2),             # two new tokens per sequence
    (2, 1, 64, 512, 64, 300, [0, 171], 5),         # K2 dims: 64 heads, rank 512, rope 64
    (1, 2, 40, 128, 32, 100, [3], 4),              # M = 80 rows: two row groups
]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_emulation_matches_fp64_reference(case) -> None:
    B, T, H, R, P, S, starts, splits = case
    ql, qp, c, kp, starts, ends = decode_case(B, T, H, R, P, S, starts, seed=sum(case[:6]))
    scale = (R // 4) ** -0.5
    ref, ref_lse = md.mla_decode_reference(ql.double(), qp.double(), c.double(), kp.double(), starts, ends, scale)
    torch_bf16, _ = md.mla_decode_reference(ql, qp, c, kp, starts, ends, scale)
    out, lse = emulate_decode(ql.float().numpy(), qp.float().numpy(), c.float().numpy(),
                              kp.float().numpy(), starts.numpy(), ends.numpy(), scale, splits)
    e_emul, e_torch = rel_err(out, ref), rel_err(torch_bf16.float(), ref)
    assert e_emul <= 2 * e_torch + 1e-3, (e_emul, e_torch)
    np.testing.assert_allclose(lse, ref_lse.numpy(), rtol=0, atol=1e-4)


def test_decode_emulation_is_independent_of_the_split_count() -> None:
    ql, qp, c, kp, starts, ends = decode_case(2, 1, 8, 64, 16, 200, [0, 77], seed=9)
    args = (ql.float().numpy(), qp.float().numpy(), c.float().numpy(), kp.float().numpy(),
            starts.numpy(), ends.numpy(), 0.2)
    one, lse_one = emulate_decode(*args, splits=1)
    for splits in (2, 6, 64):
        many, lse_many = emulate_decode(*args, splits=splits)
        np.testing.assert_allclose(many, one, rtol=2e-2, atol=2e-3)  # bf16 output rounding
        np.testing.assert_allclose(lse_many, lse_one, rtol=0, atol=1e-5)


ATTENTION_CASES = [  # (B, H, T, Dk, Dv, document lengths)
    (2, 4, 50, 48, 32, [50]),                      # tiny preset head sizes, one document
    (1, 2, 150, 48, 32, [3, 70, 1, 76]),           # documents crossing 64-key tiles
    (1, 2, 130, 192, 128, [64, 64, 2]),            # K2 head sizes (nope 128 + rope 64, v 128)
]


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_emulation_matches_fp64_reference(case) -> None:
    B, H, T, Dk, Dv, docs = case
    g = torch.Generator().manual_seed(T + Dk)
    q = torch.randn(B, H, T, Dk, generator=g).bfloat16()
    k = torch.randn(B, H, T, Dk, generator=g).bfloat16()
    v = torch.randn(B, H, T, Dv, generator=g).bfloat16()
    positions = torch.cat([torch.arange(n) for n in docs])[None].repeat(B, 1)
    doc_start = ma.doc_starts(positions)
    scale = Dk**-0.5
    ref, ref_max = ma.mla_attention_reference(q.double(), k.double(), v.double(), doc_start, scale)
    torch_bf16, torch_max = ma.mla_attention_reference(q, k, v, doc_start, scale)
    out, max_logits = emulate_attention(q.float().numpy(), k.float().numpy(), v.float().numpy(),
                                        doc_start.numpy(), scale)
    e_emul, e_torch = rel_err(out, ref), rel_err(torch_bf16.float(), ref)
    assert e_emul <= 2 * e_torch + 1e-3, (e_emul, e_torch)
    # Max logits: fp32 dot products of bf16 inputs, as exact as the fp32 reference's.
    max_err = np.abs(max_logits - ref_max.numpy())
    torch_err = (torch_max.double() - ref_max).abs().numpy()
    assert (max_err <= 2 * torch_err + 1e-5 * np.abs(ref_max.numpy())).all(), (max_err, torch_err)
