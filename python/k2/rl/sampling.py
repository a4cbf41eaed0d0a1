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


# Nucleus sampling draws up to this many candidates from the whole distribution and keeps the
# first inside the nucleus (see sample_tokens); each token owns CANDIDATES + 1 uniform numbers.
CANDIDATES = 4
UNIFORMS_PER_TOKEN = CANDIDATES + 1


def request_uniforms(seed: int, tokens: int) -> torch.Tensor:
    """The random numbers of a request's ``tokens`` tokens: [tokens, UNIFORMS_PER_TOKEN] uniform
    numbers in [0, 1) (float64) from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(tokens, UNIFORMS_PER_TOKEN, generator=generator, dtype=torch.float64)


def scaled_logprobs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """[B, V] float32 ``log_softmax(logits / T)`` per row, T the row's temperature (1 for a
    greedy row, temperature 0): the policy's log-probabilities that samples report."""
    logits = logits.float()
    scale = torch.where(temperature <= 0, torch.ones_like(temperature), temperature).to(logits)
    return torch.log_softmax(logits / scale[:, None], dim=-1)


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
        uniforms: [B, UNIFORMS_PER_TOKEN] numbers in [0, 1), the row's random numbers.

    Returns:
        tokens [B] (int64) and logprobs [B] (float32): ``log_softmax(logits / T)`` at the chosen
        token, at the row's temperature (1 for greedy rows) and without top-p truncation.

    Sampling inverts the row's cumulative distribution in vocabulary order: uniform ``u`` picks
    the first token whose cumulative probability exceeds ``u`` times the total. With top-p, the
    first ``CANDIDATES`` uniforms give candidates from the whole distribution and the first one
    inside the nucleus is taken (rejection sampling, which samples the renormalized nucleus
    exactly, without sorting the vocabulary: a token is inside when the tokens more likely than
    it hold less than ``top_p``); if none is, the last uniform samples the nucleus found by
    :func:`nucleus_mask`. The result depends only on the row's own values.
    """
    greedy = temperature <= 0
    logp = scaled_logprobs(logits, temperature)
    n_greedy = int(greedy.sum())
    if n_greedy == len(greedy):
        tokens = logp.argmax(dim=-1)
    else:
        # The common case (every row sampled) indexes nothing: no copies of [B, V] tensors.
        rows = None if n_greedy == 0 else (~greedy).nonzero().squeeze(1)
        probs = (logp if rows is None else logp[rows]).exp()
        row_top_p = (top_p if rows is None else top_p[rows]).double()
        row_uniforms = (uniforms if rows is None else uniforms[rows]).double()
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)
        candidates = _invert(cdf, row_uniforms[:, :CANDIDATES], probs)  # [R, C]
        chosen = candidates[:, 0]
        nucleus = row_top_p < 1.0
        if bool(nucleus.all()):
            chosen = _first_inside(probs, candidates, row_top_p, row_uniforms)
        elif bool(nucleus.any()):
            n_rows = nucleus.nonzero().squeeze(1)
            chosen[n_rows] = _first_inside(
                probs[n_rows], candidates[n_rows], row_top_p[n_rows], row_uniforms[n_rows]
            )
        if rows is None:
            tokens = chosen
        else:
            tokens = logp.argmax(dim=-1)
            tokens[rows] = chosen
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def _first_inside(
    probs: torch.Tensor, candidates: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Per row of ``probs`` [N, V], the first of ``candidates`` [N, C] inside the top-p nucleus
    (the tokens more likely than it hold less than ``top_p`` [N]); rows whose candidates all
    miss sample the nucleus with their last uniform (``uniforms`` [N, UNIFORMS_PER_TOKEN]).

    Candidates are checked one at a time, each on the rows still missing one: the first is
    inside with probability at least ``top_p``, so about one pass over the vocabulary suffices.
    """
    picked = candidates[:, 0].clone()
    pending = torch.arange(probs.shape[0], device=probs.device)
    for k in range(candidates.shape[1]):
        p = probs if k == 0 else probs[pending]  # every row is pending at the first candidate
        candidate = candidates[pending, k]
        p_c = p.gather(1, candidate[:, None])
        # the mass of the tokens more likely than the candidate (p · [p > p_c]: the same values
        # as a where(), summed in the same order, and about twice as fast on the CPU)
        above = (p * (p > p_c)).sum(dim=-1, dtype=torch.float64)
        inside = above < top_p[pending]
        picked[pending[inside]] = candidate[inside]
        pending = pending[~inside]
        if pending.numel() == 0:
            return picked
    kept = probs[pending] * nucleus_mask(probs[pending], top_p[pending])
    last = uniforms[pending, candidates.shape[1] :]
    picked[pending] = _invert(kept.cumsum(dim=-1, dtype=torch.float64), last, kept).squeeze(1)
    return picked


def _invert(cdf: torch.Tensor, uniforms: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Tokens [R, C]: for each uniform, the first index whose ``cdf`` [R, V] exceeds
    ``u * cdf[:, -1]`` (never past the last token of positive probability)."""
    x = uniforms * cdf[:, -1:]
    index = torch.searchsorted(cdf, x, right=True)
    vocab = probs.shape[-1]
    # An index inside the vocabulary whose token has positive probability is at or before the
    # last such token already; only an index past the end (x rounded up to the total) or at a
    # zero-probability token needs the clamp, which costs a pass over the vocabulary.
    inside = (index < vocab) & (probs.gather(1, index.clamp(max=vocab - 1)) > 0)
    if bool(inside.all()):
        return index
    positions = torch.arange(vocab, device=probs.device)
    last = torch.where(probs > 0, positions, 0).amax(dim=-1, keepdim=True)
    return torch.minimum(index, last)


NUCLEUS_BISECTIONS = 40


def nucleus_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The top-p nucleus of each row of ``probs`` [R, V] as a 0/1 mask (same dtype).

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p`` [R]: the
    tokens at least as likely as ``t*``, the largest threshold whose tokens' mass reaches
    ``top_p``. ``t*`` is found by bisection (mass is non-increasing in the threshold), to
    ``max(p) * 2**-40``: tokens closer than that to ``t*`` count as ties and are kept.
    """
    target = top_p.to(probs)[:, None]
    low = torch.zeros_like(target)  # mass(0) = 1 >= top_p
    high = probs.amax(dim=-1, keepdim=True)
    reaches = (probs * (probs >= high)).sum(dim=-1, keepdim=True) >= target
    low = torch.where(reaches, high, low)  # the most likely token(s) alone suffice
    for _ in range(NUCLEUS_BISECTIONS):
        middle = (low + high) / 2
        ok = (probs * (probs >= middle)).sum(dim=-1, keepdim=True) >= target
        low = torch.where(ok, middle, low)
        high = torch.where(ok, high, middle)
    return (probs >= low).to(probs)
