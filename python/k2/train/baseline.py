"""Count-based baselines the trained model has to beat: unigram and interpolated Kneser–Ney bigram.

Both are fitted on the training token stream and scored on the validation stream in nats per
token (and bits per byte, given the text's byte count). The bigram model is interpolated
Kneser–Ney with absolute discount D (0.75 by default):

    P(w | v) = max(c(v, w) − D, 0) / c(v)  +  D · N1+(v •) / c(v) · P_cont(w)      if c(v) > 0
    P(w | v) = P_cont(w)                                                            otherwise

    P_cont(w) = max(N1+(• w) − D, 0) / N1+(• •)  +  D · |{w : N1+(• w) > 0}| / N1+(• •) · 1 / V

where c(v) counts v as a bigram's first token, N1+(v •) the distinct successors of v, N1+(• w) the
distinct predecessors of w, N1+(• •) the distinct bigrams, and V the vocabulary size. The
continuation distribution is itself discounted toward uniform, so every token has non-zero
probability and each conditional sums to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BaselineReport:
    """Validation cross-entropy of the baselines."""

    unigram_nats: float
    bigram_nats: float
    tokens: int
    bytes: int | None

    def bits_per_byte(self, nats_per_token: float) -> float | None:
        """Convert nats per token into bits per byte of the validation text."""
        if not self.bytes:
            return None
        return nats_per_token * self.tokens / self.bytes / math.log(2)


def unigram_nats(train: np.ndarray, valid: np.ndarray, vocab_size: int) -> float:
    """Validation nats/token of an add-one (Laplace) smoothed unigram model."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[valid].mean())


class KneserNeyBigram:
    """Interpolated Kneser–Ney bigram model over token ids in ``[0, vocab_size)``.

    Args:
        tokens: the training token stream (1-D integer array).
        vocab_size: V.
        discount: the absolute discount D in (0, 1).
    """

    def __init__(self, tokens: np.ndarray, vocab_size: int, discount: float = 0.75) -> None:
        if not 0.0 < discount < 1.0:
            raise ValueError(f"discount must lie in (0, 1), got {discount}")
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size < 2:
            raise ValueError("Kneser–Ney needs at least two training tokens")
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size})")
        V, D = vocab_size, discount
        self.vocab_size, self.discount = V, D
        keys, counts = np.unique(tokens[:-1] * V + tokens[1:], return_counts=True)
        self._keys = keys                                    # sorted bigram keys v * V + w
        self._counts = counts.astype(np.float64)             # c(v, w)
        first, second = keys // V, keys % V
        self._context_count = np.bincount(first, weights=self._counts, minlength=V)   # c(v)
        self._successors = np.bincount(first, minlength=V).astype(np.float64)         # N1+(v •)
        predecessors = np.bincount(second, minlength=V).astype(np.float64)            # N1+(• w)
        n_bigrams = float(keys.size)                                                  # N1+(• •)
        seen = float(np.count_nonzero(predecessors))
        self._p_cont = (np.maximum(predecessors - D, 0.0) + D * seen / V) / n_bigrams

    def prob(self, context: np.ndarray, token: np.ndarray) -> np.ndarray:
        """P(token | context), elementwise over equal-length id arrays."""
        context = np.asarray(context, dtype=np.int64)
        token = np.asarray(token, dtype=np.int64)
        V, D = self.vocab_size, self.discount
        key = context * V + token
        idx = np.minimum(np.searchsorted(self._keys, key), self._keys.size - 1)
        pair = np.where(self._keys[idx] == key, self._counts[idx], 0.0)       # c(v, w)
        c_v = self._context_count[context]
        p_cont = self._p_cont[token]
        safe = np.maximum(c_v, 1.0)
        seen_context = (np.maximum(pair - D, 0.0) + D * self._successors[context] * p_cont) / safe
        return np.where(c_v > 0, seen_context, p_cont)

    def nats_per_token(self, tokens: np.ndarray) -> float:
        """Mean −ln P(w_i | w_{i−1}) over the consecutive pairs of ``tokens``."""
        tokens = np.asarray(tokens, dtype=np.int64)
        return float(-np.log(self.prob(tokens[:-1], tokens[1:])).mean())


def fit_baselines(train: np.ndarray, valid: np.ndarray, vocab_size: int,
                  valid_bytes: int | None = None, discount: float = 0.75) -> BaselineReport:
    """Fit both baselines on ``train`` and score them on ``valid``."""
    bigram = KneserNeyBigram(train, vocab_size, discount)
    return BaselineReport(
        unigram_nats=unigram_nats(train, valid, vocab_size),
        bigram_nats=bigram.nats_per_token(valid),
        tokens=int(len(valid)),
        bytes=valid_bytes,
    )
