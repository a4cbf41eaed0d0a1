"""The WSD (warmup–stable–decay) learning-rate schedule that K2 trains with.

    step <  warmup:                 lr = peak * (step + 1) / warmup
    warmup <= step < decay_start:   lr = peak
    decay_start <= step < total:    lr = floor + (peak - floor) * (1 + cos(pi * p)) / 2,
                                    p = (step - decay_start) / (total - 1 - decay_start)
                                    (so the last step gets exactly ``floor``)

K2 (tech report): 500 warmup steps, a long constant phase at 2e-4, then cosine decay to 2e-5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from k2.errors import ConfigError


@dataclass(frozen=True)
class WSDSchedule:
    """Warmup, stable, cosine decay.

    Args:
        peak: the learning rate of the stable phase.
        total_steps: steps in the whole run.
        warmup_steps: linear warmup length (the first step already gets peak / warmup_steps).
        decay_fraction: share of ``total_steps`` spent decaying at the end (0 = no decay).
        floor: the learning rate reached at the last step of the decay.
    """

    peak: float
    total_steps: int
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    floor: float = 0.0

    def __post_init__(self) -> None:
        if not (self.peak > 0 and math.isfinite(self.peak)):
            raise ConfigError(f"lr must be a positive number, got {self.peak}")
        if self.total_steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(
                f"warmup_steps must lie in [0, steps={self.total_steps}], got {self.warmup_steps}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must lie in [0, 1], got {self.decay_fraction}")
        if not 0.0 <= self.floor <= self.peak:
            raise ConfigError(f"min_lr must lie in [0, lr={self.peak}], got {self.floor}")

    @property
    def decay_start(self) -> int:
        return max(self.warmup_steps, self.total_steps - round(self.decay_fraction * self.total_steps))

    def __call__(self, step: int) -> float:
        """The learning rate for 0-based ``step``."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        start = self.decay_start
        if step < start:
            return self.peak
        span = self.total_steps - start
        progress = min(1.0, (step - start) / max(1, span - 1))
        return self.floor + (self.peak - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
