"""MoE: parity with transformers' DeepseekV3MoE, gradients, load statistics, bias balancing."""

from __future__ import annotations

import pytest
import torch
from model_helpers import random_model, randomize, small_config
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from k2.kernels.moe_dispatch import combine, permute, route
from k2.model import MoE
from k2.model.moe import sequence_balance_loss


def reference_moe(moe: MoE, config) -> DeepseekV3MoE:  # noqa: ANN001
    """transformers' MoE block holding the same weights (its experts fuse gate and up)."""
    reference = DeepseekV3MoE(DeepseekV3Config(**config.to_hf_dict()))
    with torch.no_grad():
        reference.gate.weight.copy_(moe.gate.weight)
        reference.gate.e_score_correction_bias.copy_(moe.gate.e_score_correction_bias)
        reference.experts.gate_up_proj.copy_(torch.cat((moe.experts.gate_proj, moe.experts.up_proj), dim=1))
        reference.experts.down_proj.copy_(moe.experts.down_proj)
        reference.shared_experts.load_state_dict(moe.shared_experts.state_dict())
    return reference


@pytest.mark.parametrize("overrides", [{}, {"n_group": 1, "topk_group": 1, "num_experts_per_tok": 2}])
def test_moe_matches_transformers_in_value_and_gradient(overrides: dict) -> None:
    config = small_config(**overrides)
    moe = randomize(MoE(config), seed=1)
    reference = reference_moe(moe, config)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(2))
    ours, theirs = moe(x), reference(x)
    assert (ours - theirs).abs().max().item() < 1e-5
    (ours * x).sum().backward()
    (theirs * x).sum().backward()
    gate_up = reference.experts.gate_up_proj.grad
    torch.testing.assert_close(moe.experts.gate_proj.grad, gate_up[:, :16], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moe.experts.up_proj.grad, gate_up[:, 16:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moe.experts.down_proj.grad, reference.experts.down_proj.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moe.gate.weight.grad, reference.gate.weight.grad, rtol=1e-4, atol=1e-5)


def test_permute_then_combine_is_the_weighted_sum_of_each_tokens_rows() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=generator)
    experts = torch.tensor([[2, 0], [1, 2], [0, 3], [3, 1], [2, 3], [0, 1]])
    weights = torch.rand(6, 2, generator=generator)
    routing = route(experts, num_experts=5)
    x_sorted, order = permute(x, routing), routing.assignment_of_row
    assert routing.tokens_per_expert.tolist() == [3, 3, 3, 3, 0]
    # Rows are grouped by expert, and each row is its token's input.
    assert torch.equal(experts.flatten()[order], torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]))
    assert torch.equal(x_sorted, x[order // 2])
    # "Expert" e multiplies by (e + 1): combine must give sum_k w * (e_k + 1) * x.
    scale = (experts.flatten()[order] + 1).float()[:, None]
    combined = combine(x_sorted * scale, weights, routing)
    expected = ((weights * (experts + 1).float()).sum(-1, keepdim=True)) * x
    torch.testing.assert_close(combined, expected)


def test_every_parameter_gets_a_gradient_and_an_idle_expert_exactly_zero() -> None:
    model = random_model(seed=7, first_k_dense_replace=1).train()
    moe = model.model.layers[1].mlp
    moe.gate.e_score_correction_bias[5] = -100.0  # expert 5 is never chosen
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(tokens, labels=tokens)
    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    load = moe.pop_expert_load()
    assert load[5] == 0 and load.sum() == 2 * 16 * 3
    for stack in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
        assert torch.count_nonzero(stack.grad[5]) == 0
        busy = int(load.argmax())
        assert torch.count_nonzero(stack.grad[busy]) > 0


def test_expert_load_accumulates_in_training_only() -> None:
    model = random_model(seed=8).train()
    moe = model.model.layers[2].mlp
    tokens = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    model(tokens)
    model(tokens[:1])
    load = moe.pop_expert_load()
    assert load.dtype == torch.float32 and load.shape == (8,)
    assert load.sum().item() == (10 + 5) * 3
    assert moe.pop_expert_load() is None
    model.eval()
    model(tokens)
    assert moe.pop_expert_load() is None


def test_update_router_bias_follows_the_formula() -> None:
    moe = MoE(small_config(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=1))
    moe.update_router_bias(torch.tensor([1.0, 2.0, 3.0, 10.0]), rate=0.1)
    # mean load 4: signs (+, +, +, -) -> (0.1, 0.1, 0.1, -0.1), minus their mean 0.05.
    torch.testing.assert_close(moe.gate.e_score_correction_bias, torch.tensor([0.05, 0.05, 0.05, -0.15]))


def test_update_router_bias_moves_a_skewed_router_toward_balance() -> None:
    config = small_config(n_group=1, topk_group=1, num_experts_per_tok=2)
    moe = randomize(MoE(config), seed=9).train()
    direction = torch.ones(32) / 32**0.5
    x = 0.5 * torch.randn(1, 256, 32, generator=torch.Generator().manual_seed(4)) + 2 * direction
    with torch.no_grad():
        moe.gate.weight[:2] = 2 * direction  # experts 0 and 1 take almost every token
        moe.gate.e_score_correction_bias.zero_()

    def imbalance() -> float:
        moe(x)
        load = moe.pop_expert_load()
        return (load.max() / load.mean()).item()

    start = imbalance()
    assert start > 3.0
    for _ in range(60):
        with torch.no_grad():
            moe(x)
        moe.update_router_bias(moe.pop_expert_load(), rate=0.02)
    assert imbalance() < 0.5 * start
    assert abs(moe.gate.e_score_correction_bias.mean().item()) < 1e-6


def test_sequence_balance_loss_hand_computed_and_added_to_the_loss() -> None:
    scores = torch.tensor([[[0.8, 0.2], [0.6, 0.4]]])
    experts = torch.tensor([[[0], [0]]])
    # f = (2 * 2 / (1 * 2), 0) = (2, 0); P = (0.7, 0.3); sum f * P = 1.4
    assert sequence_balance_loss(scores, experts).item() == pytest.approx(1.4)

    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    plain = random_model(seed=10).train()
    weighted = random_model(seed=10, seq_aux_loss_alpha=0.01).train()
    base = plain(tokens, labels=tokens)
    out = weighted(tokens, labels=tokens)
    assert base.aux_loss is None and out.aux_loss.item() > 0
    assert out.loss.item() == pytest.approx(base.loss.item() + out.aux_loss.item(), abs=1e-6)
    out.aux_loss.backward()
    assert weighted.model.layers[2].mlp.gate.weight.grad.abs().sum() > 0


def test_bf16_model_keeps_an_fp32_selection_bias() -> None:
    model = random_model(seed=11).to(torch.bfloat16)
    moe = model.model.layers[2].mlp
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.experts.gate_proj.dtype == torch.bfloat16
    tokens = torch.tensor([[1, 2, 3, 4]])
    out = model(tokens, labels=tokens)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    out.loss.backward()
    assert moe.experts.gate_proj.grad.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_grouped_swiglu_backward_passes_gradcheck() -> None:
    from k2.model.moe import GroupedSwiGLU

    generator = torch.Generator().manual_seed(12)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    x, gate, up, down = leaf(7, 5), leaf(4, 3, 5), leaf(4, 3, 5), leaf(4, 5, 3)
    counts = [2, 0, 4, 1]  # expert 1 idle
    assert torch.autograd.gradcheck(lambda *t: GroupedSwiGLU.apply(*t, counts), (x, gate, up, down))
