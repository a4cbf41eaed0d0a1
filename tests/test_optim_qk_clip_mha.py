"""QK-Clip on plain multi-head (and grouped-query) attention registered with register_qk_clip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from k2.errors import ConfigError
from k2.optim import MuonClip, register_qk_clip


class Attention(nn.Module):
    """Causal attention with biased projections that records each head's max logit."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 4) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim)
        self.o_proj = nn.Linear(heads * self.head_dim, dim)
        self.max_logits: torch.Tensor | None = None

    def pop_max_logits(self) -> torch.Tensor | None:
        value, self.max_logits = self.max_logits, None
        return value

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-softmax logits [B, H, T, T], -inf where the causal mask forbids."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        return scores.masked_fill(~causal, float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        scores = self.logits(x)
        if self.training:
            per_head = scores.detach().amax(dim=(0, 2, 3))
            self.max_logits = per_head if self.max_logits is None else torch.maximum(self.max_logits, per_head)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_clips_only_heads_above_tau(kv_heads: int) -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.attn = Attention(kv_heads=kv_heads)
    register_qk_clip(model.attn, num_heads=4, head_dim=8, num_kv_heads=kv_heads)
    with torch.no_grad():  # make heads 0 and 2 hot
        model.attn.q_proj.weight.view(4, 8, 32)[[0, 2]] *= 40.0
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        S_max = model.attn.logits(x).amax(dim=(0, 2, 3))
    tau = float(S_max[[1, 3]].max() * 2)
    assert (S_max[[0, 2]] > tau).all(), "precondition: heads 0 and 2 exceed tau"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    opt = MuonClip(model, lr=0.0, adamw_lr=0.0, qk_clip_tau=tau)
    model.attn(x).square().mean().backward()
    opt.step()

    gamma = tau / S_max[[0, 2]]
    q_factor = gamma if kv_heads < 4 else gamma.sqrt()  # grouped keys are shared: q takes all of γ
    W_q, b_q = model.attn.q_proj.weight.view(4, 8, 32), model.attn.q_proj.bias.view(4, 8)
    torch.testing.assert_close(W_q[[0, 2]], before["attn.q_proj.weight"].view(4, 8, 32)[[0, 2]]
                               * q_factor.view(2, 1, 1), rtol=1e-6, atol=0)
    torch.testing.assert_close(b_q[[0, 2]], before["attn.q_proj.bias"].view(4, 8)[[0, 2]] * q_factor.view(2, 1),
                               rtol=1e-6, atol=0)
    assert torch.equal(W_q[[1, 3]], before["attn.q_proj.weight"].view(4, 8, 32)[[1, 3]])
    assert torch.equal(b_q[[1, 3]], before["attn.q_proj.bias"].view(4, 8)[[1, 3]])
    if kv_heads == 4:
        W_k = model.attn.k_proj.weight.view(4, 8, 32)
        torch.testing.assert_close(W_k[[0, 2]], before["attn.k_proj.weight"].view(4, 8, 32)[[0, 2]]
                                   * gamma.sqrt().view(2, 1, 1), rtol=1e-6, atol=0)
        assert torch.equal(W_k[[1, 3]], before["attn.k_proj.weight"].view(4, 8, 32)[[1, 3]])
    else:
        assert torch.equal(model.attn.k_proj.weight, before["attn.k_proj.weight"])
    for name in ("attn.v_proj.weight", "attn.o_proj.weight"):
        assert torch.equal(dict(model.named_parameters())[name], before[name]), name

    with torch.no_grad():
        after = model.attn.logits(x).amax(dim=(0, 2, 3))
    torch.testing.assert_close(after[[0, 2]], torch.full((2,), tau), rtol=1e-4, atol=0)
    assert torch.equal(after[[1, 3]], S_max[[1, 3]])
    (layer,) = opt.last_report.layers
    assert (layer.name, layer.clipped_heads, layer.num_heads) == ("attn", 2, 4)
    assert layer.max_logit == pytest.approx(float(S_max.max()), rel=1e-6)


def test_missing_max_logits_and_bad_registration_are_config_errors() -> None:
    model = nn.Module()
    model.attn = Attention()
    register_qk_clip(model.attn, num_heads=4, head_dim=8)
    opt = MuonClip(model, lr=0.0)
    model.attn.eval()  # eval forwards record nothing
    model.attn(torch.randn(1, 3, 32)).sum().backward()
    with pytest.raises(ConfigError, match="recorded no max logits.*qk_clip_tau=0"):
        opt.step()
    with pytest.raises(ConfigError, match="rows"):
        register_qk_clip(Attention(), num_heads=4, head_dim=4)
    with pytest.raises(ConfigError, match="pop_max_logits"):
        register_qk_clip(nn.Linear(2, 2), num_heads=1, head_dim=2, q_proj="", k_proj="")
