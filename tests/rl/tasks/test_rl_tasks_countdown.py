"""Countdown: the safe evaluator by hand, the reward scheme, hostile answers, and every generated
puzzle solvable by an independent brute-force solver."""

from __future__ import annotations

from fractions import Fraction
from itertools import combinations

import pytest
from rl_task_helpers import HOSTILE, random_texts

from k2.rl.tasks import Prompt
from k2.rl.tasks.countdown import FORMAT_CREDIT, LEVELS, CountdownTask, ExpressionError, evaluate_expression


def reachable(numbers: list[int]) -> set[Fraction]:
    """Every value of an expression over a sub-multiset of ``numbers`` (each at most once) with
    + - * / (exact): combine any two values into one, recursively, recording each value seen."""
    seen: set[Fraction] = set()
    memo: set[tuple[Fraction, ...]] = set()

    def search(values: tuple[Fraction, ...]) -> None:
        key = tuple(sorted(values))
        if key in memo:
            return
        memo.add(key)
        seen.update(values)
        for i, j in combinations(range(len(values)), 2):
            a, b = values[i], values[j]
            rest = tuple(v for k, v in enumerate(values) if k not in (i, j))
            results = {a + b, a - b, b - a, a * b}
            if b:
                results.add(a / b)
            if a:
                results.add(b / a)
            for r in results:
                search(rest + (r,))

    search(tuple(Fraction(x) for x in numbers))
    return seen


def solvable(numbers: list[int], target: int) -> bool:
    """Whether some expression over ``numbers`` reaches ``target``: the same search as
    :func:`reachable`, stopping at the first hit."""
    goal = Fraction(target)
    failed: set[tuple[Fraction, ...]] = set()

    def search(values: tuple[Fraction, ...]) -> bool:
        if goal in values:
            return True
        key = tuple(sorted(values))
        if key in failed:
            return False
        for i, j in combinations(range(len(values)), 2):
            a, b = values[i], values[j]
            rest = tuple(v for k, v in enumerate(values) if k not in (i, j))
            results = {a + b, a - b, b - a, a * b}
            if b:
                results.add(a / b)
            if a:
                results.add(b / a)
            if any(search(rest + (r,)) for r in results):
                return True
        failed.add(key)
        return False

    return search(tuple(Fraction(x) for x in numbers))


def test_brute_force_solver_by_hand() -> None:
    assert solvable([3, 3, 8, 8], 24) and not solvable([1, 1, 1, 1], 24) and not solvable([5, 5, 5, 5], 1000)
    assert solvable([1, 2, 3, 4, 5, 6], 720) and not solvable([1, 1, 1, 1, 1, 1], 100)
    assert Fraction(24) in reachable([4, 6, 1])  # 4 * 6 (1 unused)
    assert Fraction(24) in reachable([3, 3, 8, 8])  # 8 / (3 - 8 / 3)
    assert Fraction(7) not in reachable([1, 1])  # 1+1, 1-1, 1*1, 1/1, 0, 1 only
    assert reachable([2, 3]) == {Fraction(x) for x in (2, 3, 5, -1, 1, 6)} | {Fraction(2, 3), Fraction(3, 2)}


@pytest.mark.parametrize(
    ("text", "numbers", "value"),
    [
        ("(25 - 5) * 4", [25, 5, 4], Fraction(80)),
        ("8 / (3 - 8 / 3)", [3, 3, 8, 8], Fraction(24)),
        ("7", [7, 2], Fraction(7)),
        ("100 / 7", [100, 7], Fraction(100, 7)),
        (" ((2)) + 3 ", [2, 3, 9], Fraction(5)),
        ("(" * 140 + "2" + ")" * 140, [2], Fraction(2)),
        ("5 - 5 - 5", [5, 5, 5], Fraction(-5)),
    ],
)
def test_evaluate_by_hand(text: str, numbers: list[int], value: Fraction) -> None:
    assert evaluate_expression(text, numbers) == value


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("2 + 2", "beyond the given numbers"),  # 2 given once
        ("2 + 11", "beyond the given numbers"),
        ("-3 + 5", "UnaryOp is not allowed"),
        ("2 ** 3", "BinOp is not allowed"),
        ("2 // 3", "BinOp is not allowed"),
        ("3 % 2", "BinOp is not allowed"),
        ("__import__('os')", "Call is not allowed"),
        ("(lambda: 2)()", "Call is not allowed"),
        ("2.0 + 3", "not a non-negative integer"),
        ("True + 2", "not a non-negative integer"),
        ("'2' + 3", "not a non-negative integer"),
        ("x + 2", "Name is not allowed"),
        ("[2][0]", "Subscript is not allowed"),
        ("2 +", "does not parse"),
        ("2; 3", "does not parse"),
        ("(" * 400 + "2" + ")" * 400, "longer than"),
    ],
)
def test_evaluate_refuses(text: str, match: str) -> None:
    with pytest.raises(ExpressionError, match=match):
        evaluate_expression(text, [2, 3, 5])


def test_division_by_zero_is_well_formed_but_wrong() -> None:
    with pytest.raises(ZeroDivisionError):
        evaluate_expression("3 / (5 - 5)", [3, 5, 5])
    p = Prompt("p", [], {"numbers": [3, 5, 5], "target": 15, "solution": "3 * 5"})
    reward = CountdownTask().verify(p, "Answer: 3 / (5 - 5)")
    assert (reward.score, reward.correct, reward.reason) == (FORMAT_CREDIT, False, "division by zero")


@pytest.mark.parametrize(
    ("text", "score", "correct"),
    [
        ("Answer: (25 - 5) * 4", 1.0, True),
        ("I try 25 - 5 = 20, times 4.\nAnswer: (25 - 5) * 4 = 80", 1.0, True),
        ("Answer: 4 * (25 - 5).", 1.0, True),
        ("Answer: 25 * 4 - 5", FORMAT_CREDIT, False),  # 95
        ("Answer: 25 * 4 - 5 = 80", FORMAT_CREDIT, False),  # the claim is not believed
        ("Answer: 20 * 4", 0.0, False),  # 20 is not given
        ("Answer: 80", 0.0, False),
        ("Answer: (25 - 5) * 4 * 1", 0.0, False),
        ("(25 - 5) * 4", 0.0, False),  # no answer line
    ],
)
def test_reward_scheme(text: str, score: float, correct: bool) -> None:
    p = Prompt("p", [], {"numbers": [25, 5, 4, 4], "target": 80, "solution": "(25 - 5) * 4"})
    reward = CountdownTask().verify(p, text)
    assert (reward.score, reward.correct) == (score, correct), reward


@pytest.mark.parametrize(
    ("level", "count"),
    [(1, 25), (2, 25), (3, 25), (4, 25), pytest.param(5, 3, marks=pytest.mark.slow)],  # six numbers: seconds each
)
def test_generated_puzzles_are_solvable_and_gold_scores_1(level: int, count: int) -> None:
    lv = LEVELS[level]
    task = CountdownTask(level)
    for p in task.prompts("train", count, seed=level) + task.prompts("test", 2, seed=level):
        numbers, target = p.hidden["numbers"], p.hidden["target"]
        assert len(numbers) == lv.count and all(1 <= x <= lv.max_number for x in numbers)
        assert 1 <= target <= lv.max_target and target not in numbers
        assert p.messages[-1]["content"] == f"Numbers: {', '.join(map(str, numbers))}. Target: {target}."
        assert solvable(numbers, target)
        assert task.verify(p, task.gold_response(p)).correct


def test_train_and_test_never_overlap() -> None:
    task = CountdownTask(1)
    key = lambda p: (tuple(sorted(p.hidden["numbers"])), p.hidden["target"])  # noqa: E731
    train = {key(p) for s in range(3) for p in task.prompts("train", 300, seed=s)}
    test = {key(p) for s in range(3) for p in task.prompts("test", 60, seed=s)}
    assert train and test and not train & test


def test_verify_never_raises() -> None:
    task = CountdownTask(3)
    p = task.prompts("train", 1)[0]
    for text in HOSTILE + random_texts(1, 300):
        reward = task.verify(p, text)
        assert 0.0 <= reward.score <= 1.0 and isinstance(reward.reason, str)
