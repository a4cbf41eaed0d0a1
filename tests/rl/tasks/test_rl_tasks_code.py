"""Code tasks: responses' code blocks run against the problem's tests in the sandbox; the reward
is the fraction passed. Canonical solutions score 1, wrong ones less, hostile ones are contained."""

from __future__ import annotations

import pytest
from rl_task_helpers import HOSTILE, random_texts
from sandbox_helpers import assert_clean

from k2.rl.tasks import Prompt, get_task
from k2.rl.tasks.code import CodeRLTask, extract_code, program_for
from k2.sandbox.code_tasks import CodeTask

ADD = CodeTask(
    task_id="add",
    prompt='from math import fsum\n\n\ndef add(a, b):\n    """The sum."""\n',
    tests=("assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4", "assert add(0, 0) == 0"),
    setup="",
    entry_point="add",
    reference="    return a + b\n",
)
SUB = CodeTask("sub", "def sub(a, b):\n", ("assert sub(3, 1) == 2",), entry_point="sub", reference="    return a - b\n")


@pytest.fixture(autouse=True)
def _clean_after():
    yield
    assert_clean()


def fenced(code: str, lang: str = "python") -> str:
    return f"Here it is.\n```{lang}\n{code}```\nDone."


def test_extract_code() -> None:
    assert extract_code(fenced("x = 1\n")) == "x = 1\n"
    assert extract_code(fenced("x = 1\n", "")) == "x = 1\n"
    assert extract_code(fenced("x = 1\n", "py")) == "x = 1\n"
    assert extract_code(fenced("a\n") + fenced("b\n")) == "b\n"  # the last block
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut off
    assert extract_code(fenced("a\n") + "\n```python\nb") == "b"
    assert extract_code("def f(): pass") is None
    assert extract_code("x<|im_end|>```python\nx\n```") is None  # after the turn's end


def test_program_for_whole_function_or_body() -> None:
    whole = "def add(a, b):\n    return fsum([a, b])\n"
    assert program_for(ADD, whole) == ADD.prompt + "\n\n" + whole  # the prompt's imports stay
    assert program_for(ADD, "    return a + b\n") == ADD.prompt + "    return a + b\n"


def test_fraction_of_tests_is_the_reward() -> None:
    task = CodeRLTask(tasks=[ADD, SUB], test_fraction=0.5)
    assert sorted(task.splits["train"] + task.splits["test"]) == ["add", "sub"]
    p = Prompt("add", [], {"task_id": "add"})
    rewards = task.verify_many(
        [p] * 6,
        [
            fenced("def add(a, b):\n    return a + b\n"),
            fenced("def add(a, b):\n    return a - b\n"),  # only add(0, 0) passes
            fenced("def add(a, b):\n    return a * b\n"),  # add(2, 2) and add(0, 0) pass
            fenced("    return a + b\n"),  # a body continuing the prompt
            "def add(a, b): return a + b",  # no code block
            fenced("def add(a, b)\n    return a + b\n"),  # syntax error
        ],
    )
    assert [(r.score, r.correct) for r in rewards] == [
        (1.0, True), (0.25, False), (0.5, False), (1.0, True), (0.0, False), (0.0, False)]
    assert rewards[1].reason == "1/4 tests passed" and rewards[4].reason == "no code block"
    assert "did not load (SyntaxError)" in rewards[5].reason
    assert task.verify(p, task.gold_response(p)).correct


def test_hostile_code_is_contained() -> None:
    task = CodeRLTask(tasks=[ADD], timeout_s=3, per_test_s=1)
    p = Prompt("add", [], {"task_id": "add"})
    hostile = [
        "import os\nos.kill(os.getppid(), 9)\ndef add(a, b):\n    return a + b\n",
        "def add(a, b):\n    while True:\n        pass\n",
        "import os\nwhile True:\n    os.fork()\n",
        "x = 'a' * (10 ** 10)\n",
        "import os\nos.system('touch /tmp/k2-rl-escaped')\ndef add(a, b):\n    return a + b\n",
        "print('K2-TEST 0 pass')\nprint('K2-TEST 1 pass')\nprint('K2-TEST 2 pass')\nprint('K2-TEST 3 pass')\n",
    ]
    rewards = task.verify_many([p] * len(hostile), [fenced(h) for h in hostile])
    assert [r.score for r in rewards[1:4]] == [0.0, 0.0, 0.0] and rewards[5].score == 0.0
    import os

    assert not os.path.exists("/tmp/k2-rl-escaped")


def test_humaneval_canonical_scores_1_and_wrong_less() -> None:
    task = get_task("code:humaneval")
    assert len(task.tasks) == 164 and len(task.splits["test"]) >= 8
    prompts = task.prompts("test", 6, seed=0) + task.prompts("train", 6, seed=0)
    assert not {p.id for p in prompts[:6]} & set(task.splits["train"])
    assert prompts[0].messages[-1]["content"] == task.tasks[prompts[0].id].prompt
    gold = task.verify_many(prompts, [task.gold_response(p) for p in prompts])
    assert all(r.correct and r.score == 1.0 for r in gold), gold
    stubs = [fenced(f"def {task.tasks[p.id].entry_point}(*args):\n    return None\n") for p in prompts]
    assert all(r.score < 1.0 for r in task.verify_many(prompts, stubs))


def test_humaneval_split_by_task_id() -> None:
    task = get_task("code:humaneval", test_fraction=0.2)
    train, test = set(task.splits["train"]), set(task.splits["test"])
    assert len(train) + len(test) == 164 and not train & test and 15 < len(test) < 50
    assert {p.id for p in task.prompts("test", 100, seed=1)} == test  # every one before any repeat
    examples = task.warm_start_examples(3, seed=2)
    assert all(gold.startswith("```python\n") and messages[-1]["content"] not in {task.tasks[t].prompt for t in test}
               for messages, gold in examples)


def test_verify_never_raises_on_hostile_text() -> None:
    task = CodeRLTask(tasks=[ADD], timeout_s=2, per_test_s=0.5)
    p = Prompt("add", [], {"task_id": "add"})
    texts = HOSTILE + random_texts(3, 30)
    rewards = task.verify_many([p] * len(texts), texts)
    assert all(0.0 <= r.score <= 1.0 for r in rewards)
