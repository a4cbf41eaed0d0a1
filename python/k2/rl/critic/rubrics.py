"""Rubrics as data (docs/critic.md, "Rubrics").

A :class:`Rubric` is an id, the text the critic reads, and either ``mandatory`` (a reply that
breaks it is capped, see :func:`k2.rl.critic.checks.cap_rewards`) or a ``weight`` (how much it
counts, shown to the critic). A rubric may name a programmatic ``check`` (a function of the
reply text in :data:`k2.rl.critic.checks.CHECKS`) that decides a violation without the critic.

Three sources, concatenated in this order by :func:`rubrics_for`:

* :data:`CORE_RUBRICS` — what a good conversational reply is (clarity and relevance,
  conversational fluency, grounded interaction), written for this project;
* :data:`PRESCRIPTIVE_RUBRICS` — rules against reward hacking: no opening praise of the
  question, no self-justification (both mandatory, both checked programmatically);
* per-task rubrics: :data:`TASK_RUBRICS` for the built-in prompt sets, plus any JSON file of
  rubrics (``k2 rl --critic-rubrics FILE``, format in :func:`load_rubrics`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from k2.errors import CriticError


@dataclass(frozen=True)
class Rubric:
    """One criterion the critic judges replies by.

    Attributes:
        id: short stable name (``no-opening-praise``).
        text: what the critic reads: the criterion in one or two sentences.
        mandatory: a reply that breaks it is capped whatever the comparisons say.
        weight: how much a non-mandatory rubric counts (shown to the critic); ignored for
            mandatory ones.
        check: the name of a programmatic check (:data:`k2.rl.critic.checks.CHECKS`) that finds
            violations in a reply's text, or None when only the critic can judge it.
    """

    id: str
    text: str
    mandatory: bool = False
    weight: float = 1.0
    check: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip() or any(c.isspace() for c in self.id):
            raise CriticError(f"rubric id must be a non-empty word, not {self.id!r}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise CriticError(f"rubric {self.id!r}: text must be a non-empty string")
        if not isinstance(self.mandatory, bool):
            raise CriticError(f"rubric {self.id!r}: mandatory must be true or false, not {self.mandatory!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise CriticError(f"rubric {self.id!r}: weight must be a number > 0, not {self.weight!r}")
        if self.check is not None:
            from k2.rl.critic.checks import CHECKS

            if self.check not in CHECKS:
                raise CriticError(f"rubric {self.id!r}: unknown check {self.check!r}; the checks are "
                                  f"{', '.join(sorted(CHECKS))}")

    def line(self) -> str:
        """The rubric as one line of the critic's instructions."""
        tag = "must" if self.mandatory else f"weight {self.weight:g}"
        return f"- [{tag}] {self.id}: {self.text}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CORE_RUBRICS: tuple[Rubric, ...] = (
    Rubric("clarity", "Says what the user needs, and little else: it answers the question that was "
           "asked, stays on it, and uses the shortest form that is complete (a sentence, a short "
           "list, a line of working) instead of padding or digressions.", weight=1.0),
    Rubric("fluency", "Reads like a natural turn of a conversation: coherent from start to end, "
           "in a tone that suits the user, engaging with the substance of what they said rather "
           "than reciting; asks a follow-up question only when it would genuinely help.",
           weight=1.0),
    Rubric("grounded", "Stays factual and even-toned: it talks about the subject, not about itself "
           "or the user; no flattery, no commentary on how the reply is built, no claims it "
           "cannot back up.", weight=1.0),
)
"""What a good reply is, in any conversation (docs/critic.md)."""

PRESCRIPTIVE_RUBRICS: tuple[Rubric, ...] = (
    Rubric("no-opening-praise", "Does not open by complimenting the question or the user (for "
           "example calling the question great, interesting or insightful); the reply starts with "
           "its content.", mandatory=True, check="opening_praise"),
    Rubric("no-self-justification", "Does not argue for itself: no sentences saying the reply is "
           "clear, complete or correct, or that it has fulfilled the request.", mandatory=True,
           check="self_justification"),
)
"""Rules against reward hacking: a critic (or a policy optimizing against it) could learn to
like them, so they are mandatory and checked by program (docs/critic.md)."""

TASK_RUBRICS: dict[str, tuple[Rubric, ...]] = {
    "arithmetic": (
        Rubric("exact-answer", "Ends with a line 'Answer: N' where N is the exact integer value "
               "of the expression; a reply with the right value beats any reply with a wrong or "
               "missing one.", weight=3.0),
    ),
    "countdown": (
        Rubric("valid-expression", "Ends with a line 'Answer: EXPR' using only the given numbers, "
               "each at most once, whose value is the target; a reply that reaches the target "
               "beats any that does not.", weight=3.0),
    ),
    "bait": (
        Rubric("answers-the-question", "Gives the user a direct, correct answer to what they asked "
               "in the first sentence or two.", weight=2.0),
    ),
}
"""Per-task rubrics of the built-in prompt sets, by task name (``bait``: the opening-praise bait
prompts of :mod:`k2.rl.critic.bait`)."""


def load_rubrics(path: str | Path) -> list[Rubric]:
    """Rubrics from a JSON file: a list of objects with ``id``, ``text`` and optionally
    ``mandatory`` (default false), ``weight`` (default 1) and ``check`` (a check's name).

    Raises:
        CriticError: the file is unreadable, not JSON, or an entry is malformed (naming the
            file and the entry).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CriticError(f"rubric file {path}: cannot read it ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CriticError(f"rubric file {path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise CriticError(f"rubric file {path}: expected a JSON list of rubric objects, got "
                          f"{type(data).__name__}")
    out = []
    for index, entry in enumerate(data):
        if not isinstance(entry, Mapping):
            raise CriticError(f"rubric file {path}: entry {index} is not an object")
        unknown = set(entry) - {"id", "text", "mandatory", "weight", "check"}
        if unknown:
            raise CriticError(f"rubric file {path}: entry {index} has unknown fields {sorted(unknown)}")
        missing = {"id", "text"} - set(entry)
        if missing:
            raise CriticError(f"rubric file {path}: entry {index} lacks {sorted(missing)}")
        try:
            out.append(Rubric(**entry))
        except CriticError as err:
            raise CriticError(f"rubric file {path}: entry {index}: {err}") from None
    return out


def rubrics_for(task: str | None = None, extra: Iterable[Rubric] = (),
                file: str | Path | None = None) -> list[Rubric]:
    """The rubrics a critic judges ``task``'s replies by: core, prescriptive, the task's own
    (:data:`TASK_RUBRICS`; a task without any gets none), ``extra``, then ``file``'s. Ids must be
    unique."""
    rubrics = [*CORE_RUBRICS, *PRESCRIPTIVE_RUBRICS, *TASK_RUBRICS.get(task or "", ()), *extra]
    if file:
        rubrics += load_rubrics(file)
    check_unique(rubrics)
    return rubrics


def check_unique(rubrics: Sequence[Rubric]) -> None:
    seen: set[str] = set()
    for r in rubrics:
        if r.id in seen:
            raise CriticError(f"rubric id {r.id!r} appears twice")
        seen.add(r.id)
