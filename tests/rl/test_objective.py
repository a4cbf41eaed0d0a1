"""The RL objectives: the K1.5/K2 loss and GRPO, against hand-computed values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from k2.errors import RLError
from k2.rl import Request, RolloutEngine, batch_logprobs, grpo_loss, group_advantages, k2_loss, pad_logprobs


# ---------------------------------------------------------------------------------------- K2
def test_k2_loss_hand_computed():
    # One prompt, K = 3: r̄ = 0.5, advantages (0.5, -0.5, 0), log-ratios (0.5, 0, -1), τ = 0.5:
    # residuals (0.25, -0.5, 0.5) -> (0.0625 + 0.25 + 0.25) / 3 = 0.1875.
    new = torch.tensor([-1.0, -2.0, -3.0])
    old = torch.tensor([-1.5, -2.0, -2.0])
    rewards = torch.tensor([1.0, 0.0, 0.5])
    assert k2_loss(new, old, rewards, 0.5).item() == pytest.approx(0.1875)
    # A second prompt with residuals (1 - 0.2, -1 + 0.2) = (0.8, -0.8): its loss is 0.64, and
    # the batch loss is the mean over the two prompts.
    batch_new = torch.stack([new, torch.tensor([-0.6, -1.4, -1.0])])
    batch_old = torch.stack([old, torch.tensor([-1.0, -1.0, -1.0])])
    batch_rewards = torch.stack([rewards, torch.tensor([1.0, -1.0, 0.0])])
    # prompt 2: r̄ = 0, advantages (1, -1, 0), log-ratios (0.4, -0.4, 0), τ = 0.5 -> residuals (0.8, -0.8, 0)
    expected = (0.1875 + (0.64 + 0.64 + 0.0) / 3) / 2
    assert k2_loss(batch_new, batch_old, batch_rewards, 0.5).item() == pytest.approx(expected)


def test_k2_gradient_at_the_old_policy_is_the_baselined_policy_gradient():
    torch.manual_seed(0)
    prompts, k, tau = 3, 5, 0.3
    old = torch.randn(prompts, k) * 5 - 20
    rewards = torch.randint(0, 2, (prompts, k)).float() + 0.25 * torch.randn(prompts, k)
    new = old.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(k2_loss(new, old, rewards, tau), new)
    expected = -(2 * tau / k) * (rewards - rewards.mean(dim=1, keepdim=True)) / prompts
    torch.testing.assert_close(grad, expected)
    # One prompt: exactly −(2τ/K)(r_i − r̄).
    (grad1,) = torch.autograd.grad(k2_loss(new[0], old[0], rewards[0], tau), new)
    torch.testing.assert_close(grad1[0], -(2 * tau / k) * (rewards[0] - rewards[0].mean()))
    # Away from θ_old the log-ratio term enters: ∂/∂new_i = −(2τ/K)(A_i − τ Δ_i) / P.
    shifted = (old + 0.1).requires_grad_(True)
    (grad2,) = torch.autograd.grad(k2_loss(shifted, old, rewards, tau), shifted)
    advantage = rewards - rewards.mean(dim=1, keepdim=True)
    torch.testing.assert_close(grad2, -(2 * tau / k) * (advantage - tau * 0.1) / prompts)


def test_k2_constant_rewards_give_zero_gradient_at_the_old_policy():
    old = torch.tensor([[-3.0, -7.0, -1.5, -4.0]])
    new = old.clone().requires_grad_(True)
    loss = k2_loss(new, old, torch.full((1, 4), 0.7), tau=1.0)
    (grad,) = torch.autograd.grad(loss, new)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_k2_gradient_through_a_real_model(policy):
    """∇L at θ = θ_old equals −(2τ/K) Σ_i (r_i − r̄) ∇ log π(y_i|x), each ∇ log π computed alone."""
    prompt, k, tau, temperature = [4, 8, 15, 16], 4, 0.5, 0.8
    requests = [Request(prompt, 5, temperature=temperature)] * k
    completions = RolloutEngine(policy, max_batch=k).generate(requests, seed=2)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5])
    params = [p for p in policy.parameters() if p.requires_grad]
    completions_ids = [c.token_ids for c in completions]
    logp_new = torch.stack([x.sum() for x in batch_logprobs(policy, [prompt] * k, completions_ids, temperature)])
    logp_old = torch.tensor([c.logprob for c in completions])
    torch.testing.assert_close(logp_new.detach(), logp_old, atol=1e-4, rtol=0)
    grads = torch.autograd.grad(k2_loss(logp_new, logp_new.detach(), rewards, tau), params, allow_unused=True)
    expected = [torch.zeros_like(p) for p in params]
    for i, tokens in enumerate(completions_ids):
        single = batch_logprobs(policy, [prompt], [tokens], temperature)[0].sum()
        per_param = torch.autograd.grad(single, params, allow_unused=True)
        weight = -(2 * tau / k) * float(rewards[i] - rewards.mean())
        for e, g in zip(expected, per_param):
            if g is not None:
                e += weight * g
    checked = 0
    for got, want in zip(grads, expected):
        if got is None:
            assert torch.count_nonzero(want) == 0
            continue
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
        checked += int(torch.count_nonzero(want) > 0)
    assert checked > 10  # the gradient reaches most of the model


def test_k2_loss_rejects_bad_inputs():
    with pytest.raises(RLError, match="rewards has shape"):
        k2_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(RLError, match="tau"):
        k2_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.0)
    with pytest.raises(RLError, match=r"\[K\] or \[P, K\]"):
        k2_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), 1.0)


# -------------------------------------------------------------------------------------- GRPO
def test_group_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 3.0, 0.0, 0.0]])
    adv = group_advantages(rewards)
    std0 = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-4))
    assert torch.equal(adv[1], torch.zeros(4))  # a constant group teaches nothing
    std2 = math.sqrt((3 * 0.75**2 + 2.25**2) / 3)
    torch.testing.assert_close(adv[2], torch.tensor([-0.75, 2.25, -0.75, -0.75]) / (std2 + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, "none"), rewards - rewards.mean(1, keepdim=True))
    batch_std = float(rewards.std())
    torch.testing.assert_close(
        group_advantages(rewards, "batch"), (rewards - rewards.mean(1, keepdim=True)) / (batch_std + 1e-4)
    )
    assert torch.equal(group_advantages(torch.tensor([[3.0], [1.0]])), torch.zeros(2, 1))
    with pytest.raises(RLError, match="scale"):
        group_advantages(rewards, "token")


def _grpo_case():
    # Two completions of 3 and 2 tokens (the second right-padded).
    logp_old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    log_ratio = torch.tensor([[math.log(1.5), math.log(0.9), math.log(0.7)], [math.log(1.1), math.log(0.5), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages = torch.tensor([2.0, -1.0])
    return logp_old + log_ratio, logp_old, advantages, mask


def test_grpo_loss_hand_computed():
    new, old, advantages, mask = _grpo_case()
    # ε = 0.2, A = +2: ratios 1.5 (clipped to 1.2: min(3, 2.4) = 2.4), 0.9 (1.8), 0.7 (min(1.4, 1.6) = 1.4)
    # A = −1: ratios 1.1 (−1.1), 0.5 (min(−0.5, −0.8) = −0.8)
    per_token = [[-2.4, -1.8, -1.4], [1.1, 0.8]]
    sums = [sum(row) for row in per_token]
    assert grpo_loss(new, old, advantages, mask).item() == pytest.approx(sum(sums) / 5)  # dapo
    assert grpo_loss(new, old, advantages, mask, loss_type="bnpo").item() == pytest.approx(sum(sums) / 5)
    per_sequence = (sums[0] / 3 + sums[1] / 2) / 2
    assert grpo_loss(new, old, advantages, mask, loss_type="grpo").item() == pytest.approx(per_sequence)
    assert grpo_loss(new, old, advantages, mask, loss_type="dr_grpo", max_completion_length=8).item() == pytest.approx(
        sum(sums) / (2 * 8)
    )
    # ε_high = 0.6 lets the 1.5 ratio through: min(3, 3.2) = 3.
    high = grpo_loss(new, old, advantages, mask, epsilon_high=0.6, loss_type="grpo").item()
    assert high == pytest.approx(((-3 - 1.8 - 1.4) / 3 + sums[1] / 2) / 2)


def test_grpo_kl_term_hand_computed():
    new, old, advantages, mask = _grpo_case()
    ref = new.detach() + torch.tensor([[0.3, 0.0, -0.2], [0.1, 0.0, 5.0]])
    kl = [[math.exp(d) - d - 1 for d in row] for row in ([0.3, 0.0, -0.2], [0.1, 0.0])]
    per_token = [[-2.4, -1.8, -1.4], [1.1, 0.8]]
    total = sum(sum(p + 0.04 * q for p, q in zip(pr, kr)) for pr, kr in zip(per_token, kl))
    assert grpo_loss(new, old, advantages, mask, beta=0.04, ref_logp=ref).item() == pytest.approx(total / 5)
    with pytest.raises(RLError, match="ref_logp"):
        grpo_loss(new, old, advantages, mask, beta=0.04)


def test_grpo_gradient_at_the_old_policy():
    # At θ = θ_old every ratio is 1 (inside the clip): ∂loss/∂logp_t = −A / (tokens) for dapo.
    _, old, advantages, mask = _grpo_case()
    new = old.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(grpo_loss(new, old, advantages, mask), new)
    torch.testing.assert_close(grad, -advantages[:, None] * mask / mask.sum())
    # A clipped token gets no gradient: ratio 1.5 with A > 0 is past 1 + ε.
    new_c, *_ = _grpo_case()
    new_c = new_c.clone().requires_grad_(True)
    (grad_c,) = torch.autograd.grad(grpo_loss(new_c, old, advantages, mask), new_c)
    assert grad_c[0, 0] == 0 and grad_c[0, 1] != 0 and grad_c[1, 1] == 0 and grad_c[1, 2] == 0


def test_grpo_rejects_bad_inputs():
    new, old, advantages, mask = _grpo_case()
    with pytest.raises(RLError, match="loss_type"):
        grpo_loss(new, old, advantages, mask, loss_type="ppo")
    with pytest.raises(RLError, match="advantages has shape"):
        grpo_loss(new, old, advantages[:1], mask)
    with pytest.raises(RLError, match="mask has shape"):
        grpo_loss(new, old, advantages, mask[:, :2])


def test_pad_logprobs_layout():
    padded, mask = pad_logprobs([torch.tensor([-1.0, -2.0]), [-3.0], torch.tensor([-4.0, -5.0, -6.0])])
    assert torch.equal(padded, torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0], [-4.0, -5.0, -6.0]]))
    assert torch.equal(mask, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
