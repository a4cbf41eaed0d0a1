"""Arithmetic: hand-computed values and rewards, difficulty levels, the held-out split, fuzzing."""

from __future__ import annotations

import ast
import operator

import pytest
from rl_task_helpers import HOSTILE, random_texts

from k2.errors import RLTaskError
from k2.rl.tasks import Prompt
from k2.rl.tasks.arithmetic import FORMAT_CREDIT, LEVELS, ArithmeticTask, evaluate

_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def reference_value(expression: str) -> int:
    """An independent evaluator: Python's own parser decides precedence."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant):
            return node.value
        assert isinstance(node, ast.BinOp)
        return _BIN[type(node.op)](walk(node.left), walk(node.right))

    return walk(ast.parse(expression, mode="eval").body)


def prompt(answer: int) -> Prompt:
    return Prompt("p", [], {"answer": answer, "expression": "?"})


def test_evaluate_by_hand() -> None:
    assert evaluate([2, 3, 4], ["+", "*"]) == 14
    assert evaluate([2, 3, 4], ["*", "-"]) == 2
    assert evaluate([10, 3, 2, 5], ["-", "*", "+"]) == 9
    assert evaluate([7, 0], ["-"]) == 7
    assert evaluate([1, 2, 3, 4], ["-", "-", "-"]) == -8


@pytest.mark.parametrize(
    ("text", "score", "correct"),
    [
        ("Answer: 14", 1.0, True),
        ("2 + 3 * 4 = 14\nAnswer: 14", 1.0, True),
        ("Answer: 2 + 3 * 4 = 14", 1.0, True),
        ("**Answer:** 14.", 1.0, True),
        ("answer: +14", 1.0, True),
        ("Answer: 20", FORMAT_CREDIT, False),
        ("Answer: 14\nAnswer: 20", FORMAT_CREDIT, False),
        ("Answer: fourteen", 0.0, False),
        ("Answer: 14.5", 0.0, False),
        ("14", 0.0, False),
        ("", 0.0, False),
    ],
)
def test_reward_scheme(text: str, score: float, correct: bool) -> None:
    reward = ArithmeticTask().verify(prompt(14), text)
    assert (reward.score, reward.correct) == (score, correct), reward


def test_negative_and_comma_answers() -> None:
    task = ArithmeticTask()
    assert task.verify(prompt(-1234), "Answer: -1,234").correct
    assert task.verify(prompt(-1234), "Answer: -1234").correct
    assert task.verify(prompt(-1234), "Answer: 1234").score == FORMAT_CREDIT


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_levels_generate_what_they_say(level: int) -> None:
    lv = LEVELS[level]
    task = ArithmeticTask(level)
    prompts = task.prompts("train", 40, seed=1)
    assert len({p.id for p in prompts}) == len(prompts)
    for p in prompts:
        expression = p.hidden["expression"]
        assert p.messages[-1] == {"role": "user", "content": f"What is {expression}?"}
        assert p.hidden["answer"] == reference_value(expression)
        tokens = expression.split()
        numbers, ops = tokens[::2], tokens[1::2]
        assert len(numbers) == lv.operands and all(len(x) <= lv.digits for x in numbers)
        assert set(ops) <= set(lv.ops)
        assert task.verify(p, task.gold_response(p)).correct


def test_custom_level_and_errors() -> None:
    task = ArithmeticTask(1, digits=3, operands=4, ops="*")
    p = task.prompts("train", 1, seed=0)[0]
    assert p.hidden["expression"].count("*") == 3
    for kwargs, field in [({"level": 0}, "level"), ({"digits": 0}, "digits"), ({"operands": 1}, "operands"),
                          ({"ops": "/"}, "ops"), ({"ops": ""}, "ops")]:
        with pytest.raises(RLTaskError, match=field):
            ArithmeticTask(**kwargs)


@pytest.mark.parametrize("level", [1, 2, 4])
def test_train_and_test_never_overlap(level: int) -> None:
    task = ArithmeticTask(level)
    train = {p.hidden["expression"] for s in range(3) for p in task.prompts("train", 300, seed=s)}
    test = {p.hidden["expression"] for s in range(3) for p in task.prompts("test", 100, seed=s)}
    assert train and test and not train & test
    assert task.prompts("test", 5, seed=9) == task.prompts("test", 5, seed=9)
    assert task.prompts("test", 5, seed=9) != task.prompts("test", 5, seed=10)


def test_level_1_test_split_is_small_and_repeats() -> None:
    # level 1: 10 x 10 operand pairs x 2 operators = 200 problems, about 10 % held out
    task = ArithmeticTask(1)
    prompts = task.prompts("test", 100, seed=0)
    distinct = {p.id for p in prompts}
    assert 5 <= len(distinct) <= 40 and len(prompts) == 100


def test_warm_start_examples_are_train_gold() -> None:
    task = ArithmeticTask(3)
    examples = task.warm_start_examples(20, seed=4)
    test = {p.hidden["expression"] for p in task.prompts("test", 200, seed=0)}
    for messages, gold in examples:
        expression = messages[-1]["content"].removeprefix("What is ").removesuffix("?")
        assert expression not in test
        assert gold == f"Answer: {reference_value(expression)}"


def test_verify_never_raises() -> None:
    task = ArithmeticTask()
    p = task.prompts("train", 1)[0]
    for text in HOSTILE + random_texts(0, 300):
        reward = task.verify(p, text)
        assert 0.0 <= reward.score <= 1.0 and isinstance(reward.reason, str)
    assert task.verify(p, None).score == 0.0  # type: ignore[arg-type]
    assert task.verify(p, "Answer: " + "9" * 5000).score == 0.0
