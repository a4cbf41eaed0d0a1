"""Pairwise judgements of a prompt's K samples → one reward per sample
(docs/critic.md, "From comparisons to rewards").

The critic gives, for each compared pair ``(i, j)``, ``p`` = the probability that sample i is
better than j (already averaged over both presentation orders). Two rules turn these into
rewards in [0, 1]:

* ``win_rate`` (the default): sample i's reward is the mean of its soft wins, ``p`` as i and
  ``1 − p`` as j, over the pairs it took part in.
* ``bradley_terry``: fit strengths π by the MM algorithm (Hunter, 2004) for the Bradley–Terry
  model P(i beats j) = π_i / (π_i + π_j) with the soft outcomes as fractional wins, then give i
  its expected win rate against *all* K − 1 others under the fit. With every pair compared once
  this equals ``win_rate`` exactly (the likelihood equations say each sample's fitted wins equal
  its observed wins); it differs, and fills in the unobserved pairs, when only some pairs are
  compared (``pairs="ring"``).

:func:`pair_schedule` chooses which pairs are compared: ``"all"`` (K(K−1)/2 pairs) or ``"ring"``
(i against i + 1 mod K: K pairs, each sample in two).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from k2.errors import CriticError

AGGREGATIONS = ("win_rate", "bradley_terry")
BT_PRIOR = 0.01
"""Draws against a unit-strength anchor per sample in :func:`aggregate`'s Bradley–Terry fit: it
keeps the strengths finite when a sample wins or loses every game outright (a critic certain to
float precision), at a cost of about 1 % of a game per sample."""
PAIR_SCHEDULES = ("all", "ring")


def pair_schedule(k: int, mode: str = "all") -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, ``i != j``, compared among ``k`` samples."""
    if k < 2:
        raise CriticError(f"need at least 2 samples to compare, got {k}")
    if mode == "all":
        return [(i, j) for i in range(k) for j in range(i + 1, k)]
    if mode == "ring":
        if k == 2:
            return [(0, 1)]
        return [(i, (i + 1) % k) for i in range(k)]
    raise CriticError(f"unknown pair schedule {mode!r}; choose one of {', '.join(PAIR_SCHEDULES)}")


def _check(k: int, pairs: Sequence[tuple[int, int]], probs: Sequence[float]) -> None:
    if len(pairs) != len(probs):
        raise CriticError(f"{len(pairs)} pairs but {len(probs)} probabilities")
    for (i, j), p in zip(pairs, probs):
        if not (0 <= i < k and 0 <= j < k and i != j):
            raise CriticError(f"pair {(i, j)} is not two different samples of {k}")
        if not 0.0 <= p <= 1.0 or math.isnan(p):
            raise CriticError(f"pair {(i, j)}: probability {p} is not in [0, 1]")


def win_rates(k: int, pairs: Sequence[tuple[int, int]], probs: Sequence[float]) -> list[float]:
    """Each sample's mean soft win over the pairs it took part in (0.5 for one in none)."""
    _check(k, pairs, probs)
    wins = [0.0] * k
    games = [0] * k
    for (i, j), p in zip(pairs, probs):
        wins[i] += p
        wins[j] += 1.0 - p
        games[i] += 1
        games[j] += 1
    return [w / g if g else 0.5 for w, g in zip(wins, games)]


def bradley_terry_strengths(k: int, pairs: Sequence[tuple[int, int]], probs: Sequence[float], *,
                            iterations: int = 500, tol: float = 1e-12, prior: float = 0.0) -> list[float]:
    """Bradley–Terry strengths by minorization–maximization, normalized to geometric mean 1.

    Each compared pair is one game whose outcome is split: ``p`` of a win to i, ``1 − p`` to j.
    The MM step is π_i ← W_i / Σ_{games g of i} 1 / (π_i + π_opponent(g)). ``prior`` > 0 adds,
    for every sample, that many games against a fixed opponent of strength 1 ending in a draw,
    which keeps the fit finite when a sample wins (or loses) every game outright.
    """
    _check(k, pairs, probs)
    if prior < 0:
        raise CriticError(f"prior must be >= 0, got {prior}")
    wins = [prior / 2] * k
    for (i, j), p in zip(pairs, probs):
        wins[i] += p
        wins[j] += 1.0 - p
    pi = [1.0] * k
    for _ in range(iterations):
        denom = [prior / (pi[i] + 1.0) for i in range(k)]
        for i, j in pairs:
            s = 1.0 / (pi[i] + pi[j])
            denom[i] += s
            denom[j] += s
        new = [wins[i] / denom[i] if denom[i] > 0 else pi[i] for i in range(k)]
        new = [min(max(x, 1e-300), 1e300) for x in new]
        if prior == 0:  # the scale is free: pin the geometric mean of the positive strengths
            logs = [math.log(x) for x in new]
            shift = math.exp(sum(logs) / k)
            new = [min(max(x / shift, 1e-12), 1e12) for x in new]
        change = max(abs(math.log(a) - math.log(b)) for a, b in zip(new, pi))
        pi = new
        if change < tol:
            break
    return pi


def bradley_terry(k: int, pairs: Sequence[tuple[int, int]], probs: Sequence[float], *,
                  iterations: int = 500, prior: float = 0.0) -> list[float]:
    """Each sample's expected win rate against all ``k − 1`` others under the Bradley–Terry fit
    of :func:`bradley_terry_strengths`."""
    pi = bradley_terry_strengths(k, pairs, probs, iterations=iterations, prior=prior)
    return [sum(pi[i] / (pi[i] + pi[j]) for j in range(k) if j != i) / (k - 1) for i in range(k)]


def aggregate(k: int, pairs: Sequence[tuple[int, int]], probs: Sequence[float],
              method: str = "win_rate") -> list[float]:
    """Rewards of ``k`` samples from their compared ``pairs`` and P(i beats j) ``probs`` by
    ``method`` (:data:`AGGREGATIONS`)."""
    if method == "win_rate":
        return win_rates(k, pairs, probs)
    if method == "bradley_terry":
        return bradley_terry(k, pairs, probs, prior=BT_PRIOR)
    raise CriticError(f"unknown aggregation {method!r}; choose one of {', '.join(AGGREGATIONS)}")
