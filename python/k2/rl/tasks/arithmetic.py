"""Built-in arithmetic: integer expressions at a difficulty level, exact-answer reward with
partial credit for the format (docs/rl-tasks.md, "Arithmetic").

The policy must end its reply with a line ``Answer: N``. Reward: 1.0 when N equals the value;
:data:`FORMAT_CREDIT` (0.1) when the last answer line holds an integer that is wrong; 0.0 when
there is no answer line or it holds no integer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from k2.errors import RLTaskError
from k2.rl.tasks.base import (
    DEFAULT_TEST_FRACTION,
    Prompt,
    Reward,
    Task,
    answer_line,
    check_fraction,
    safe_verify,
    sample_split,
)

FORMAT_CREDIT = 0.1
"""Score of a well-formed answer (an integer on the ``Answer:`` line) that is wrong."""

INSTRUCTION = "Compute the value of the expression. End your reply with a line 'Answer: N', where N is the integer result."


@dataclass(frozen=True)
class ArithmeticLevel:
    """Operands are uniform in [0, 10**digits); ``operands`` of them joined by operators drawn
    from ``ops`` (a subset of ``+-*``), evaluated with the usual precedence."""

    digits: int
    operands: int
    ops: str


LEVELS: dict[int, ArithmeticLevel] = {
    1: ArithmeticLevel(1, 2, "+-"),
    2: ArithmeticLevel(2, 2, "+-"),
    3: ArithmeticLevel(2, 2, "+-*"),
    4: ArithmeticLevel(2, 3, "+-*"),
    5: ArithmeticLevel(3, 3, "+-*"),
    6: ArithmeticLevel(3, 4, "+-*"),
}
"""Difficulty levels, easiest first."""


def evaluate(operands: list[int], ops: list[str]) -> int:
    """``operands[0] ops[0] operands[1] ...`` with ``*`` before ``+``/``-`` (no ``eval``)."""
    terms = [operands[0]]
    signs = [1]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= x
        else:
            terms.append(x)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


_INTEGER = re.compile(r"[+-]?\d{1,200}")


def parse_integer(text: str) -> int | None:
    """An integer answer: optional sign, digits, thousands commas allowed; when the line is an
    equation (``17 + 5 = 22``) the part after the last ``=``. None when it is not one."""
    text = text.rsplit("=", 1)[-1].strip().replace(",", "")
    if not _INTEGER.fullmatch(text):
        return None
    return int(text)


class ArithmeticTask(Task):
    """Integer arithmetic at a difficulty ``level`` (:data:`LEVELS`), or with explicit
    ``digits``/``operands``/``ops`` overriding the level's.

    Hidden data: ``answer`` (int) and ``expression``. Split key: the expression text.
    """

    kind = "arithmetic"

    def __init__(
        self,
        level: int = 2,
        *,
        digits: int | None = None,
        operands: int | None = None,
        ops: str | None = None,
        test_fraction: float = DEFAULT_TEST_FRACTION,
        token_budget: int | None = None,
    ) -> None:
        self.name = "arithmetic"
        if level not in LEVELS:
            raise RLTaskError(f"task 'arithmetic': level must be one of {sorted(LEVELS)}, not {level!r}")
        base = LEVELS[level]
        self.level = ArithmeticLevel(
            digits if digits is not None else base.digits,
            operands if operands is not None else base.operands,
            ops if ops is not None else base.ops,
        )
        lv = self.level
        if not isinstance(lv.digits, int) or not 1 <= lv.digits <= 9:
            raise RLTaskError(f"task 'arithmetic': digits must be an integer in 1..9, not {lv.digits!r}")
        if not isinstance(lv.operands, int) or not 2 <= lv.operands <= 8:
            raise RLTaskError(f"task 'arithmetic': operands must be an integer in 2..8, not {lv.operands!r}")
        if not isinstance(lv.ops, str) or not lv.ops or set(lv.ops) - set("+-*"):
            raise RLTaskError(f"task 'arithmetic': ops must be a non-empty subset of '+-*', not {lv.ops!r}")
        self.test_fraction = check_fraction(self.name, test_fraction)
        self._init_budget(token_budget)

    def _draw(self, rng: random.Random) -> tuple[str, tuple[list[int], list[str]]]:
        lv = self.level
        operands = [rng.randrange(10**lv.digits) for _ in range(lv.operands)]
        ops = [rng.choice(lv.ops) for _ in range(lv.operands - 1)]
        expression = " ".join([str(operands[0])] + [f"{o} {x}" for o, x in zip(ops, operands[1:])])
        return expression, (operands, ops)

    def prompts(self, split: str, n: int, seed: int = 0) -> list[Prompt]:
        problems = sample_split(self.name, split, n, seed, self._draw, self.test_fraction)
        out = []
        for operands, ops in problems:
            expression = " ".join([str(operands[0])] + [f"{o} {x}" for o, x in zip(ops, operands[1:])])
            out.append(Prompt(
                id=f"arithmetic/{expression.replace(' ', '')}",
                messages=[{"role": "system", "content": INSTRUCTION},
                          {"role": "user", "content": f"What is {expression}?"}],
                hidden={"answer": evaluate(operands, ops), "expression": expression},
            ))
        return out

    def gold_response(self, prompt: Prompt) -> str:
        return f"Answer: {prompt.hidden['answer']}"

    def verify(self, prompt: Prompt, response_text: str) -> Reward:
        return safe_verify(lambda: self._verify(prompt, response_text))

    def _verify(self, prompt: Prompt, response_text: Any) -> Reward:
        if not isinstance(response_text, str):
            return Reward(0.0, False, "response is not text")
        line = answer_line(response_text)
        if line is None:
            return Reward(0.0, False, "no answer line")
        value = parse_integer(line)
        if value is None:
            return Reward(0.0, False, "answer is not an integer")
        if value == prompt.hidden["answer"]:
            return Reward(1.0, True, "correct")
        return Reward(FORMAT_CREDIT, False, f"wrong answer {value}")
