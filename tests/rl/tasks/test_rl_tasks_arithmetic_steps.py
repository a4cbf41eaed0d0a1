"""Arithmetic with worked steps (``working="steps"``): hand-written replies, an independent check
of every line's arithmetic, the token budget under a trained tokenizer, and ``k2 rl`` wiring."""

from __future__ import annotations

import ast
import operator
import random
import re

import pytest

from k2.errors import ConfigError, RLTaskError
from k2.rl.tasks.arithmetic import (
    INSTRUCTION,
    LEVELS,
    STEPS_INSTRUCTION,
    ArithmeticLevel,
    ArithmeticTask,
    steps_token_bound,
)
from k2.rl.tasks.base import DEFAULT_TOKEN_BUDGETS, Prompt

STEPS_LEVELS = [1, 2, 3, 4]

HEADER = re.compile(r"(\d+)([-+*])(\d+)(=-\((\d+)-(\d+)\))?:")
ADD_COLUMN = re.compile(r"(\d)\+(\d)(\+1)?=(\d+) (\d+)")
SUB_COLUMN = re.compile(r"(\d+)-(\d)(-1)?=(\d) (\d+)")
PRODUCT = re.compile(r"(\d+)\*(\d)=(\d+)")
ANSWER = re.compile(r"Answer: (-?\d+)")


def digit(n: int, i: int) -> int:
    return n // 10**i % 10


def check_reply(expression: str, text: str) -> int:
    """Re-derive every line of a steps reply with Python ints, and return its answer.

    Checks that each column's digits are the operands' digits, right to left; each column's sum
    or difference, carry and borrow; that the running digits end as the block's value; each partial
    product; that a multiplication's partials add up to the product; and that every number a
    header uses was given in the expression or computed by an earlier line.
    """
    lines = text.split("\n")
    known = {int(x) for x in expression.split()[::2]}
    pos = 0

    def column_block(x: int, op: str, y: int) -> int:
        nonlocal pos
        cols = len(str(max(x, y)))
        carry, partial = 0, ""
        for i in range(cols):
            line = lines[pos]
            pos += 1
            if op == "+":
                m = ADD_COLUMN.fullmatch(line)
                assert m, line
                a, b, s = int(m[1]), int(m[2]), int(m[4])
                assert (a, b) == (digit(x, i), digit(y, i)), line
                assert bool(m[3]) == bool(carry) and s == a + b + carry, line
                carry = s // 10
                expected = (str(s) if i == cols - 1 else str(s % 10)) + partial
            else:
                m = SUB_COLUMN.fullmatch(line)
                assert m, line
                top, b, d = int(m[1]), int(m[2]), int(m[4])
                assert top in (digit(x, i), digit(x, i) + 10) and b == digit(y, i), line
                assert bool(m[3]) == bool(carry) and d == top - b - carry and 0 <= d <= 9, line
                assert (top >= 10) == (digit(x, i) - b - carry < 0), line
                carry = int(top >= 10)
                expected = str(d) + partial
            assert m[5] == expected, line
            partial = m[5]
        assert carry == 0 or op == "+"
        value = x + y if op == "+" else x - y
        assert int(partial) == value
        return value

    def block() -> int:
        nonlocal pos
        m = HEADER.fullmatch(lines[pos])
        assert m, lines[pos]
        pos += 1
        x, op, y = int(m[1]), m[2], int(m[3])
        assert x in known and y in known, lines[pos - 1]
        if op == "+":
            value = column_block(x, "+", y)
        elif op == "-" and m[4] is None:
            assert x >= y
            value = column_block(x, "-", y)
        elif op == "-":
            assert x < y and (int(m[5]), int(m[6])) == (y, x), lines[pos - 1]
            value = -column_block(y, "-", x)
        else:
            partials = []
            for i in range(len(str(y))):
                p = PRODUCT.fullmatch(lines[pos])
                assert p and int(p[1]) == x and int(p[2]) == digit(y, i) and int(p[3]) == x * digit(y, i)
                pos += 1
                partials.append(int(p[3]) * 10**i)
            known.update(partials)
            total = partials[0]
            for part in partials[1:]:
                assert HEADER.fullmatch(lines[pos])[0] == f"{total}+{part}:", lines[pos]
                total = block()
            assert total == x * y
            value = total
        known.add(abs(value))
        return value

    value = None
    while pos < len(lines) - 1:
        value = block()
    answer = ANSWER.fullmatch(lines[-1])
    assert answer and pos == len(lines) - 1, text
    assert int(answer[1]) == value, text
    return int(answer[1])


def steps_task(level: int) -> ArithmeticTask:
    return ArithmeticTask(level, working="steps")


def prompt_for(expression: str) -> Prompt:
    """A prompt for ``expression``, its value from Python's own parser (``*`` first)."""
    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant):
            return node.value
        assert isinstance(node, ast.BinOp)
        return {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}[type(node.op)](
            walk(node.left), walk(node.right))

    value = walk(ast.parse(expression, mode="eval").body)
    return Prompt("p", [], {"answer": value, "expression": expression})


@pytest.mark.parametrize(
    ("expression", "reply"),
    [
        ("47 + 38", "47+38:\n7+8=15 5\n4+3+1=8 85\nAnswer: 85"),
        ("52 - 67", "52-67=-(67-52):\n7-2=5 5\n6-5=1 15\nAnswer: -15"),
        ("9 - 3", "9-3:\n9-3=6 6\nAnswer: 6"),
        ("100 - 99", "100-99:\n10-9=1 1\n10-9-1=0 01\n1-0-1=0 001\nAnswer: 1"),
        ("12 * 34", "12*34:\n12*4=48\n12*3=36\n48+360:\n8+0=8 8\n4+6=10 08\n0+3+1=4 408\nAnswer: 408"),
        ("5 - 6 - 7", "6+7:\n6+7=13 13\n5-13=-(13-5):\n13-5=8 8\n1-0-1=0 08\nAnswer: -8"),
    ],
)
def test_steps_replies_by_hand(expression: str, reply: str) -> None:
    task = steps_task(4)
    p = prompt_for(expression)
    assert task.gold_response(p) == reply
    assert check_reply(expression, reply) == p.hidden["answer"]
    assert task.verify(p, reply).score == 1.0


def level_problems(level: int, n: int = 1500) -> list[Prompt]:
    """Every problem of levels 1-2; at 3-4, ``n`` of each split plus all-nines and zero edges."""
    task = steps_task(level)
    lv = LEVELS[level]
    if level <= 2:
        exprs = [f"{a} {op} {b}" for a in range(10**lv.digits) for b in range(10**lv.digits) for op in lv.ops]
    else:
        prompts = task.prompts("train", n, seed=1) + task.prompts("test", n // 5, seed=1)
        exprs = [p.hidden["expression"] for p in prompts]
        rng = random.Random(level)
        top = 10**lv.digits - 1
        for _ in range(300):
            operands = [rng.choice([0, 1, top, top - 1, 10 ** (lv.digits - 1)]) for _ in range(lv.operands)]
            ops = [rng.choice(lv.ops) for _ in range(lv.operands - 1)]
            exprs.append(" ".join([str(operands[0])] + [f"{o} {x}" for o, x in zip(ops, operands[1:])]))
    return [prompt_for(e) for e in exprs]


@pytest.mark.parametrize("level", STEPS_LEVELS)
def test_steps_replies_are_correct_line_by_line(level: int) -> None:
    task = steps_task(level)
    for p in level_problems(level):
        reply = task.gold_response(p)
        assert check_reply(p.hidden["expression"], reply) == p.hidden["answer"], reply
        assert task.verify(p, reply).score == 1.0


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained like the RL tests' (tests/rl/test_rl_job.py) on plain arithmetic
    chats: the pretrained tiny model's tokenizer never saw the steps format either."""
    from k2.data.chat import render_chat
    from k2.data.tokenizer import train_tokenizer

    task = ArithmeticTask()
    texts = [render_chat([*m, {"role": "assistant", "content": g}]) for m, g in task.warm_start_examples(200)]
    return train_tokenizer(texts, 400)


@pytest.mark.parametrize("level", STEPS_LEVELS)
def test_longest_steps_reply_fits_the_budget(level: int, tokenizer) -> None:
    task = steps_task(level)
    replies = [task.gold_response(p) for p in level_problems(level)]
    longest = max(len(tokenizer.encode(r).ids) for r in replies)
    most_bytes = max(len(r.encode()) for r in replies)
    # + 1: <|im_end|> must fit too; the bound is on bytes, which no byte-level BPE exceeds
    assert longest + 1 <= most_bytes + 1 <= steps_token_bound(task.level) <= task.token_budget
    assert task.token_budget == {1: 48, 2: 64, 3: 96, 4: 224}[level]
    assert ArithmeticTask(level, working="steps", token_budget=40).token_budget == 40


def test_steps_prompts_ask_for_working_and_keep_the_problems() -> None:
    plain, steps = ArithmeticTask(2), steps_task(2)
    a, b = plain.prompts("test", 20, seed=3), steps.prompts("test", 20, seed=3)
    assert [p.hidden for p in a] == [p.hidden for p in b] and [p.id for p in a] == [p.id for p in b]
    assert {p.messages[0]["content"] for p in a} == {INSTRUCTION}
    assert {p.messages[0]["content"] for p in b} == {STEPS_INSTRUCTION}
    assert plain.gold_response(a[0]) == f"Answer: {a[0].hidden['answer']}"
    assert plain.token_budget == DEFAULT_TOKEN_BUDGETS["arithmetic"]
    messages, gold = steps.warm_start_examples(1, seed=0)[0]
    assert messages[0]["content"] == STEPS_INSTRUCTION and "\n" in gold


def test_reward_reads_only_the_answer_line() -> None:
    task = steps_task(2)
    p = prompt_for("47 + 38")
    assert task.verify(p, "7+8=99 wrong\nAnswer: 85").score == 1.0
    assert task.verify(p, "47+38:\n7+8=15 5\n4+3+1=8 85\nAnswer: 84").score == 0.1
    assert task.verify(p, "47+38:\n7+8=15 5\n4+3+1=8 85").score == 0.0


def test_steps_errors_name_the_task_and_field() -> None:
    with pytest.raises(RLTaskError, match="'arithmetic'.*working"):
        ArithmeticTask(2, working="verbose")
    for level in (5, 6):
        with pytest.raises(RLTaskError, match="'arithmetic'.*working 'steps'"):
            ArithmeticTask(level, working="steps")


def test_k2_rl_takes_task_working() -> None:
    from k2.cli import build_parser
    from k2.rl.config import RL_FLAGS, RLConfig
    from k2.rl.loop import build_task
    from k2.train.resume import command_config

    def parse(*flags: str) -> RLConfig:
        args = build_parser().parse_args(["rl", "--init", "x", *flags])
        config, _ = command_config(args, {name: getattr(args, name) for name in RL_FLAGS}, RLConfig)
        assert isinstance(config, RLConfig)
        return config

    assert parse().task_working == "none"
    config = parse("--task-level", "3", "--task-working", "steps")
    config.validate()
    task = build_task(config)
    assert isinstance(task, ArithmeticTask) and task.working == "steps" and task.token_budget == 96
    assert task.prompts("train", 1)[0].messages[0]["content"] == STEPS_INSTRUCTION
    assert build_task(parse()).working == "none"
    # the stored settings carry it into a resumed run (resume_config reads them as the base)
    assert RLConfig.resolve(None, base=config.to_dict()).task_working == "steps"
    with pytest.raises(ConfigError, match="task_working"):
        parse("--task-working", "verbose").validate()
    with pytest.raises(ConfigError, match="'countdown'"):
        build_task(parse("--task", "countdown", "--task-working", "steps"))
    with pytest.raises(RLTaskError, match="'arithmetic'.*steps"):
        build_task(parse("--task-level", "5", "--task-working", "steps"))


def test_k2_rl_takes_task_digits() -> None:
    """``--task-digits`` overrides the level's operand digits (a longer sum than the warm start
    saw), with the steps budget recomputed; only arithmetic takes it."""
    from k2.cli import build_parser
    from k2.rl.config import RL_FLAGS, RLConfig
    from k2.rl.loop import build_task
    from k2.train.resume import command_config

    def parse(*flags: str) -> RLConfig:
        args = build_parser().parse_args(["rl", "--init", "x", *flags])
        config, _ = command_config(args, {name: getattr(args, name) for name in RL_FLAGS}, RLConfig)
        assert isinstance(config, RLConfig)
        config.validate()
        return config

    assert parse().task_digits == 0 and build_task(parse()).level.digits == 2
    task = build_task(parse("--task-level", "2", "--task-digits", "3", "--task-working", "steps"))
    assert task.level == ArithmeticLevel(3, 2, "+-")
    assert task.token_budget == -(-steps_token_bound(task.level) // 16) * 16 > 64
    for p in task.prompts("test", 50, seed=1):
        operands = [int(x) for x in p.hidden["expression"].split()[::2]]
        assert all(0 <= x < 1000 for x in operands)
        assert task.verify(p, task.gold_response(p)).correct
    assert any(int(x) >= 100 for p in task.prompts("test", 50, seed=1) for x in p.hidden["expression"].split()[::2])
    with pytest.raises(ConfigError, match="task_digits"):
        parse("--task-digits", "-1")
    with pytest.raises(ConfigError, match="task_digits.*'countdown'"):
        build_task(parse("--task", "countdown", "--task-digits", "3"))
    with pytest.raises(RLTaskError, match="'arithmetic'.*digits"):
        build_task(parse("--task-digits", "12"))
