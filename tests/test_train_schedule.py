"""The WSD schedule against hand-computed values."""

from __future__ import annotations

import math

import pytest

from k2.errors import ConfigError
from k2.train.schedule import WSDSchedule


def test_phases_by_hand() -> None:
    s = WSDSchedule(peak=1.0, total_steps=10, warmup_steps=2, decay_fraction=0.5, floor=0.1)
    assert s.decay_start == 5
    lrs = [s(i) for i in range(10)]
    assert lrs[:2] == [0.5, 1.0]                      # linear warmup
    assert lrs[2:6] == [1.0, 1.0, 1.0, 1.0]           # stable; decay starts at its peak
    # Cosine over steps 5..9: progress 0, 1/4, 1/2, 3/4, 1.
    for i, p in zip(range(5, 10), (0, 0.25, 0.5, 0.75, 1.0)):
        assert lrs[i] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
    assert lrs[-1] == pytest.approx(0.1)


def test_no_warmup_no_decay_is_constant() -> None:
    s = WSDSchedule(peak=3e-4, total_steps=7, warmup_steps=0, decay_fraction=0.0)
    assert [s(i) for i in range(7)] == [3e-4] * 7


@pytest.mark.parametrize("kwargs, field", [
    (dict(peak=-1.0, total_steps=10), "lr"),
    (dict(peak=1.0, total_steps=0), "steps"),
    (dict(peak=1.0, total_steps=10, warmup_steps=11), "warmup_steps"),
    (dict(peak=1.0, total_steps=10, decay_fraction=1.5), "decay_fraction"),
    (dict(peak=1.0, total_steps=10, floor=2.0), "min_lr"),
])
def test_bad_values_name_the_field(kwargs, field) -> None:
    with pytest.raises(ConfigError, match=field):
        WSDSchedule(**kwargs)
