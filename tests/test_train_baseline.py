"""The n-gram baselines against a hand-worked case and a brute-force implementation."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from k2.train.baseline import KneserNeyBigram, fit_baselines, unigram_nats


def test_hand_worked_kneser_ney() -> None:
    # Bigrams of [0, 1, 0, 1, 2]: (0,1) twice, (1,0), (1,2). Every token has one distinct
    # predecessor, so P_cont = 1/3 each; c(0) = 2 with one successor type.
    kn = KneserNeyBigram(np.array([0, 1, 0, 1, 2]), vocab_size=3, discount=0.75)
    p = kn.prob(np.array([0, 0, 0, 2, 2, 2]), np.array([0, 1, 2, 0, 1, 2]))
    np.testing.assert_allclose(p, [0.125, 0.75, 0.125, 1 / 3, 1 / 3, 1 / 3])


def brute_force_kn(train, V, D):
    pairs = Counter(zip(train[:-1], train[1:]))
    c = Counter(v for v, _ in pairs.elements())
    succ = Counter(v for v, _ in pairs)
    pred = Counter(w for _, w in pairs)
    n, seen = len(pairs), len(pred)

    def p_cont(w):
        return (max(pred[w] - D, 0) + D * seen / V) / n

    def prob(v, w):
        if c[v] == 0:
            return p_cont(w)
        return (max(pairs[(v, w)] - D, 0) + D * succ[v] * p_cont(w)) / c[v]

    return prob


def test_matches_brute_force_and_normalizes() -> None:
    rng = np.random.default_rng(0)
    V = 12
    train = rng.integers(0, V - 2, 400)  # the last two ids never occur: unseen contexts/tokens
    kn = KneserNeyBigram(train, V)
    ref = brute_force_kn(train.tolist(), V, 0.75)
    v, w = np.meshgrid(np.arange(V), np.arange(V), indexing="ij")
    got = kn.prob(v.ravel(), w.ravel()).reshape(V, V)
    want = np.array([[ref(a, b) for b in range(V)] for a in range(V)])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got.sum(1), np.ones(V), rtol=1e-12)
    assert (got > 0).all()


def test_bigram_beats_unigram_on_markov_text() -> None:
    rng = np.random.default_rng(1)
    V = 50
    nxt = rng.integers(0, V, (V, 3))  # each token is followed by one of 3 tokens
    seq = [0]
    for _ in range(20000):
        seq.append(int(nxt[seq[-1], rng.integers(0, 3)]))
    seq = np.array(seq)
    report = fit_baselines(seq[:15000], seq[15000:], V, valid_bytes=2 * (len(seq) - 15000))
    assert report.bigram_nats < report.unigram_nats
    assert report.bigram_nats == pytest.approx(math.log(3), abs=0.1)  # the chain's entropy
    assert report.bits_per_byte(report.bigram_nats) == pytest.approx(
        report.bigram_nats / 2 / math.log(2))


def test_unigram_is_laplace_smoothed() -> None:
    assert unigram_nats(np.array([0, 0, 1]), np.array([2]), 3) == pytest.approx(-math.log(1 / 6))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="discount"):
        KneserNeyBigram(np.array([0, 1]), 2, discount=1.0)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        KneserNeyBigram(np.array([0, 5]), 2)
