"""RL objectives: the K1.5/K2 loss and GRPO (docs/rl.md).

**K2** (Kimi k1.5 §2.3, used unchanged by K2). For a prompt x with K responses y_1..y_K sampled
from the previous policy π_old, rewards r_i and their mean r̄::

    L(θ) = 1/K · Σ_i ( r_i − r̄ − τ · (log π_θ(y_i|x) − log π_old(y_i|x)) )²

with log π(y|x) the sequence log-probability (the sum of the response's token log-probabilities),
averaged over prompts. At θ = θ_old, ∂L/∂log π_θ(y_i|x) = −(2τ/K)(r_i − r̄), so the gradient is
the policy gradient with the group mean as baseline, scaled by 2τ/K.

**GRPO** as TRL's ``GRPOTrainer`` computes it (token-level ratio, clipped): with per-token
ratio ρ_t = exp(log π_θ − log π_old) and the sequence's advantage A::

    ℓ_t = −min(ρ_t · A, clip(ρ_t, 1 − ε_low, 1 + ε_high) · A) + β · KL_t
    KL_t = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1

reduced over the completion tokens by the ``loss_type`` (TRL's names; see :func:`grpo_loss`).
"""

from __future__ import annotations

import torch

from k2.errors import RLError

GRPO_LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")
ADVANTAGE_SCALES = ("group", "batch", "none")
ADVANTAGE_EPS = 1e-4  # added to the reward std, as TRL does


def _as_tensor(name: str, value: torch.Tensor | object, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        tensor = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise RLError(f"{name} must be a tensor or nested list of numbers: {error}") from None
    return tensor.to(like.device) if like is not None else tensor


def k2_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    rewards: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """The K1.5/K2 loss, averaged over prompts.

    Args:
        logp_new: [P, K] sequence log-probabilities log π_θ(y_i|x) of P prompts' K responses
            (with gradients), or [K] for one prompt.
        logp_old: the same under the policy that sampled them (no gradient is taken through it).
        rewards: [P, K] (or [K]) rewards.
        tau: τ > 0, the weight of the log-ratio (the strength of the pull toward π_old).

    Returns:
        A scalar: mean over prompts of ``1/K Σ_i (r_i − r̄ − τ (logp_new_i − logp_old_i))²``.

    Raises:
        RLError: for mismatched shapes, a shape other than [K] or [P, K], or τ <= 0.
    """
    if not tau > 0:
        raise RLError(f"k2_loss: tau must be > 0, got {tau!r}")
    logp_new = _as_tensor("logp_new", logp_new)
    logp_old = _as_tensor("logp_old", logp_old, logp_new)
    rewards = _as_tensor("rewards", rewards, logp_new)
    if logp_new.dim() not in (1, 2) or logp_new.numel() == 0:
        raise RLError(f"k2_loss: logp_new must be [K] or [P, K] and non-empty, got {tuple(logp_new.shape)}")
    for name, tensor in (("logp_old", logp_old), ("rewards", rewards)):
        if tensor.shape != logp_new.shape:
            raise RLError(
                f"k2_loss: {name} has shape {tuple(tensor.shape)}; expected {tuple(logp_new.shape)} like logp_new"
            )
    rewards = rewards.to(logp_new.dtype)
    advantage = rewards - rewards.mean(dim=-1, keepdim=True)
    residual = advantage - tau * (logp_new - logp_old.detach().to(logp_new.dtype))
    return residual.pow(2).mean()


def group_advantages(rewards: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """GRPO's advantages: ``(r − group mean) / (std + 1e-4)`` per prompt, as TRL computes them.

    Args:
        rewards: [P, K], K responses per prompt.
        scale: ``"group"`` (TRL's default: each group's std), ``"batch"`` (the std of all
            rewards) or ``"none"`` (no division). The std is the unbiased one (divides by n − 1);
            a group of one gets advantage 0.

    Returns:
        [P, K].
    """
    rewards = _as_tensor("rewards", rewards)
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise RLError(f"group_advantages: rewards must be [P, K] and non-empty, got {tuple(rewards.shape)}")
    if scale not in ADVANTAGE_SCALES:
        raise RLError(f"group_advantages: scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    rewards = rewards.float() if not rewards.is_floating_point() else rewards
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        if rewards.shape[1] > 1:
            std = rewards.std(dim=1, keepdim=True)
        else:
            std = torch.full_like(rewards[:, :1], float("nan"))
        advantages = advantages / (std + ADVANTAGE_EPS)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.tensor(float("nan"))
        advantages = advantages / (std + ADVANTAGE_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def grpo_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """GRPO's clipped token-level loss, as TRL's ``GRPOTrainer`` defines it (one process, no
    gradient accumulation).

    Args:
        logp_new: [B, T] per-token log-probabilities under π_θ (with gradients), right-padded.
        logp_old: [B, T] the same under the sampling policy.
        advantages: [B] one advantage per completion (:func:`group_advantages`, flattened).
        mask: [B, T] 1 for completion tokens, 0 for padding.
        epsilon: the lower clip ε_low (TRL's default 0.2).
        epsilon_high: the upper clip ε_high (default: ``epsilon``).
        beta: KL weight (TRL's default 0: no reference model).
        ref_logp: [B, T] reference-policy log-probabilities (needed when ``beta`` > 0).
        loss_type: how per-token losses are reduced, by TRL's names:
            ``"dapo"`` (TRL's default) and ``"bnpo"``: sum over all tokens / number of tokens
            (the same thing in one process); ``"grpo"``: each sequence's token mean, then the
            mean over sequences; ``"dr_grpo"``: sum / (B · max_completion_length).
        max_completion_length: the constant of ``"dr_grpo"`` (default: T).

    Returns:
        The scalar loss.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise RLError(f"grpo_loss: loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    logp_new = _as_tensor("logp_new", logp_new)
    if logp_new.dim() != 2:
        raise RLError(f"grpo_loss: logp_new must be [B, T], got {tuple(logp_new.shape)}")
    logp_old = _as_tensor("logp_old", logp_old, logp_new)
    mask = _as_tensor("mask", mask, logp_new).to(logp_new.dtype)
    advantages = _as_tensor("advantages", advantages, logp_new).to(logp_new.dtype)
    for name, tensor in (("logp_old", logp_old), ("mask", mask)):
        if tensor.shape != logp_new.shape:
            raise RLError(f"grpo_loss: {name} has shape {tuple(tensor.shape)}; expected {tuple(logp_new.shape)}")
    if advantages.shape != logp_new.shape[:1]:
        raise RLError(f"grpo_loss: advantages has shape {tuple(advantages.shape)}; expected ({logp_new.shape[0]},)")
    if not 0 <= epsilon < 1 or (epsilon_high is not None and epsilon_high < 0):
        raise RLError(f"grpo_loss: epsilon must be in [0, 1) and epsilon_high >= 0, got {epsilon}, {epsilon_high}")
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp_new - logp_old.detach())
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    advantage = advantages[:, None]
    per_token = -torch.min(ratio * advantage, clipped * advantage)
    if beta != 0.0:
        if ref_logp is None:
            raise RLError("grpo_loss: beta != 0 needs ref_logp")
        ref_logp = _as_tensor("ref_logp", ref_logp, logp_new)
        if ref_logp.shape != logp_new.shape:
            raise RLError(f"grpo_loss: ref_logp has shape {tuple(ref_logp.shape)}; expected {tuple(logp_new.shape)}")
        delta = ref_logp.detach() - logp_new
        per_token = per_token + beta * (torch.exp(delta) - delta - 1)
    per_token = per_token * mask
    if loss_type in ("dapo", "bnpo"):
        return per_token.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        return (per_token.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)).mean()
    length = max_completion_length if max_completion_length is not None else logp_new.shape[1]
    return per_token.sum() / (logp_new.shape[0] * length)
