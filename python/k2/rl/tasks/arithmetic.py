"""Built-in arithmetic: integer expressions at a difficulty level, exact-answer reward with
partial credit for the format (docs/rl-tasks.md, "Arithmetic").

The policy must end its reply with a line ``Answer: N``. Reward: 1.0 when N equals the value;
:data:`FORMAT_CREDIT` (0.1) when the last answer line holds an integer that is wrong; 0.0 when
there is no answer line or it holds no integer.

With ``working="steps"`` the prompt asks for the working and the gold reply shows it, column by
column (:func:`steps_response`); the reward still reads only the last ``Answer:`` line.
"""

from __future__ import annotations

import itertools
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

STEPS_INSTRUCTION = ("Compute the value of the expression. Show the working column by column, then end "
                     "your reply with a line 'Answer: N', where N is the integer result.")
"""The system prompt of ``working="steps"``."""

WORKINGS = ("none", "steps")
"""What a gold reply shows before its answer line: nothing, or the column-by-column steps."""

STEPS_MAX_BUDGET = 256
"""The longest worst-case steps reply (in tokens, :func:`steps_token_bound`) ``working="steps"``
accepts: levels 1-4 fit; levels 5-6 (three-digit products, bounds of 600+ tokens) do not."""


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


def _digits(n: int) -> list[int]:
    """The decimal digits of ``n >= 0``, least significant first."""
    return [int(c) for c in reversed(str(n))]


def _add_steps(x: int, y: int) -> list[str]:
    """Column addition of ``x + y`` (both >= 0), right to left: a header ``x+y:``, then per column
    ``a+b[+1]=s P`` (``+1``: the carry in; ``s`` the column sum; ``P`` the result digits so far,
    the last column's whole sum in front)."""
    a, b = _digits(x), _digits(y)
    n = max(len(a), len(b))
    a += [0] * (n - len(a))
    b += [0] * (n - len(b))
    lines, carry, partial = [f"{x}+{y}:"], 0, ""
    for i in range(n):
        total = a[i] + b[i] + carry
        partial = (str(total) if i == n - 1 else str(total % 10)) + partial
        lines.append(f"{a[i]}+{b[i]}{'+1' if carry else ''}={total} {partial}")
        carry = total // 10
    return lines


def _sub_steps(x: int, y: int, header: str | None = None) -> list[str]:
    """Column subtraction of ``x - y`` (``x >= y >= 0``), right to left: a header, then per column
    ``t-b[-1]=d P`` (``t`` the top digit, plus 10 when it borrows from the next column; ``-1``:
    this column lends one; ``P`` the result digits so far, leading zeros kept)."""
    a, b = _digits(x), _digits(y)
    b += [0] * (len(a) - len(b))
    lines, borrow, partial = [header or f"{x}-{y}:"], 0, ""
    for i, (top, low) in enumerate(zip(a, b)):
        lend = top - low - borrow < 0
        top += 10 if lend else 0
        digit = top - low - borrow
        partial = str(digit) + partial
        lines.append(f"{top}-{low}{'-1' if borrow else ''}={digit} {partial}")
        borrow = int(lend)
    return lines


def _mul_steps(x: int, y: int) -> list[str]:
    """``x * y`` (both >= 0): a header ``x*y:``, one partial product ``x*d=p`` per digit ``d`` of
    ``y`` right to left, then the column additions of the partials shifted into place."""
    lines = [f"{x}*{y}:"]
    shifted = []
    for i, d in enumerate(_digits(y)):
        lines.append(f"{x}*{d}={x * d}")
        shifted.append(x * d * 10**i)
    total = shifted[0]
    for part in shifted[1:]:
        lines += _add_steps(total, part)
        total += part
    return lines


def _terms(operands: list[int], ops: list[str]) -> tuple[list[list[int]], list[int]]:
    """The expression as signed products: factors per term and each term's sign."""
    terms, signs = [[operands[0]]], [1]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            terms[-1].append(x)
        else:
            terms.append([x])
            signs.append(1 if op == "+" else -1)
    return terms, signs


def steps_response(operands: list[int], ops: list[str]) -> str:
    """The worked gold reply: each product left to right (:func:`_mul_steps`); the positive terms
    added left to right, then the negative ones (:func:`_add_steps`); then positive sum minus
    negative sum (:func:`_sub_steps`; a header ``P-N=-(N-P):`` when it is negative, the columns
    of ``N-P``); then ``Answer: N``. No intermediate value is ever negative."""
    terms, signs = _terms(operands, ops)
    lines: list[str] = []
    values = []
    for factors in terms:
        value = factors[0]
        for f in factors[1:]:
            lines += _mul_steps(value, f)
            value *= f
        values.append(value)
    sums: list[int | None] = []
    for sign in (1, -1):
        group = [v for v, s in zip(values, signs) if s == sign]
        if not group:
            sums.append(None)
            continue
        total = group[0]
        for v in group[1:]:
            lines += _add_steps(total, v)
            total += v
        sums.append(total)
    pos, neg = sums
    assert pos is not None  # the first term is positive
    answer = pos
    if neg is not None:
        if pos >= neg:
            lines += _sub_steps(pos, neg)
        else:
            lines += _sub_steps(neg, pos, header=f"{pos}-{neg}=-({neg}-{pos}):")
        answer = pos - neg
    lines.append(f"Answer: {answer}")
    return "\n".join(lines)


def _add_bound(m: int, n: int) -> tuple[int, int]:
    """Most bytes of :func:`_add_steps` for operands of at most ``m`` and ``n`` digits (newlines
    included), and most digits of the sum."""
    cols = max(m, n)
    size = m + n + 3  # "x+y:\n"
    for i in range(cols):  # "a+b+1=ss P\n", the last column's P one longer
        size += 10 + i + (i == cols - 1)
    return size, cols + 1


def _sub_bound(m: int, n: int) -> tuple[int, int]:
    """Most bytes of the final subtraction of an ``m``-digit and an ``n``-digit value (either may
    be larger), and most digits of the difference's magnitude."""
    cols = max(m, n)
    size = 2 * m + 2 * n + 8  # "P-N=-(N-P):\n"
    for i in range(cols):  # "1t-b-1=d P\n"
        size += 11 + i
    return size, cols


def _mul_bound(m: int, n: int) -> tuple[int, int]:
    """Most bytes of :func:`_mul_steps` for an ``m``-digit times an ``n``-digit value, and most
    digits of the product."""
    size = m + n + 3 + n * (2 * m + 5)  # "x*y:\n", then n lines "x*d=p\n"
    acc = m + 1
    for i in range(1, n):
        add, _ = _add_bound(acc, m + 1 + i)
        size += add
        acc = m + 1 + i  # x times the low i + 1 digits of y is below x * 10**(i + 1)
    return size, m + n


def steps_token_bound(level: ArithmeticLevel) -> int:
    """An upper bound on the tokens of any steps reply at ``level``, its ``<|im_end|>``
    included: the bytes of the longest reply each operator sequence allows (byte-level BPE
    spends at most one token per byte), plus one."""
    worst = 0
    for ops in itertools.product(level.ops, repeat=level.operands - 1):
        terms, signs = _terms([0] * level.operands, list(ops))
        size, digits = 0, []
        for factors in terms:
            d = level.digits
            for _ in factors[1:]:
                block, d = _mul_bound(d, level.digits)
                size += block
            digits.append(d)
        sums = []
        for sign in (1, -1):
            group = [d for d, s in zip(digits, signs) if s == sign]
            if not group:
                continue
            d = group[0]
            for other in group[1:]:
                block, d = _add_bound(d, other)
                size += block
            sums.append(d)
        if len(sums) == 2:
            block, d = _sub_bound(*sums)
            size += block
        size += len("Answer: -") + d
        worst = max(worst, size + 1)
    return worst


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

    ``working`` (:data:`WORKINGS`): ``"none"``, the gold reply is ``Answer: N``; ``"steps"``, the
    prompt asks for the working and the gold reply is :func:`steps_response`. The default token
    budget of ``"steps"`` is :func:`steps_token_bound` rounded up to a multiple of 16 (64 at
    level 2, against 32 without working); settings whose bound exceeds :data:`STEPS_MAX_BUDGET`
    are refused.

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
        working: str = "none",
    ) -> None:
        self.name = "arithmetic"
        if working not in WORKINGS:
            raise RLTaskError(f"task 'arithmetic': working must be one of {', '.join(WORKINGS)}, not {working!r}")
        self.working = working
        self.instruction = STEPS_INSTRUCTION if working == "steps" else INSTRUCTION
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
        if working == "steps":
            bound = steps_token_bound(lv)
            if bound > STEPS_MAX_BUDGET:
                raise RLTaskError(
                    f"task 'arithmetic': working 'steps' supports settings whose longest reply fits "
                    f"{STEPS_MAX_BUDGET} tokens (levels 1-4); digits {lv.digits}, operands {lv.operands}, "
                    f"ops {lv.ops!r} may need {bound}")
            if token_budget is None:
                token_budget = -(-bound // 16) * 16
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
                messages=[{"role": "system", "content": self.instruction},
                          {"role": "user", "content": f"What is {expression}?"}],
                hidden={"answer": evaluate(operands, ops), "expression": expression},
            ))
        return out

    def gold_response(self, prompt: Prompt) -> str:
        if self.working == "steps":
            tokens = prompt.hidden["expression"].split()
            return steps_response([int(x) for x in tokens[::2]], tokens[1::2])
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
