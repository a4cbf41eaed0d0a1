"""Rotary position embedding for MLA's rotary slice, with optional YaRN scaling.

Only ``qk_rope_head_dim`` numbers per head are rotated (``q_pe`` and the shared ``k_pe``).
DeepSeek lays them out as interleaved pairs ``(x0, x1), (x2, x3), ...``, each pair rotated by one
frequency (transformers' ``rope_interleave=True``). The rotated result is written de-interleaved
(all first members, then all second members), as transformers does: queries and keys are
permuted alike, so every dot product is unchanged.

Shapes: B batch, T tokens, D = qk_rope_head_dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from k2.model.config import K2Config, yarn_mscale


def rope_frequencies(config: K2Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[D/2]`` and the cos/sin amplitude (YaRN's attention factor).

    Plain RoPE: ``theta^(-2i/D)``. YaRN (arXiv 2309.00071, as DeepSeek-V3 and transformers
    compute it): frequencies that rotate fewer than ``beta_slow`` times over the original context
    are interpolated by ``factor``, those rotating more than ``beta_fast`` times are kept, with a
    linear ramp between.
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0

    factor = float(scaling["factor"])
    original = scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the frequency is extrapolated (kept), 0 where interpolated
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Computes ``(cos, sin)`` for given positions; :func:`apply_rope` applies them."""

    def __init__(self, config: K2Config) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.interleave = config.rope_interleave
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: position_ids [B, T] (int). Returns: cos, sin, each [B, T, D/2] in fp32."""
        angles = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, D/2]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True
) -> torch.Tensor:
    """Rotate the last dimension of ``x`` [B, T, ..., D] by angles given as cos/sin [B, T, D/2].

    With ``interleave`` the pairs are ``(x[2i], x[2i+1])`` (DeepSeek's layout); otherwise
    ``(x[i], x[i + D/2])``. Either way the result is laid out as ``[first members, second members]``.
    """
    extra = x.dim() - cos.dim()
    cos = cos.view(*cos.shape[:2], *([1] * extra), cos.shape[-1]).to(x.dtype)
    sin = sin.view(*sin.shape[:2], *([1] * extra), sin.shape[-1]).to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
