"""The verifiable-reward task interface (docs/rl-tasks.md): prompts, a verifier, warm-start
examples and a token budget; the held-out split; the ``Answer: ...`` line format.

A :class:`Task` turns a seed into prompts (OpenAI-format chat messages plus the hidden data its
verifier needs) and scores a sampled response with a :class:`Reward`. Model output is untrusted:
:meth:`Task.verify` never raises because of the response text, whatever it holds.

Train and test prompts never overlap: every prompt has a *split key* (the problem's canonical
text, or a task id) and :func:`split_of` assigns it to ``"test"`` when a hash of the task's name
and the key falls below the task's ``test_fraction`` — so membership depends on the problem
alone, not on which seed or call produced it.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from k2.errors import RLTaskError

SPLITS = ("train", "test")

DEFAULT_TEST_FRACTION = 0.1
"""Share of each task's problem space held out for evaluation (by hash, see :func:`split_of`)."""

DEFAULT_TOKEN_BUDGETS: dict[str, int] = {
    "arithmetic": 32,
    "countdown": 64,
    "reasoning": 512,
    "code": 512,
    "agentic": 256,
}
"""Most response tokens per task kind (for an agentic task: per assistant turn). K2's report
gives no numbers; these fit the answer formats below with room for a short working."""

IM_END = "<|im_end|>"


@dataclass(frozen=True)
class Prompt:
    """One problem as the policy sees it, with what the verifier needs.

    Attributes:
        id: stable across runs (``arithmetic/2/17+5``, ``HumanEval/3``, ``bank-lost-card@0``).
        messages: OpenAI-format chat messages; the policy writes the next assistant turn.
        hidden: data for the verifier only (the gold answer, the tests); never shown.
        tools: OpenAI-format tool specs the policy may call (agentic tasks), else None.
    """

    id: str
    messages: list[dict[str, Any]]
    hidden: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Reward:
    """A verifier's verdict: ``score`` in [0, 1], whether the response is fully ``correct``, and
    a short ``reason`` (``"correct"``, ``"wrong answer 12"``, ``"no answer line"``, ...)."""

    score: float
    correct: bool
    reason: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"reward score must be in [0, 1], got {self.score}")


def split_point(task: str, key: str) -> float:
    """A stable hash of ``task`` and ``key`` (SHA-256) read as a number in [0, 1)."""
    digest = hashlib.sha256(f"{task}\x00{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(task: str, key: str, test_fraction: float) -> str:
    """``"test"`` or ``"train"`` for the problem ``key`` of ``task``: held out when its
    :func:`split_point` is below ``test_fraction``."""
    return "test" if split_point(task, key) < test_fraction else "train"


def split_ids(task: str, ids: Sequence[str], test_fraction: float) -> dict[str, list[str]]:
    """A finite set of ids split by :func:`split_of`, except that with two or more ids neither
    split is left empty: the id with the lowest split point is then held out, or the one with
    the highest kept for training."""
    test = [i for i in ids if split_of(task, i, test_fraction) == "test"]
    if len(ids) >= 2 and not test:
        test = [min(ids, key=lambda i: split_point(task, i))]
    elif len(ids) >= 2 and len(test) == len(ids):
        top = max(ids, key=lambda i: split_point(task, i))
        test = [i for i in ids if i != top]
    held = set(test)
    return {"train": [i for i in ids if i not in held], "test": test}


def split_rng(task: str, split: str, seed: int) -> random.Random:
    """A generator for ``(task, split, seed)``, seeded from a string (so stable across
    processes, unlike ``hash``)."""
    return random.Random(f"{task}\x00{split}\x00{seed}")


def check_split(task: str, split: str) -> None:
    if split not in SPLITS:
        raise RLTaskError(f"task {task!r}: split must be one of {', '.join(SPLITS)}, not {split!r}")


def check_count(task: str, n: Any) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise RLTaskError(f"task {task!r}: the number of prompts must be an integer >= 0, not {n!r}")


def check_fraction(task: str, test_fraction: Any) -> float:
    if not isinstance(test_fraction, (int, float)) or isinstance(test_fraction, bool) or not 0 < test_fraction < 1:
        raise RLTaskError(f"task {task!r}: test_fraction must be a number in (0, 1), not {test_fraction!r}")
    return float(test_fraction)


def sample_split(
    task: str,
    split: str,
    n: int,
    seed: int,
    draw: Callable[[random.Random], tuple[Hashable, Any]],
    test_fraction: float,
    attempts_per_prompt: int = 200,
) -> list[Any]:
    """``n`` problems of ``split`` drawn with ``draw(rng) -> (key, problem)``: distinct keys while
    the split has them, then (a split smaller than ``n``) its problems again in the same order."""
    check_split(task, split)
    check_count(task, n)
    rng = split_rng(task, split, seed)
    seen: dict[Hashable, Any] = {}
    budget = attempts_per_prompt * n + 2000
    while len(seen) < n and budget > 0:
        budget -= 1
        key, problem = draw(rng)
        if key not in seen and split_of(task, str(key), test_fraction) == split:
            seen[key] = problem
    found = list(seen.values())
    if n and not found:
        raise RLTaskError(f"task {task!r}: found no {split} problem in {attempts_per_prompt * n + 2000} draws; "
                          "widen the difficulty or change test_fraction")
    return [found[i % len(found)] for i in range(n)]


def strip_turn(text: str) -> str:
    """The assistant turn's text up to its first ``<|im_end|>`` (what follows is not the turn)."""
    return text.split(IM_END, 1)[0]


_ANSWER_LINE = re.compile(r"^[ \t*_#>]*answer[ \t*_]*:[ \t*_]*(.*)$", re.IGNORECASE | re.MULTILINE)


def answer_line(text: str) -> str | None:
    """The text after the last ``Answer:`` that starts a line (case-insensitive; markdown
    emphasis such as ``**Answer:**`` allowed), stripped of emphasis and a final period; None
    when there is none."""
    last = None
    for match in _ANSWER_LINE.finditer(strip_turn(text)):
        last = match.group(1)
    if last is None:
        return None
    return last.strip().strip("*_`").strip().removesuffix(".").strip()


class Task(ABC):
    """A source of prompts with a verifiable reward (docs/rl-tasks.md).

    Attributes:
        name: the registry name (``arithmetic``, ``rg:chain_sum``, ``agentic:bank``).
        kind: the task type, which picks the token budget (:data:`DEFAULT_TOKEN_BUDGETS`).
        token_budget: most response tokens (per turn for multi-turn tasks); a longer response
            is truncated there and the RL loop may penalize it.
        test_fraction: the share of problems held out for the ``test`` split.
        multi_turn: True for tasks played as episodes (:class:`~k2.rl.tasks.agentic.AgenticTask`).
    """

    name: str
    kind: str
    token_budget: int
    test_fraction: float = DEFAULT_TEST_FRACTION
    multi_turn: bool = False

    def _init_budget(self, token_budget: int | None) -> None:
        if token_budget is None:
            token_budget = DEFAULT_TOKEN_BUDGETS[self.kind]
        if not isinstance(token_budget, int) or isinstance(token_budget, bool) or token_budget < 1:
            raise RLTaskError(f"task {self.name!r}: token_budget must be a positive integer, not {token_budget!r}")
        self.token_budget = token_budget

    @abstractmethod
    def prompts(self, split: str, n: int, seed: int = 0) -> list[Prompt]:
        """``n`` prompts of ``split`` (``"train"`` or ``"test"``), the same for the same seed."""

    @abstractmethod
    def verify(self, prompt: Prompt, response_text: str) -> Reward:
        """Score one sampled response to ``prompt``; never raises because of ``response_text``."""

    def verify_many(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[Reward]:
        """:meth:`verify` for each pair (tasks that can score in parallel override it)."""
        if len(prompts) != len(responses):
            raise RLTaskError(f"task {self.name!r}: {len(prompts)} prompts but {len(responses)} responses")
        return [self.verify(p, r) for p, r in zip(prompts, responses)]

    @abstractmethod
    def gold_response(self, prompt: Prompt) -> str:
        """A response that scores 1 (the warm-start target)."""

    def warm_start_examples(self, n: int, seed: int = 0) -> list[tuple[list[dict[str, Any]], str]]:
        """``n`` (messages, gold response) pairs from the train split, for a short warm-start SFT."""
        return [(p.messages, self.gold_response(p)) for p in self.prompts("train", n, seed)]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} kind={self.kind} budget={self.token_budget}>"


def safe_verify(fn: Callable[[], Reward]) -> Reward:
    """Run a verifier body; any exception the response provoked becomes a zero reward naming it."""
    try:
        return fn()
    except (RecursionError, MemoryError, ValueError, TypeError, ArithmeticError, OverflowError, SyntaxError) as err:
        return Reward(0.0, False, f"unscorable response ({type(err).__name__})")


def sample_pool(task: str, split: str, n: int, seed: int, pool: Sequence[Any]) -> list[Any]:
    """``n`` items of a finite ``pool`` (already one split's), in an order shuffled by ``seed``:
    each once before any repeats. Raises :class:`RLTaskError` when the pool is empty."""
    check_split(task, split)
    check_count(task, n)
    if n and not pool:
        raise RLTaskError(f"task {task!r}: the {split} split is empty")
    out: list[Any] = []
    rng = split_rng(task, split, seed)
    while len(out) < n:
        order = list(pool)
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out
