"""Muon's update for hidden matrices and expert stacks (SPEC §4), as plain functions.

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


def momentum_step(grads: list[Tensor], buffers: list[Tensor], *, momentum: float, nesterov: bool,
                  conventions: MuonConventions) -> list[Tensor]:
    """Advance the momentum buffers in place and return the matrices to orthogonalize.

    Args:
        grads: gradients, one per parameter.
        buffers: momentum buffers M, same shapes (updated in place).
        momentum: μ.
        nesterov: use the Nesterov look-ahead (G + μM, or its EMA form) instead of M.
        conventions: sum or EMA momentum.

    Returns:
        One tensor per parameter (new tensors under Nesterov, the buffers themselves otherwise).
    """
    if conventions.momentum == "sum":
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        return torch._foreach_add(grads, buffers, alpha=momentum) if nesterov else buffers
    torch._foreach_lerp_(buffers, grads, 1.0 - momentum)
    return torch._foreach_lerp(grads, buffers, momentum) if nesterov else buffers


def muon_step(params: list[Tensor], updates: list[Tensor], *, lr: float, weight_decay: float,
              conventions: MuonConventions, schedule: NewtonSchulzSchedule, eps: float = 1e-7,
              dtype: torch.dtype | None = None, batch_same_shape: bool = True,
              max_batch_numel: int = 1 << 27) -> None:
    """Orthogonalize the momentum updates and apply them, with decoupled weight decay.

    Args:
        params: parameters, each [m, n] or [E, m, n] (updated in place).
        updates: the matrices from :func:`momentum_step`, same shapes.
        lr: learning rate (weight decay uses it unadjusted).
        weight_decay: decoupled weight decay.
        conventions: the lr factor rule.
        schedule: Newton–Schulz coefficients.
        eps: Newton–Schulz normalization eps.
        dtype: Newton–Schulz precision (None: fp32 on CPU, bf16 on GPU).
        batch_same_shape: orthogonalize all matrices of one shape as one batch; otherwise each
            parameter on its own (an expert stack is still one batch of E).
        max_batch_numel: cap on the numbers in one batch (a bigger parameter forms its own).
    """
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    for batch in _batches(params, batch_same_shape, max_batch_numel):
        m, n = params[batch[0]].shape[-2:]
        U_BMN = torch.cat([updates[i].reshape(-1, m, n) for i in batch]) if len(batch) > 1 \
            else updates[batch[0]].reshape(-1, m, n)
        O_BMN = orthogonalize(U_BMN, schedule, eps=eps, dtype=dtype)
        scale = -lr * conventions.lr_factor(m, n)
        start = 0
        for i in batch:
            count = params[i].numel() // (m * n)
            params[i].add_(O_BMN[start:start + count].view_as(params[i]).to(params[i].dtype), alpha=scale)
            start += count


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
