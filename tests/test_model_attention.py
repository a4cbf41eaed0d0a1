"""MLA: naive vs absorbed, cached decoding, generation, document masking, QK-Clip max logits."""

from __future__ import annotations

import pytest
import torch
from model_helpers import random_model
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

from k2.errors import DataError
from k2.model.mla import build_attention_mask


def ids(batch: int, length: int, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_naive_and_absorbed_mla_agree(q_lora_rank: int | None) -> None:
    model = random_model(q_lora_rank=q_lora_rank).eval()
    attention = model.model.layers[0].self_attn
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(9).expand(2, -1)
    key_valid = torch.ones(2, 9, dtype=torch.bool)
    key_valid[1, :3] = False  # left padding in row 1
    mask = build_attention_mask(positions, key_valid)
    rope = model.model.rotary_emb(positions)
    with torch.no_grad():
        naive = attention(x, rope, mask, absorb=False)
        absorbed = attention(x, rope, mask, absorb=True)
    assert (naive - absorbed).abs().max().item() < 1e-5

    attention.train()
    attention(x, rope, mask, absorb=False)
    from_naive = attention.pop_max_logits()
    attention(x, rope, mask, absorb=True)
    torch.testing.assert_close(attention.pop_max_logits(), from_naive, rtol=1e-5, atol=1e-5)


def test_token_by_token_decoding_reproduces_the_full_forward() -> None:
    model = random_model(q_lora_rank=24).eval()
    tokens = ids(2, 12)
    with torch.no_grad():
        full = model(tokens).logits
        cache = model_cache(model, batch=2, capacity=12)
        prefill = model(tokens[:, :5], cache=cache).logits
        steps = [prefill]
        for t in range(5, 12):
            steps.append(model(tokens[:, t : t + 1], cache=cache).logits)
    assert cache.length == 12
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def model_cache(model, batch: int, capacity: int):  # noqa: ANN001, ANN201
    from k2.model import KVCache

    return KVCache(model.config, batch, capacity)


def test_batched_generation_of_unequal_prompts_equals_generating_each_alone() -> None:
    model = random_model(seed=2, q_lora_rank=24)
    prompts = [[5, 17, 3], [8, 1, 44, 2, 9, 60, 7], [11, 12, 13, 14, 15]]
    together = model.generate(prompts, max_new_tokens=8)
    alone = [model.generate([prompt], max_new_tokens=8)[0] for prompt in prompts]
    assert together == alone
    assert all(len(row) == 8 for row in together)
    # The tensor interface gives the same tokens after the (left-padded) prompt.
    single = model.generate(torch.tensor([prompts[1]]), max_new_tokens=8)
    assert single[0, 7:].tolist() == alone[1]
    # Greedy decoding equals the argmax of a full forward over prompt + continuation.
    sequence = torch.tensor([prompts[1] + alone[1]])
    with torch.no_grad():
        predicted = model(sequence).logits.argmax(-1)[0, 6:-1]
    assert predicted.tolist() == alone[1]


def test_generation_stops_at_stop_tokens_and_samples_reproducibly() -> None:
    model = random_model(seed=4)
    greedy = model.generate([[1, 2, 3]], max_new_tokens=6)[0]
    stop = greedy[2]
    stopped = model.generate([[1, 2, 3]], max_new_tokens=6, stop_tokens=[stop])[0]
    assert stopped == greedy[: greedy.index(stop) + 1]
    # A vanishing nucleus keeps only the most likely token: sampling becomes greedy.
    nucleus = model.generate([[1, 2, 3]], max_new_tokens=6, temperature=1.0, top_p=1e-6)[0]
    assert nucleus == greedy
    first = model.generate([[1, 2, 3]], max_new_tokens=6, temperature=2.0,
                           generator=torch.Generator().manual_seed(7))  # fmt: skip
    again = model.generate([[1, 2, 3]], max_new_tokens=6, temperature=2.0,
                           generator=torch.Generator().manual_seed(7))  # fmt: skip
    assert first == again
    assert model.training  # generate restores the mode it found


def test_packed_documents_get_the_logits_of_their_own_forward() -> None:
    model = random_model(seed=5, q_lora_rank=24).eval()
    lengths = [5, 7, 4]
    documents = [ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(documents, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=positions).logits
        alone = [model(document).logits for document in documents]
        unmasked = model(packed).logits  # one long document: later documents see earlier ones
    for got, expected in zip(logits.split(lengths, dim=1), alone, strict=True):
        assert (got - expected).abs().max().item() < 1e-5
    assert (unmasked[:, 5:] - logits[:, 5:]).abs().max().item() > 1e-3


def reference_max_logits(attention, x: torch.Tensor, positions: torch.Tensor, rotary, allowed) -> torch.Tensor:  # noqa: ANN001
    """Per-head max of q·k·scale over allowed pairs, from the Hub-layout weights and
    transformers' interleaved RoPE."""
    batch, length, _ = x.shape
    heads, nope, rope = attention.num_heads, attention.qk_nope_head_dim, attention.qk_rope_head_dim
    q = (x @ attention.q_proj.weight.T).view(batch, length, heads, nope + rope).transpose(1, 2)
    kv_a = x @ attention.kv_a_proj_with_mqa.weight.T
    c, k_pe = kv_a[..., : attention.kv_lora_rank], kv_a[..., attention.kv_lora_rank :]
    c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6) * attention.kv_a_layernorm.weight
    k_nope = (c @ attention.kv_b_proj.weight.T).view(batch, length, heads, -1)[..., :nope].transpose(1, 2)
    angles = positions[..., None].float() * rotary.inv_freq
    cos = torch.cat((angles, angles), -1).cos() * rotary.attention_factor
    sin = torch.cat((angles, angles), -1).sin() * rotary.attention_factor
    q_pe, k_pe = apply_rotary_pos_emb_interleave(q[..., nope:], k_pe[:, None], cos, sin)
    scores = (q[..., :nope] @ k_nope.transpose(-1, -2) + q_pe @ k_pe.transpose(-1, -2)) * attention.softmax_scale
    return scores.masked_fill(~allowed[:, None], float("-inf")).amax(dim=(0, 2, 3))


def test_training_forward_records_per_head_max_logits_over_allowed_pairs() -> None:
    model = random_model(seed=6)  # q_lora_rank None, YaRN: scale includes mscale²
    model.train()
    tokens = ids(2, 10, seed=3)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]] * 2)
    layer = model.model.layers[1]
    captured = {}
    hook = layer.self_attn.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    model(tokens, position_ids=positions)
    hook.remove()
    document = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    allowed = torch.tril(torch.ones(10, 10, dtype=torch.bool)) & (document[:, None] == document[None, :])
    with torch.no_grad():
        expected = reference_max_logits(layer.self_attn, captured["x"], positions,
                                        model.model.rotary_emb, allowed.expand(2, -1, -1))  # fmt: skip
    recorded = layer.self_attn.max_logits
    assert recorded.dtype == torch.float32 and recorded.shape == (4,)
    torch.testing.assert_close(recorded, expected, rtol=1e-5, atol=1e-5)

    # A running max over the forwards since the last read; reading resets; eval does not record.
    for attention in model.attention_layers():
        attention.pop_max_logits()
    other = ids(1, 6, seed=4)
    model(tokens)
    first = layer.self_attn.pop_max_logits()
    model(other)
    second = layer.self_attn.pop_max_logits()
    model(tokens)
    model(other)
    assert torch.equal(layer.self_attn.pop_max_logits(), torch.maximum(first, second))
    assert layer.self_attn.pop_max_logits() is None
    for attention in model.attention_layers():
        attention.pop_max_logits()
    model.eval()
    model(tokens)
    assert all(attention.max_logits is None for attention in model.attention_layers())


def test_bad_inputs_get_clear_errors() -> None:
    model = random_model()
    with pytest.raises(DataError, match="token id 97 .* vocab_size=97"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(DataError, match="token id -3"):
        model(torch.tensor([[-3, 1]]))
    with pytest.raises(DataError, match="65 tokens is longer than max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(DataError, match="left-padded"):
        model.generate(torch.tensor([[1, 2, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(DataError, match="max_new_tokens=60"):
        model.generate([[1] * 10], max_new_tokens=60)
