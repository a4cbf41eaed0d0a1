"""What a task template writes: the solution plan the expert plays (docs/synthesis.md).

A template draws a task from a domain's state with a :class:`Ctx` (a scratch copy of the domain
that runs the solution as it is written, so every value the plan states — a new balance, a free
slot — comes from running the real tools) and returns a :class:`Draft`: the user's side (opening,
facts), the plan (:class:`Step` s of asking, confirming, calling and saying), and what the agent
must communicate. Calls are written against the base tools; the agent's tool variants translate
them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from k2.agentic.domain import Domain
from k2.agentic.grading import _deep_merge
from k2.errors import AgenticError

KINDS = ("single", "multi", "parallel", "info", "error", "impossible")
KIND_NAMES = {
    "single": "single-call", "multi": "multi-call", "parallel": "parallel-call",
    "info": "information-seeking", "error": "error-recovery", "impossible": "impossible",
}

Text = str | Callable[[dict[str, Any]], str]
"""A message: fixed text, or a function of the results so far (by call label)."""


class DrawError(AgenticError):
    """A template could not draw a task from this state (the pipeline counts it and moves on)."""


@dataclass
class Call:
    """A planned base-tool call; ``expect_error`` names the error code the plan expects."""

    label: str
    name: str
    args: dict[str, Any]
    expect_error: str | None = None


@dataclass
class Step:
    """``ask`` (a question whose answer must contain ``expects``), ``confirm`` (a yes/no
    question), ``calls`` (one assistant turn of calls, parallel when several) or ``say`` (the
    closing message, which tells the user the outcome)."""

    kind: str
    text: Text = ""
    calls: list[Call] = field(default_factory=list)
    expects: tuple[str, ...] = ()


def ask(text: Text, *expects: str) -> Step:
    return Step("ask", text, expects=expects)


def confirm(text: Text) -> Step:
    return Step("confirm", text)


def calls(*planned: Call) -> Step:
    return Step("calls", calls=list(planned))


def say(text: Text) -> Step:
    return Step("say", text)


@dataclass
class Secret:
    """Something the user knows and tells only when asked: the question names ``keyword``; the
    user's ``answer`` holds every value in ``values``."""

    keyword: str
    answer: str
    values: tuple[str, ...]


@dataclass
class Draft:
    """A drawn task with its solution."""

    opening: str
    steps: list[Step]
    communicate: list[str]
    known_info: str
    facts: dict[str, str] = field(default_factory=dict)
    vague: str | None = None
    """The opening without the secrets: with it the template can be played information-seeking."""
    secrets: list[Secret] = field(default_factory=list)
    instructions: str = ""
    agent_data: dict[str, Any] | None = None
    kind: str = ""
    template: str = ""
    domain: str = ""

    def tools(self) -> list[str]:
        """The base tools the plan calls, in first-use order."""
        return list(dict.fromkeys(c.name for s in self.steps for c in s.calls))


class Ctx:
    """A template's view of the domain: ``rng``, the ``state`` (read it to choose), ``override``
    to change the starting state (recorded as the task's ``agent_data``) and ``run`` to execute
    the solution on a scratch copy."""

    def __init__(self, domain_cls: type[Domain], rng: random.Random) -> None:
        self.domain_cls = domain_cls
        self.rng = rng
        self.domain = domain_cls(None)
        self.agent_data: dict[str, Any] | None = None
        self.ran = False

    @property
    def state(self) -> dict[str, Any]:
        return self.domain.state

    def override(self, data: Mapping[str, Any]) -> None:
        """Merge ``data`` into the starting state (before any :meth:`run`)."""
        if self.ran:
            raise AgenticError("Ctx.override must come before Ctx.run")
        self.agent_data = _deep_merge(self.agent_data or {}, data)
        self.domain.set_state(_deep_merge(self.domain.get_state(), data))

    def run(self, call: Call) -> Any:
        """Run a planned call on the scratch domain: its JSON result, or its error object when the
        call expects that error. Anything else raises :class:`DrawError`."""
        self.ran = True
        result = self.domain.call(call.name, call.args)
        value: Any = json.loads(result.content) if result.content[:1] in ("[", "{") else result.content
        if call.expect_error is None and result.ok:
            return value
        if call.expect_error is not None and result.code == call.expect_error:
            return value["error"]
        raise DrawError(f"{self.domain_cls.name}.{call.name}({call.args}) gave {result.content}, expected {call.expect_error or 'success'}")


def money(cents: int) -> str:
    """Cents as dollars with two decimals and no thousands separator: 150000 -> 1500.00."""
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}{cents // 100}.{cents % 100:02d}"
