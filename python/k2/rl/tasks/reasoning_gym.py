"""reasoning-gym's procedural datasets as tasks, scored by their own verifiers
(``--task rg:NAME``; docs/rl-tasks.md, "reasoning-gym").

Each prompt is one dataset entry's ``question``; the policy puts its final answer between
``<answer>`` and ``</answer>`` (the last such pair counts, as reasoning-gym's own
``extract_answer`` reads it), and the dataset's ``score_answer(answer, entry)`` gives the reward
(some datasets give partial credit; a response without the tags scores 0). ``correct`` means a
score of 1. Needs the ``rl`` extra (``pip install 'k2-train[rl]'``).
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

from k2.errors import RLTaskError
from k2.optional import require
from k2.rl.tasks.base import (
    DEFAULT_TEST_FRACTION,
    Prompt,
    Reward,
    Task,
    check_count,
    check_fraction,
    check_split,
    sample_split,
    strip_turn,
)

INSTRUCTION = "Solve the problem. Give your final answer between <answer> and </answer>."
MAX_ANSWER_CHARS = 10_000
"""An extracted answer longer than this scores 0 without being passed to the verifier."""


def _rg() -> Any:
    return require("reasoning_gym", extra="rl", purpose="k2.rl's reasoning-gym tasks (--task rg:NAME)")


def dataset_names() -> list[str]:
    """Every dataset reasoning-gym registers."""
    _rg()
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


class ReasoningGymTask(Task):
    """The reasoning-gym dataset ``dataset`` (``basic_arithmetic``, ``chain_sum``, ...), with
    ``config`` its dataset options (everything but ``seed`` and ``size``, which k2 sets).

    Hidden data: ``entry`` (the dataset's entry: question, answer, metadata). Split key: the
    question text.
    """

    kind = "reasoning"

    def __init__(
        self,
        dataset: str,
        *,
        test_fraction: float = DEFAULT_TEST_FRACTION,
        token_budget: int | None = None,
        **config: Any,
    ) -> None:
        self.name = f"rg:{dataset}"
        rg = _rg()
        from reasoning_gym.utils import extract_answer

        self._extract = extract_answer
        names = dataset_names()
        if dataset not in names:
            raise RLTaskError(f"task {self.name!r}: reasoning-gym has no dataset {dataset!r}; it has: {', '.join(names)}")
        for key in ("seed", "size"):
            if key in config:
                raise RLTaskError(f"task {self.name!r}: option {key!r} is set by k2 (use prompts(split, n, seed))")
        self.dataset = dataset
        self.config = dict(config)
        try:
            self._scorer = rg.create_dataset(dataset, seed=0, size=1, **self.config)
        except (TypeError, ValueError, AssertionError) as err:
            raise RLTaskError(f"task {self.name!r}: bad dataset options {self.config}: {err}") from None
        self.test_fraction = check_fraction(self.name, test_fraction)
        self._init_budget(token_budget)

    def prompts(self, split: str, n: int, seed: int = 0) -> list[Prompt]:
        check_split(self.name, split)
        check_count(self.name, n)
        # entries come from datasets of `chunk` entries, each with a fresh seed from the draw's
        # generator (some datasets build all their entries up front, so none is made huge)
        share = self.test_fraction if split == "test" else 1.0 - self.test_fraction
        chunk = max(100, math.ceil(2 * n / share))
        state: dict[str, Any] = {"data": None, "next": chunk}

        def draw(rng: random.Random) -> tuple[str, dict[str, Any]]:
            if state["next"] >= chunk:
                state["data"] = _rg().create_dataset(self.dataset, seed=rng.randrange(2**31), size=chunk, **self.config)
                state["next"] = 0
            entry = state["data"][state["next"]]
            state["next"] += 1
            return entry["question"], entry

        entries = sample_split(self.name, split, n, seed, draw, self.test_fraction)
        return [
            Prompt(
                id=f"{self.name}/{hashlib.sha256(e['question'].encode('utf-8', 'surrogatepass')).hexdigest()[:16]}",
                messages=[{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": e["question"]}],
                hidden={"entry": e},
            )
            for e in entries
        ]

    def gold_response(self, prompt: Prompt) -> str:
        """The entry's oracle answer in tags. Some datasets (puzzles with many solutions, such as
        ``rush_hour`` or ``graph_color``) have none: then :class:`RLTaskError` says so."""
        answer = prompt.hidden["entry"].get("answer")
        text = f"<answer>{answer}</answer>"
        if answer is None or not self.verify(prompt, text).correct:
            raise RLTaskError(f"task {self.name!r}: the dataset gives no gold answer for prompt {prompt.id} "
                              "(its verifier accepts many solutions), so it has no warm-start examples")
        return text

    def verify(self, prompt: Prompt, response_text: str) -> Reward:
        if not isinstance(response_text, str):
            return Reward(0.0, False, "response is not text")
        try:
            answer = self._extract(strip_turn(response_text))
        except Exception as err:  # noqa: BLE001 - untrusted text must never crash the loop
            return Reward(0.0, False, f"unreadable response ({type(err).__name__})")
        if answer is None:
            return Reward(0.0, False, "no <answer> tags")
        if len(answer) > MAX_ANSWER_CHARS:
            return Reward(0.0, False, "answer too long")
        try:
            score = float(self._scorer.score_answer(answer, prompt.hidden["entry"]))
        except Exception as err:  # noqa: BLE001 - a third-party verifier choking on model output
            return Reward(0.0, False, f"verifier rejected the answer ({type(err).__name__})")
        if not math.isfinite(score):
            return Reward(0.0, False, "verifier gave a non-finite score")
        score = min(1.0, max(0.0, score))
        return Reward(score, score >= 1.0, "correct" if score >= 1.0 else f"scored {score:.3g}")
