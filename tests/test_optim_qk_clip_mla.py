"""QK-Clip and the router-bias update on a real (small) k2 model: MLA heads, MoE layers."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from k2.errors import ConfigError
from k2.model import K2Config, K2ForCausalLM
from k2.optim import MuonClip

HOT_HEADS, COLD_HEADS = [1, 3], [0, 2]


def small_model(q_lora_rank: int | None = 48) -> K2ForCausalLM:
    """Two layers (dense, then MoE), 4 MLA heads, 4 routed experts."""
    config = dataclasses.replace(
        K2Config.from_preset("tiny"), vocab_size=256, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=2, n_routed_experts=4, kv_lora_rank=32,
        q_lora_rank=q_lora_rank, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    torch.manual_seed(0)
    return K2ForCausalLM(config)


def _record(model: K2ForCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer max logits [H] of one training forward, read through the model contract."""
    with torch.no_grad():
        model(ids)
    for moe in model.moe_layers():
        moe.pop_expert_load()
    return [attn.pop_max_logits() for attn in model.attention_layers()]


@pytest.mark.parametrize("q_lora_rank", [48, None])  # queries through q_a/q_b, or one q_proj
def test_clips_two_of_four_mla_heads_exactly(q_lora_rank: int | None) -> None:
    model = small_model(q_lora_rank).train()
    attn = list(model.attention_layers())
    q_name = "q_b_proj" if q_lora_rank else "q_proj"
    with torch.no_grad():  # make heads 1 and 3 hot in every layer: their query rows x 20
        for layer in attn:
            getattr(layer, q_name).weight.view(4, 24, -1)[HOT_HEADS] *= 20.0
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    S_max = _record(model, ids)
    tau = 2 * max(float(s[COLD_HEADS].max()) for s in S_max)
    assert all((s[HOT_HEADS] > tau).all() for s in S_max), "precondition: heads 1, 3 exceed tau"
    before = copy.deepcopy(model.state_dict())

    opt = MuonClip(model, lr=0.0, adamw_lr=0.0, qk_clip_tau=tau)
    model(ids, labels=ids).loss.backward()
    opt.step()

    report = opt.last_report
    assert [(layer.name, layer.clipped_heads, layer.num_heads) for layer in report.layers] == [
        (f"model.layers.{i}.self_attn", 2, 4) for i in range(2)]
    assert report.clipped_heads == 4 and "4 heads clipped" in str(report)
    assert report.max_logit == pytest.approx(max(float(s.max()) for s in S_max), rel=1e-6)
    clipped = set()
    for i, S_max_H in enumerate(S_max):
        prefix = f"model.layers.{i}.self_attn"
        gamma = (tau / S_max_H[HOT_HEADS]).view(2, 1, 1)
        q_old = before[f"{prefix}.{q_name}.weight"].view(4, 24, -1)  # per head: 16 q_nope rows, 8 q_pe rows
        q_new = getattr(attn[i], q_name).weight.detach().view(4, 24, -1)
        torch.testing.assert_close(q_new[HOT_HEADS, :16], q_old[HOT_HEADS, :16] * gamma.sqrt(), rtol=1e-6, atol=0)
        torch.testing.assert_close(q_new[HOT_HEADS, 16:], q_old[HOT_HEADS, 16:] * gamma, rtol=1e-6, atol=0)
        assert torch.equal(q_new[COLD_HEADS], q_old[COLD_HEADS])
        kv_old = before[f"{prefix}.kv_b_proj.weight"].view(4, 32, 32)  # per head: 16 k_nope rows, 16 v rows
        kv_new = attn[i].kv_b_proj.weight.detach().view(4, 32, 32)
        torch.testing.assert_close(kv_new[HOT_HEADS, :16], kv_old[HOT_HEADS, :16] * gamma.sqrt(), rtol=1e-6, atol=0)
        assert torch.equal(kv_new[HOT_HEADS, 16:], kv_old[HOT_HEADS, 16:])  # v rows untouched
        assert torch.equal(kv_new[COLD_HEADS], kv_old[COLD_HEADS])
        clipped |= {f"{prefix}.{q_name}.weight", f"{prefix}.kv_b_proj.weight"}
    for name, value in model.state_dict().items():  # k_pe (kv_a) and everything else: bit-identical
        if name not in clipped and "e_score_correction_bias" not in name:
            assert torch.equal(value, before[name]), name

    # The first layer's input does not depend on the clip: its hot heads now peak at exactly tau.
    after = _record(model, ids)[0]
    torch.testing.assert_close(after[HOT_HEADS], torch.full((2,), tau), rtol=1e-4, atol=0)
    assert torch.equal(after[COLD_HEADS], S_max[0][COLD_HEADS])


def test_router_bias_update_uses_the_step_loads() -> None:
    model = small_model().train()
    opt = MuonClip(model, lr=1e-3, qk_clip_tau=0, router_bias_rate=0.01)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()
    (moe,) = model.moe_layers()
    expected = copy.deepcopy(moe)
    load = moe.expert_load.clone()
    expected.update_router_bias(load, 0.01)
    opt.step()
    assert torch.equal(moe.gate.e_score_correction_bias, expected.gate.e_score_correction_bias)
    (reported,) = opt.last_report.expert_loads  # the step reports the loads it used
    assert torch.equal(reported, load) and reported.sum() == 2 * 12 * model.config.num_experts_per_tok
    assert moe.gate.e_score_correction_bias.abs().sum() > 0
    assert moe.pop_expert_load() is None  # the optimizer consumed this step's loads


def test_qk_clip_without_recording_says_how_to_turn_it_on() -> None:
    model = small_model().train()
    for attn in model.attention_layers():
        attn.record_max_logits = False
    opt = MuonClip(model, lr=1e-3)
    ids = torch.randint(0, 256, (1, 8))
    model(ids, labels=ids).loss.backward()
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.record_max_logits = True"):
        opt.step()
