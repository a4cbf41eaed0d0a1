"""The MLA kernels' PyTorch references (CPU path and GPU oracle) equal the model's own MLA math:
the absorbed decode step of ``MLA._absorbed`` over the rollout engine's slot cache, and the naive
training attention of ``MLA._attend`` with the max logits ``MLA._record_max_logits`` keeps — in
fp64, to rounding. Plus the adapters (cache ranges, document starts) on hand-worked cases."""

from __future__ import annotations

import pytest
import torch
from model_helpers import randomize

from k2.errors import KernelError
from k2.kernels import mla_attention as ma
from k2.kernels import mla_decode as md
from k2.model import K2Config, K2ForCausalLM
from k2.model.mla import MLA, KVCache, build_attention_mask
from k2.model.precision import reduce_dtype
from k2.rl.slots import SlotCache


def tiny_model(seed: int = 0) -> K2ForCausalLM:
    torch.manual_seed(seed)
    return randomize(K2ForCausalLM(K2Config.from_preset("tiny")), seed).double()


# --- adapters ---------------------------------------------------------------------------------

def test_ranges_from_valid_of_hand_written_masks() -> None:
    valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    starts, ends = md.ranges_from_valid(valid)
    assert starts.tolist() == [2, 0, 4] and ends.tolist() == [5, 5, 5]
    assert starts.dtype == ends.dtype == torch.int32
    with pytest.raises(KernelError, match="row 1 .*contiguous"):
        md.ranges_from_valid(torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool))
    with pytest.raises(KernelError, match="row 0 has no valid column"):
        md.ranges_from_valid(torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(KernelError, match="bool"):
        md.ranges_from_valid(torch.ones(2, 3))


def test_decode_mask_of_two_new_tokens() -> None:
    allowed = md.decode_allowed(torch.tensor([1]), torch.tensor([5]), T=2, S=6)
    assert allowed.int().tolist() == [[[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]]]


def test_decode_reference_rejects_bad_ranges_and_shapes() -> None:
    q, qp = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 4)
    c, kp = torch.randn(2, 6, 8), torch.randn(2, 6, 4)
    with pytest.raises(KernelError, match="sequence 1 .*hold the 2 new token"):
        md.mla_decode_reference(q, qp, c, kp, torch.tensor([0, 4]), torch.tensor([6, 5]), 1.0)
    with pytest.raises(KernelError, match="sequence 0 .*6 columns"):
        md.mla_decode_reference(q, qp, c, kp, torch.tensor([0, 0]), torch.tensor([7, 5]), 1.0)
    with pytest.raises(KernelError, match="do not match"):
        md.mla_decode_reference(q, qp, c[:, :, :7], kp, torch.tensor([0, 0]), torch.tensor([6, 6]), 1.0)
    with pytest.raises(KernelError, match="starts/ends"):
        md.mla_decode(q, qp, c, kp, torch.tensor([0]), torch.tensor([6]), 1.0)


def test_doc_starts_follow_the_model_document_rule() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 7, 8], [3, 4, 5, 6, 7, 8, 9, 10]])
    assert ma.doc_starts(positions).tolist() == [[0, 0, 0, 3, 3, 5, 5, 5], [0] * 8]
    mask = build_attention_mask(positions)
    assert torch.equal(ma.allowed_pairs(ma.doc_starts(positions)), mask.allowed)


# --- decode: the reference is MLA._absorbed over the rollout engine's cache -------------------

def test_decode_reference_equals_the_model_over_a_slot_cache(monkeypatch) -> None:
    """A real decode step of the tiny model with three right-aligned slots of different lengths:
    every layer's MLA._absorbed equals absorbed_decode over the slot ranges."""
    model = tiny_model().eval()
    config = model.config
    slots = SlotCache(config, rows=3, capacity=8, dtype=torch.float64, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 11, 2]
    for row, n in enumerate(lengths):
        kv = KVCache(config, 1, n, torch.float64)
        with torch.no_grad():
            model(torch.randint(12, config.vocab_size, (1, n), generator=generator), cache=kv)
        slots.reserve(n)
        slots.place(row, kv, 0, n)

    compared = []
    original = MLA._absorbed

    def checked(self, q_nope, q_pe, c, k_pe, mask):
        out = original(self, q_nope, q_pe, c, k_pe, mask)
        starts, ends = md.ranges_from_valid(mask.allowed[:, 0, -1])
        mine = md.absorbed_decode(q_nope, q_pe, c, k_pe, self.kv_b_proj.weight, starts, ends,
                                  self.softmax_scale)
        compared.append(((mine - out).abs().max().item(), out.abs().max().item(),
                         (ends - starts).tolist()))
        return out

    monkeypatch.setattr(MLA, "_absorbed", checked)
    ids = torch.randint(12, config.vocab_size, (3, 1), generator=generator)
    positions = torch.tensor([[n] for n in lengths])
    with torch.no_grad():
        model(ids, slots.step_mask().long(), positions, cache=slots.kv)
    assert len(compared) == config.num_hidden_layers
    for err, size, spans in compared:
        assert spans == [n + 1 for n in lengths]  # ragged: each row sees its own tokens only
        # MLA._absorbed takes its softmax in fp32 (``.float()``) even for fp64 inputs; the
        # reference stays in fp64, so they agree to fp32 rounding.
        assert size > 1e-3 and err <= 1e-6 * size, (err, size)


@pytest.mark.parametrize("T", [1, 3])
def test_decode_reference_equals_absorbed_path_for_several_new_tokens(T) -> None:
    """T new tokens per sequence behind left-padded, ragged caches (fp64, the tiny dims)."""
    torch.manual_seed(2)
    attention = randomize(MLA(K2Config.from_preset("tiny")), 2).double()
    B, S = 3, 9
    H, N, P, R = attention.num_heads, attention.qk_nope_head_dim, attention.qk_rope_head_dim, attention.kv_lora_rank
    g = torch.Generator().manual_seed(3)
    q_nope, q_pe = (torch.randn(B, T, H, d, generator=g, dtype=torch.float64) for d in (N, P))
    c, k_pe = (torch.randn(B, S, d, generator=g, dtype=torch.float64) for d in (R, P))
    starts = torch.tensor([0, 4, S - T])
    valid = torch.arange(S)[None, :] >= starts[:, None]
    positions = (valid.sum(1, keepdim=True) - T) + torch.arange(T)[None, :]
    mask = build_attention_mask(positions, key_valid=valid, past_length=S - T)
    expected = attention._absorbed(q_nope, q_pe, c, k_pe, mask)
    got = md.absorbed_decode(q_nope, q_pe, c, k_pe, attention.kv_b_proj.weight,
                             *md.ranges_from_valid(valid), attention.softmax_scale)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_decode_reference_log_sum_exp_and_strided_cache() -> None:
    """lse is log Σ exp of the row's allowed scaled scores; a strided cache view gives the same
    result as a contiguous copy."""
    g = torch.Generator().manual_seed(4)
    B, T, H, R, P, S = 2, 1, 3, 16, 8, 7
    ql, qp = torch.randn(B, T, H, R, generator=g, dtype=torch.float64), torch.randn(B, T, H, P, generator=g, dtype=torch.float64)
    store = torch.randn(B, 12, R, generator=g, dtype=torch.float64)
    kp = torch.randn(B, S, P, generator=g, dtype=torch.float64)
    c = store[:, 2 : 2 + S]
    starts, ends = torch.tensor([0, 3]), torch.tensor([7, 6])
    out, lse = md.mla_decode(ql, qp, c, kp, starts, ends, 0.3)
    out2, _ = md.mla_decode(ql, qp, c.contiguous(), kp, starts, ends, 0.3)
    assert torch.equal(out, out2)
    b, h = 1, 2
    keys = torch.cat((c[b, 3:6], kp[b, 3:6]), -1)
    scores = keys @ torch.cat((ql[b, 0, h], qp[b, 0, h])) * 0.3
    assert lse[b, 0, h].item() == pytest.approx(torch.logsumexp(scores, 0).item(), rel=1e-12)
    probs = torch.softmax(scores, 0)
    torch.testing.assert_close(out[b, 0, h], probs @ c[b, 3:6], rtol=1e-12, atol=1e-12)


# --- training attention: the reference is MLA._attend + _record_max_logits --------------------

def test_attention_reference_equals_the_model_training_forward(monkeypatch) -> None:
    """A training forward of the tiny model over packed documents: at every layer the reference
    gives MLA._attend's output and the max logits the layer records for QK-Clip."""
    model = tiny_model(seed=5).train()
    config = model.config
    lengths = [7, 1, 12, 4]
    positions = torch.cat([torch.arange(n) for n in lengths])[None].repeat(2, 1)
    positions[1] = torch.arange(positions.shape[1])  # the second row is one document
    ids = torch.randint(12, config.vocab_size, positions.shape, generator=torch.Generator().manual_seed(6))
    doc_start = ma.doc_starts(positions)

    captured = []
    original = MLA._attend

    def checked(self, q, k, v, mask):
        out = original(self, q, k, v, mask)
        ref, max_logits = ma.mla_attention_reference(q, k, v, doc_start, self.softmax_scale)
        captured.append((self, (ref - out).abs().max().item(), out.abs().max().item(), max_logits))
        return out

    monkeypatch.setattr(MLA, "_attend", checked)
    model(ids, position_ids=positions)
    assert len(captured) == config.num_hidden_layers
    for attention, err, size, max_logits in captured:
        assert size > 1e-3 and err <= 1e-12 * max(1.0, size), (err, size)
        # The layer records its max from scores in the reduction dtype (float64 for this float64
        # model, see docs/model.md "Precision"): equal to the reference up to float64 rounding.
        recorded = attention.pop_max_logits()
        assert recorded.dtype == reduce_dtype(model.lm_head.weight.dtype) == torch.float64
        torch.testing.assert_close(max_logits.to(recorded.dtype), recorded, rtol=1e-12, atol=1e-12)


def test_max_logit_of_a_hand_computed_case() -> None:
    """One head, 3 tokens in two documents [0, 1], [2]: the max is over (0,0), (1,0), (1,1), (2,2)
    only; the larger (2, 1) and (2, 0) scores cross a document boundary."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [4.0, 4.0]], dtype=torch.float64)[None, None]
    k = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.0]], dtype=torch.float64)[None, None]
    v = torch.eye(3, dtype=torch.float64)[None, None, :, :2].contiguous()
    out, max_logits = ma.mla_attention_reference(q, k, v, torch.tensor([[0, 0, 2]]), 0.5)
    assert max_logits.tolist() == [1.0]  # (1, 1): 2 * 0.5 (pair (2, 2) gives 2 * 0.5 too)
    assert out[0, 0, 2].tolist() == [0.0, 0.0]  # token 2 sees only itself (value row [0, 0])
    p = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)
    torch.testing.assert_close(out[0, 0, 1], p)  # token 1 mixes values [1, 0] and [0, 1]


def test_autograd_function_gradients_are_the_reference_gradients() -> None:
    g = torch.Generator().manual_seed(7)
    B, H, T, Dk, Dv = 2, 2, 6, 4, 3
    q, k = (torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    torch.autograd.gradcheck(lambda q, k, v: ma.mla_attention(q, k, v, positions, 0.7)[0], (q, k, v))
    out, max_logits = ma.mla_attention(q, k, v, positions, 0.7)
    assert not max_logits.requires_grad
    ref, ref_max = ma.mla_attention_reference(q, k, v, ma.doc_starts(positions), 0.7)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(max_logits, ref_max)


def test_attention_rejects_mismatched_shapes() -> None:
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(KernelError, match="disagree"):
        ma.mla_attention_forward(q, q[:, :1], q, torch.zeros(1, 5, dtype=torch.long), 1.0)
    with pytest.raises(KernelError, match="doc_start"):
        ma.mla_attention_forward(q, q, q, torch.zeros(1, 4, dtype=torch.long), 1.0)


def test_launch_planning_of_the_decode_kernel() -> None:
    """Splits give about two waves of blocks and never a split shorter than one 32-key tile;
    shared memory follows the kernel's layout; the supported dimensions are the presets'."""
    assert md.choose_splits(batch=64, row_groups=1, keys=4096, sms=132) == 5    # ceil(264 / 64)
    assert md.choose_splits(batch=1, row_groups=1, keys=4096, sms=132) == 64    # capped at 64
    assert md.choose_splits(batch=1, row_groups=1, keys=40, sms=132) == 2       # 2 tiles of keys
    assert md.choose_splits(batch=512, row_groups=2, keys=4096, sms=132) == 1
    # Q tile + two key tiles (bf16, rows padded by 8) + fp32 scores + bf16 P + alpha and l.
    assert md.partial_smem_bytes(512, 64) == (64 * 584 + 2 * 32 * 584) * 2 + 64 * 36 * 4 + 64 * 40 * 2 + 512
    for preset in ("kimi-k2", "small", "tiny"):
        config = K2Config.from_preset(preset)
        q = torch.empty(1, 1, 1, config.kv_lora_rank)
        assert md.supported(q, torch.empty(1, 1, 1, config.qk_rope_head_dim)), preset
        qk = torch.empty(1, 1, 1, config.qk_nope_head_dim + config.qk_rope_head_dim)
        assert ma.supported(qk, torch.empty(1, 1, 1, config.v_head_dim)), preset
    assert not md.supported(torch.empty(1, 1, 1, 96), torch.empty(1, 1, 1, 16))
    assert not ma.supported(torch.empty(1, 1, 1, 256), torch.empty(1, 1, 1, 128))


def test_attention_rejects_doc_starts_that_are_not_documents() -> None:
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(KernelError, match=r"doc_start\[0, 3\] = 0 .*not decrease"):
        ma.mla_attention_forward(q, q, q, torch.tensor([[0, 0, 2, 0]]), 1.0)
    with pytest.raises(KernelError, match=r"doc_start\[0, 1\] = 2"):
        ma.mla_attention_forward(q, q, q, torch.tensor([[0, 2, 2, 2]]), 1.0)
