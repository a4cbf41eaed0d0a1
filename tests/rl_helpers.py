"""Tasks the RL tests share (tests/rl/)."""

from __future__ import annotations

from k2.rl.tasks.arithmetic import ArithmeticTask
from k2.rl.tasks.base import Reward


class LengthTask(ArithmeticTask):
    """Arithmetic prompts with a reward that varies between samples of a random policy: the
    response's length in characters over 40, capped at 1."""

    def verify(self, prompt, response_text):  # noqa: ANN001, ANN201
        return Reward(min(1.0, len(response_text) / 40), False, "length")
