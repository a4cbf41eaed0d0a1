"""Countdown: reach a target from given numbers with ``+ - * /`` and parentheses, each number
used at most once (docs/rl-tasks.md, "Countdown").

The policy ends its reply with a line ``Answer: EXPR`` (``EXPR = TARGET`` is accepted too).
The expression is parsed with :mod:`ast`, never evaluated by Python: only non-negative integer
literals, the four binary operators and parentheses are allowed; each literal must be one of the
given numbers, used no more often than given; the value is computed exactly with
:class:`fractions.Fraction`. Reward: 1.0 when the value is the target; :data:`FORMAT_CREDIT`
(0.1) for a well-formed expression over the given numbers with another value (or a division by
zero); 0.0 otherwise.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
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
MAX_EXPRESSION_CHARS = 300
"""Longer answers are not parsed (a six-number expression needs well under 100 characters)."""

INSTRUCTION = (
    "Combine the given numbers with + - * / and parentheses to reach the target; use each number at "
    "most once. End your reply with a line 'Answer: EXPRESSION'."
)


@dataclass(frozen=True)
class CountdownLevel:
    """``count`` numbers uniform in [1, ``max_number``]; the target, in [1, ``max_target``], is
    the value of a random expression over ``min_used``..``count`` of them."""

    count: int
    max_number: int
    max_target: int
    min_used: int


LEVELS: dict[int, CountdownLevel] = {
    1: CountdownLevel(3, 10, 100, 2),
    2: CountdownLevel(3, 25, 200, 3),
    3: CountdownLevel(4, 25, 500, 3),
    4: CountdownLevel(4, 100, 1000, 4),
    5: CountdownLevel(6, 100, 1000, 4),
}
"""Difficulty levels, easiest first (level 5 is the television game's size)."""

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class ExpressionError(ValueError):
    """The answer is not an expression over the given numbers (the message says why)."""


def _value(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Constant):
        if type(node.value) is not int or node.value < 0:
            raise ExpressionError(f"literal {node.value!r} is not a non-negative integer")
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _value(node.left, used), _value(node.right, used)
        op = type(node.op)
        if op is ast.Add:
            return left + right
        if op is ast.Sub:
            return left - right
        if op is ast.Mult:
            return left * right
        if right == 0:
            raise ZeroDivisionError("division by zero")
        return left / right
    raise ExpressionError(f"{type(node).__name__} is not allowed (only numbers, + - * / and parentheses)")


def evaluate_expression(text: str, numbers: list[int]) -> Fraction:
    """The exact value of ``text``, an expression over ``numbers`` (each at most once).

    Raises:
        ExpressionError: not such an expression (syntax, a forbidden construct, a number not
            given or used too often, too long).
        ZeroDivisionError: a well-formed expression divides by zero.
    """
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise ExpressionError(f"does not parse ({type(err).__name__})") from None
    used: list[int] = []
    try:
        value = _value(tree.body, used)
    except ZeroDivisionError:
        _check_numbers(used, numbers)
        raise
    _check_numbers(used, numbers)
    return value


def _check_numbers(used: list[int], numbers: list[int]) -> None:
    extra = Counter(used) - Counter(numbers)
    if extra:
        raise ExpressionError(f"uses {sorted(extra.elements())} beyond the given numbers")


def _random_expression(rng: random.Random, numbers: list[int]) -> tuple[str, Fraction]:
    """A random full binary expression over ``numbers`` (in the given order of use)."""
    items: list[tuple[str, Fraction, bool]] = [(str(x), Fraction(x), True) for x in numbers]
    while len(items) > 1:
        i = rng.randrange(len(items) - 1)
        (ls, lv, latom), (rs, rv, ratom) = items[i], items[i + 1]
        op = rng.choice("+-*/")
        if op == "/" and rv == 0:
            op = "+"
        value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else lv}[op]
        text = f"{ls if latom else '(' + ls + ')'} {op} {rs if ratom else '(' + rs + ')'}"
        items[i:i + 2] = [(text, value, False)]
    return items[0][0], items[0][1]


class CountdownTask(Task):
    """Countdown puzzles at a difficulty ``level`` (:data:`LEVELS`). Every generated puzzle is
    solvable: the target is the value of a hidden expression, kept as the gold answer.

    Hidden data: ``numbers``, ``target``, ``solution``. Split key: the sorted numbers and target.
    """

    kind = "countdown"

    def __init__(
        self,
        level: int = 1,
        *,
        test_fraction: float = DEFAULT_TEST_FRACTION,
        token_budget: int | None = None,
    ) -> None:
        self.name = "countdown"
        if level not in LEVELS:
            raise RLTaskError(f"task 'countdown': level must be one of {sorted(LEVELS)}, not {level!r}")
        self.level = LEVELS[level]
        self.test_fraction = check_fraction(self.name, test_fraction)
        self._init_budget(token_budget)

    def _draw(self, rng: random.Random) -> tuple[str, tuple[list[int], int, str]]:
        lv = self.level
        while True:
            numbers = [rng.randint(1, lv.max_number) for _ in range(lv.count)]
            used = rng.sample(numbers, rng.randint(lv.min_used, lv.count))
            text, value = _random_expression(rng, used)
            if value.denominator == 1 and 1 <= value <= lv.max_target and int(value) not in numbers:
                target = int(value)
                return f"{sorted(numbers)}->{target}", (numbers, target, text)

    def prompts(self, split: str, n: int, seed: int = 0) -> list[Prompt]:
        problems = sample_split(self.name, split, n, seed, self._draw, self.test_fraction)
        out = []
        for numbers, target, solution in problems:
            shown = ", ".join(map(str, numbers))
            out.append(Prompt(
                id=f"countdown/{'-'.join(map(str, sorted(numbers)))}/{target}",
                messages=[{"role": "system", "content": INSTRUCTION},
                          {"role": "user", "content": f"Numbers: {shown}. Target: {target}."}],
                hidden={"numbers": list(numbers), "target": target, "solution": solution},
            ))
        return out

    def gold_response(self, prompt: Prompt) -> str:
        return f"Answer: {prompt.hidden['solution']}"

    def verify(self, prompt: Prompt, response_text: str) -> Reward:
        return safe_verify(lambda: self._verify(prompt, response_text))

    def _verify(self, prompt: Prompt, response_text: Any) -> Reward:
        if not isinstance(response_text, str):
            return Reward(0.0, False, "response is not text")
        line = answer_line(response_text)
        if line is None:
            return Reward(0.0, False, "no answer line")
        head, eq, tail = line.rpartition("=")
        if eq and tail.strip().lstrip("+-").isdigit():  # "EXPR = TARGET": judge EXPR
            line = head
        try:
            value = evaluate_expression(line, prompt.hidden["numbers"])
        except ExpressionError as err:
            return Reward(0.0, False, f"bad expression: {err}")
        except ZeroDivisionError:
            return Reward(FORMAT_CREDIT, False, "division by zero")
        if value == prompt.hidden["target"]:
            return Reward(1.0, True, "correct")
        return Reward(FORMAT_CREDIT, False, f"value {value} is not the target")
