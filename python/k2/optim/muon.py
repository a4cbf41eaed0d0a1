"""Muon's update for hidden matrices and expert stacks (docs/optim.md), as plain functions.

For a matrix parameter W (m×n) with gradient G, one step is

    M ← μ·M + G                      (momentum, sum form)
    U = G + μ·M  (Nesterov)  or  M
    O = NewtonSchulz(U)              (≈ the orthogonal polar factor of U)
    W ← W − lr·(0.2·sqrt(max(m, n))·O + wd·W)

The factor 0.2·sqrt(max(m, n)) gives the update the RMS of a typical AdamW update, so Muon can
reuse AdamW's learning rate and weight decay (Moonlight, arXiv 2502.16982); weight decay uses the
unadjusted lr. These are the default, Moonlight-style conventions. ``torch.optim.Muon`` differs in
two ways, both available through :class:`MuonConventions`: EMA momentum (M ← μ·M + (1−μ)·G,
U = (1−μ)·G + μ·M) and, by default, the lr factor sqrt(max(1, m/n)) ("original").

A stacked expert tensor [E, m, n] is E matrices, each orthogonalized on its own. Matrices of the
same shape (from any parameters) are orthogonalized together as one batch, which pays on the GPU.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from k2.errors import ConfigError
from k2.optim.newton_schulz import NewtonSchulzSchedule, orthogonalize

LR_ADJUSTMENTS = ("match_rms_adamw", "original", "spectral_unclamped", "none")


@dataclass(frozen=True)
class MuonConventions:
    """The choices on which Muon implementations differ.

    Attributes:
        momentum: ``"sum"`` (M ← μM + G; Moonlight, K2) or ``"ema"`` (M ← μM + (1−μ)G;
            torch.optim.Muon). Newton–Schulz normalizes its input, so the two differ only through
            the norm's eps.
        lr_adjust: the factor on lr for an m×n matrix: ``"match_rms_adamw"`` 0.2·sqrt(max(m, n))
            (Moonlight, K2), ``"original"`` sqrt(max(1, m/n)) (Keller Jordan; torch's default),
            ``"spectral_unclamped"`` sqrt(m/n), or ``"none"`` 1.
    """

    momentum: str = "sum"
    lr_adjust: str = "match_rms_adamw"

    def __post_init__(self) -> None:
        if self.momentum not in ("sum", "ema"):
            raise ConfigError(f"MuonConventions.momentum must be 'sum' or 'ema', got {self.momentum!r}")
        if self.lr_adjust not in LR_ADJUSTMENTS:
            raise ConfigError(f"MuonConventions.lr_adjust must be one of {LR_ADJUSTMENTS}, got {self.lr_adjust!r}")

    def lr_factor(self, m: int, n: int) -> float:
        """The factor on lr for the update of one m×n matrix.

        Args:
            m: rows (fan-out of a Linear weight).
            n: columns (fan-in).

        Returns:
            The factor.
        """
        if self.lr_adjust == "match_rms_adamw":
            return 0.2 * math.sqrt(max(m, n))
        if self.lr_adjust == "original":
            return math.sqrt(max(1.0, m / n))
        if self.lr_adjust == "spectral_unclamped":
            return math.sqrt(m / n)
        return 1.0


MOONLIGHT = MuonConventions()
TORCH_MUON = MuonConventions(momentum="ema", lr_adjust="original")


def momentum_step(grads: list[Tensor], buffers: list[Tensor], *, momentum: float,
                  conventions: MuonConventions) -> None:
    """Advance the momentum buffers in place: M ← μM + G (sum) or M ← μM + (1−μ)G (EMA).

    Args:
        grads: gradients, one per parameter.
        buffers: momentum buffers M, same shapes.
        momentum: μ.
        conventions: sum or EMA momentum.
    """
    if conventions.momentum == "sum":
        for G, M in zip(grads, buffers):
            torch.add(G, M, alpha=momentum, out=M)  # one pass instead of mul_ then add_
    else:
        torch._foreach_lerp_(buffers, grads, 1.0 - momentum)


def muon_step(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], *, lr: float,
              weight_decay: float, momentum: float, nesterov: bool, conventions: MuonConventions,
              schedule: NewtonSchulzSchedule, eps: float = 1e-7, dtype: torch.dtype | None = None,
              batch_same_shape: bool = True, max_batch_numel: int = 1 << 27) -> None:
    """One Muon step: momentum, Newton–Schulz, decoupled weight decay and the scaled update.

    Args:
        params: parameters, each [m, n] or [E, m, n] (updated in place).
        grads: their gradients.
        buffers: their momentum buffers (updated in place).
        lr: learning rate (weight decay uses it unadjusted).
        weight_decay: decoupled weight decay.
        momentum: μ.
        nesterov: orthogonalize the look-ahead G + μM (or its EMA form (1−μ)G + μM) instead of M.
        conventions: momentum form and lr factor rule.
        schedule: Newton–Schulz coefficients.
        eps: Newton–Schulz normalization eps.
        dtype: Newton–Schulz precision (None: fp32 on CPU, bf16 on GPU).
        batch_same_shape: orthogonalize all matrices of one shape as one batch; otherwise each
            parameter on its own (an expert stack is still one batch of E).
        max_batch_numel: cap on the numbers in one batch (a bigger parameter forms its own).
    """
    momentum_step(grads, buffers, momentum=momentum, conventions=conventions)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    for batch in _batches(params, batch_same_shape, max_batch_numel):
        m, n = params[batch[0]].shape[-2:]
        counts = [params[i].numel() // (m * n) for i in batch]
        if len(batch) == 1 and not nesterov:
            U_BMN = buffers[batch[0]].reshape(-1, m, n)
        else:  # gather the matrices to orthogonalize straight into one batch
            U_BMN = grads[batch[0]].new_empty(sum(counts), m, n)
            for i, U_part in zip(batch, U_BMN.split(counts)):
                U_part = U_part.view_as(grads[i])
                if not nesterov:
                    U_part.copy_(buffers[i])
                elif conventions.momentum == "sum":
                    torch.add(grads[i], buffers[i], alpha=momentum, out=U_part)  # G + μM
                else:
                    torch.lerp(grads[i], buffers[i], momentum, out=U_part)  # (1−μ)G + μM
        O_BMN = orthogonalize(U_BMN, schedule, eps=eps, dtype=dtype)
        scale = -lr * conventions.lr_factor(m, n)
        for i, O_part in zip(batch, O_BMN.split(counts)):
            params[i].add_(O_part.view_as(params[i]).to(params[i].dtype), alpha=scale)


def _batches(params: list[Tensor], batch_same_shape: bool, max_batch_numel: int) -> list[list[int]]:
    """Indices of parameters to orthogonalize together: same matrix shape, dtype and device."""
    if not batch_same_shape:
        return [[i] for i in range(len(params))]
    by_key: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        by_key[(tuple(p.shape[-2:]), p.dtype, p.device)].append(i)
    batches = []
    for members in by_key.values():
        current, size = [], 0
        for i in members:
            if current and size + params[i].numel() > max_batch_numel:
                batches.append(current)
                current, size = [], 0
            current.append(i)
            size += params[i].numel()
        batches.append(current)
    return batches
