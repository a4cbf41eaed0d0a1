"""Multi-head Latent Attention (MLA), as in DeepSeek-V2/V3 and Kimi K2.

For hidden states x, per layer (docs/model.md):

* queries  ``q = q_b(norm_q(q_a(x)))`` (or ``q_proj(x)`` when ``q_lora_rank`` is None), split per
  head into ``q_nope`` (qk_nope) and ``q_pe`` (qk_rope);
* keys/values: ``kv_a(x)`` gives a latent ``c`` (kv_lora_rank) and one rotary key ``k_pe``
  (qk_rope) shared by all heads; ``kv_b(norm_kv(c))`` gives per-head ``k_nope`` and ``v``;
* RoPE rotates ``q_pe`` and ``k_pe`` only; ``score = (q_nope·k_nope + q_pe·k_pe) * scale``.

Two equal computations of the same attention:

* **naive** (training, prefill): expand ``k_nope`` and ``v`` per head from the latent;
* **absorbed** (decode): fold kv_b's key half into the query (``q_lat = q_nope W_uk``) and its
  value half into the output, so attention runs over the cached latent ``c`` and ``k_pe`` only —
  ``kv_lora_rank + qk_rope`` numbers per token per layer.

The naive path runs PyTorch's fused attention (:meth:`MLA._attend`); the absorbed path, whose
keys are shared by all heads, writes its softmax out. Both record each head's largest
pre-softmax logit for QK-Clip in training forwards.

Shapes: B batch, T new tokens, S keys (cached + new), H heads, R kv_lora_rank,
N qk_nope_head_dim, P qk_rope_head_dim, V v_head_dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from k2.model.config import K2Config
from k2.model.precision import upcast
from k2.model.rope import apply_rope
from k2.model.speedups import causal_bias, reusable_empty

# transformers' DeepseekV3 (and DeepSeek's own code) build the two low-rank norms with this eps,
# not with config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = upcast(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class AttentionMask(NamedTuple):
    """Which keys each query may attend to.

    ``allowed`` [B, 1, T, S] (bool) is causal, document-blocked and padding-aware; a query that
    may see no key at all (a padding token) is let see itself so softmax stays finite.
    ``uncounted`` [B, 1, T, S] marks the pairs that do not count for the recorded max logits:
    those not allowed, and every pair of a query that may see no real key. ``is_causal`` says
    ``allowed`` is the plain causal mask (one document, no padding, no cache), which lets
    attention use the faster causal kernel.
    """

    allowed: torch.Tensor
    uncounted: torch.Tensor
    is_causal: bool = False


def build_attention_mask(
    position_ids: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    past_length: int = 0,
    documents: bool = True,
) -> AttentionMask:
    """The mask for T new tokens that follow ``past_length`` cached ones.

    Args:
        position_ids: [B, T] positions of the new tokens. With ``documents``, a position that does
            not exceed its predecessor's starts a new document (packed sequences restart
            positions at each document), and attention is block-diagonal causal.
        key_valid: [B, past_length + T] bool, False for padding keys; None means all valid.
        past_length: number of cached tokens before the new ones.
        documents: apply document masking (only meaningful without a cache).

    Returns:
        The :class:`AttentionMask`.
    """
    batch, length = position_ids.shape
    device = position_ids.device
    query_index = torch.arange(past_length, past_length + length, device=device)
    key_index = torch.arange(past_length + length, device=device)
    allowed = (key_index[None, :] <= query_index[:, None]).expand(batch, -1, -1)  # [B, T, S]
    is_causal = past_length == 0
    if documents and past_length == 0 and length > 1:
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] <= position_ids[:, :-1]
        if bool(starts[:, 1:].any()):
            document = starts.cumsum(dim=1)  # [B, T]
            allowed = allowed & (document[:, :, None] == document[:, None, :])
            is_causal = False
    if key_valid is not None and not bool(key_valid.all()):
        allowed = allowed & key_valid.bool()[:, None, :]
        is_causal = False
    has_keys = allowed.any(dim=-1, keepdim=True)  # [B, T, 1]
    uncounted = ~(allowed & has_keys)
    itself = key_index[None, :] == query_index[:, None]  # [T, S]
    allowed = allowed | (itself & ~has_keys)
    return AttentionMask(allowed[:, None], uncounted[:, None], is_causal)


class MLA(nn.Module):
    """Multi-head Latent Attention with a naive and an absorbed path.

    Submodules are named as the Hub checkpoint names them (``q_a_proj``, ``q_a_layernorm``,
    ``q_b_proj`` or ``q_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``,
    ``o_proj``), with the Hub's row layouts (what QK-Clip rescales per head):

    * ``q_b_proj`` / ``q_proj``: H blocks of N + P rows; head h's first N rows make its
      ``q_nope``, the next P its ``q_pe``;
    * ``kv_b_proj``: H blocks of N + V rows; head h's first N rows make its ``k_nope``, the next V
      its value;
    * ``kv_a_proj_with_mqa``: R rows for the latent ``c``, then P for the shared ``k_pe``.

    QK-Clip: in a training-mode forward with ``record_max_logits`` on, ``max_logits`` keeps the
    running per-head maximum (fp32 [H]) of the pre-softmax logit over allowed (query, key) pairs
    since the last :meth:`pop_max_logits`.
    """

    def __init__(self, config: K2Config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.softmax_scale = config.softmax_scale
        self.rope_interleave = config.rope_interleave
        hidden, heads, qk_dim = config.hidden_size, self.num_heads, config.qk_head_dim

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(heads * self.v_head_dim, hidden, bias=False)

        self.record_max_logits = True
        self.max_logits: torch.Tensor | None = None

    def pop_max_logits(self) -> torch.Tensor | None:
        """The per-head max logit (fp32 [H]) since the last call, or None; resets it."""
        value, self.max_logits = self.max_logits, None
        return value

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: LatentCache | None = None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """Attend from the T new tokens to the cached ones and to themselves.

        Args:
            x: [B, T, hidden] normalized hidden states.
            rope: (cos, sin), each [B, T, P/2], for the new tokens' positions.
            mask: the :class:`AttentionMask` over S = cached + T keys.
            cache: this layer's latent cache; the new ``c`` and ``k_pe`` are appended to it.
            absorb: force the absorbed (True) or naive (False) path; by default decode steps
                (a cache and T == 1) are absorbed and everything else is naive.

        Returns:
            [B, T, hidden].
        """
        batch, length, _ = x.shape
        heads, nope, rope_dim = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        cos, sin = rope

        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(batch, length, heads, nope + rope_dim)
        q_nope, q_pe = q.split([nope, rope_dim], dim=-1)  # [B, T, H, N], [B, T, H, P]
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleave)

        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, rope_dim], dim=-1)
        c = self.kv_a_layernorm(c)  # [B, T, R]
        k_pe = apply_rope(k_pe, cos, sin, self.rope_interleave)  # [B, T, P]
        if cache is not None:
            c, k_pe = cache.append(c, k_pe)  # [B, S, R], [B, S, P]

        if absorb is None:
            absorb = cache is not None and length == 1
        if absorb:
            out = self._absorbed(q_nope, q_pe, c, k_pe, mask)
        else:
            out = self._naive(q_nope, q_pe, c, k_pe, mask)
        return self.o_proj(out.reshape(batch, length, heads * self.v_head_dim))

    def _naive(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c: torch.Tensor,
        k_pe: torch.Tensor,
        mask: AttentionMask,
    ) -> torch.Tensor:
        """Expand per-head keys and values from the latent. Returns [B, T, H, V]."""
        batch, keys, _ = c.shape
        heads = self.num_heads
        kv = self.kv_b_proj(c).view(batch, keys, heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = k_pe[:, :, None, :].expand(batch, keys, heads, self.qk_rope_head_dim)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # [B, H, T, N+P]
        k = torch.cat((k_nope, k_pe), dim=-1).transpose(1, 2)  # [B, H, S, N+P]
        out = self._attend(q, k, v.transpose(1, 2), mask)  # [B, H, T, V]
        return out.transpose(1, 2)

    def _absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c: torch.Tensor,
        k_pe: torch.Tensor,
        mask: AttentionMask,
    ) -> torch.Tensor:
        """Attend over the latent: ``q_nope·k_nope = (q_nope W_uk)·c``, ``out = (p·c) W_uv^T``.

        Returns [B, T, H, V].
        """
        rank = c.shape[-1]
        heads, nope = self.num_heads, self.qk_nope_head_dim
        w = self.kv_b_proj.weight.view(heads, nope + self.v_head_dim, rank)
        w_uk, w_uv = w[:, :nope], w[:, nope:]  # [H, N, R], [H, V, R]
        q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)
        q = torch.cat((q_latent, q_pe.transpose(1, 2)), dim=-1)  # [B, H, T, R+P]
        batch, _, length, width = q.shape
        keys = c.shape[1]
        k = torch.cat((c, k_pe), dim=-1)  # [B, S, R+P]: one key for every head
        # Every head reads the same keys, so the heads are rows of one batched product: a
        # broadcast matmul over a head axis would copy the whole cache once per head.
        scores = torch.bmm((q * self.softmax_scale).reshape(batch, heads * length, width), k.transpose(1, 2))
        scores = upcast(scores.view(batch, heads, length, keys))  # [B, H, T, S]
        if self.training and self.record_max_logits:
            self._record_max_logits(scores.detach().clone(), mask)
        probs = torch.softmax(scores.masked_fill(~mask.allowed, float("-inf")), dim=-1)
        out_latent = torch.bmm(probs.to(c.dtype).reshape(batch, heads * length, keys), c)
        out_latent = out_latent.view(batch, heads, length, rank)  # [B, H, T, R]
        return torch.einsum("bhtr,hvr->bthv", out_latent, w_uv)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask
    ) -> torch.Tensor:
        """Softmax attention ``softmax(q k^T * scale) v`` over [B, H, ., .] tensors (naive path).

        Training forwards with ``record_max_logits`` also compute the scores once more without
        autograd, for the per-head max (the fused attention kernel does not return it).
        """
        if self.training and self.record_max_logits:
            with torch.no_grad():
                shape = (*q.shape[:-1], k.shape[-2])
                scores = reusable_empty("mla.scores", shape, q.dtype, q.device)
                torch.matmul(q, k.transpose(-1, -2), out=scores)  # scaled after the max
                self._record_max_logits(upcast(scores), mask, self.softmax_scale)
        # Fused (flash) attention kernels want one head size for q, k and v: pad v with zeros.
        value_dim = v.shape[-1]
        if value_dim < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - value_dim))
        if mask.is_causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed, scale=self.softmax_scale)
        return out[..., :value_dim]

    @torch.no_grad()
    def _record_max_logits(self, scores: torch.Tensor, mask: AttentionMask, scale: float = 1.0) -> None:
        """Fold ``scale * max`` of ``scores`` [B, H, T, S] over the counted pairs into
        ``max_logits`` (``scores`` is overwritten)."""
        if mask.is_causal:  # adding a cached -inf triangle is cheaper than a broadcast bool fill
            scores.add_(causal_bias(scores.shape[-2], scores.shape[-1], scores.dtype, scores.device))
        else:
            scores.masked_fill_(mask.uncounted, float("-inf"))
        per_head = scores.amax(dim=(0, 2, 3)) * scale  # [H]; scale > 0 commutes with max
        if self.max_logits is None:
            self.max_logits = per_head
        else:
            self.max_logits = torch.maximum(self.max_logits, per_head)


class LatentCache:
    """One layer's decode cache: the normalized latent ``c`` and the rotated ``k_pe`` per token.

    Storage is preallocated for ``capacity`` tokens; :meth:`append` writes the new tokens and
    returns views of everything cached so far.
    """

    def __init__(
        self,
        batch: int,
        capacity: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.latent = torch.zeros(batch, capacity, kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(batch, capacity, rope_dim, dtype=dtype, device=device)
        self.length = 0

    def append(self, c: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: c [B, T, R], k_pe [B, T, P]. Returns: the cached c [B, S, R] and k_pe [B, S, P]."""
        end = self.length + c.shape[1]
        if end > self.latent.shape[1]:
            raise ValueError(
                f"LatentCache holds {self.latent.shape[1]} tokens; appending {c.shape[1]} to "
                f"{self.length} overflows it"
            )
        self.latent[:, self.length : end] = c
        self.k_pe[:, self.length : end] = k_pe
        self.length = end
        return self.latent[:, :end], self.k_pe[:, :end]


class KVCache:
    """The decode cache of a whole model: one :class:`LatentCache` per layer."""

    def __init__(
        self,
        config: K2Config,
        batch: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.capacity = capacity
        device = torch.device(device)
        rank, rope_dim = config.kv_lora_rank, config.qk_rope_head_dim
        self.layers = [
            LatentCache(batch, capacity, rank, rope_dim, dtype, device)
            for _ in range(config.num_hidden_layers)
        ]

    @property
    def length(self) -> int:
        """Tokens cached so far."""
        return self.layers[0].length if self.layers else 0
