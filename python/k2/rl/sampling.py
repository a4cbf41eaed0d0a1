"""Per-request random streams and the token sampler of the rollout engine (docs/rl.md).

Every request owns its random numbers: a ``torch.Generator`` seeded from ``(seed, request index)``
draws one uniform number per token it may generate. The sampler turns a row's logits and its
uniform into a token by inverting the row's cumulative distribution, so which other rows share
the batch, and in which order, cannot change what a request samples.
"""

from __future__ import annotations

import hashlib

import torch


def request_seed(seed: int, index: int) -> int:
    """The seed of request ``index`` in a call seeded with ``seed`` (a 63-bit hash of both)."""
    digest = hashlib.blake2b(f"k2.rl:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def request_uniforms(seed: int, count: int) -> torch.Tensor:
    """``count`` uniform numbers in [0, 1) (float64) from a generator seeded with ``seed``:
    the one random number each of a request's tokens is sampled with."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, generator=generator, dtype=torch.float64)


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row, and its log-probability under the sampling policy.

    Args:
        logits: [B, V].
        temperature: [B]; a row with temperature 0 is decoded greedily (argmax).
        top_p: [B] nucleus mass in (0, 1]; a row keeps the smallest set of its most likely tokens
            whose probability reaches it (always at least one).
        uniforms: [B] numbers in [0, 1), one per row.

    Returns:
        tokens [B] (int64) and logprobs [B] (float32): ``log_softmax(logits / T)`` at the chosen
        token, at the row's temperature (1 for greedy rows) and without top-p truncation.

    A sampled row picks the first token (in vocabulary order when ``top_p == 1``, in order of
    decreasing probability otherwise) whose cumulative probability exceeds ``u`` times the kept
    mass. The method depends only on the row's own values.
    """
    logits = logits.float()
    greedy = temperature <= 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature).to(logits)
    logp = torch.log_softmax(logits / scale[:, None], dim=-1)
    tokens = logp.argmax(dim=-1)
    vocab = logits.shape[-1]
    nucleus = ~greedy & (top_p < 1.0)
    full = ~greedy & ~nucleus
    if bool(full.any()):
        rows = full.nonzero().squeeze(1)
        cdf = logp[rows].double().exp().cumsum(dim=-1)
        x = uniforms[rows].double() * cdf[:, -1]
        tokens[rows] = torch.searchsorted(cdf, x[:, None], right=True).squeeze(1).clamp(max=vocab - 1)
    if bool(nucleus.any()):
        rows = nucleus.nonzero().squeeze(1)
        sorted_logp, order = logp[rows].sort(dim=-1, descending=True, stable=True)
        sorted_probs = sorted_logp.double().exp()
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p[rows].double()[:, None], 0.0)
        kept = (sorted_probs > 0).sum(dim=-1)
        cdf = sorted_probs.cumsum(dim=-1)
        x = uniforms[rows].double() * cdf[:, -1]
        index = torch.searchsorted(cdf, x[:, None], right=True).squeeze(1)
        index = torch.minimum(index, kept - 1)
        tokens[rows] = order.gather(1, index[:, None]).squeeze(1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)
