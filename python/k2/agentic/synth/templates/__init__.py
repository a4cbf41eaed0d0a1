"""Task templates: each draws a task from a domain's state and writes its solution (docs/synthesis.md).

Register one with :func:`template`::

    @template("bank", "single", info=True)
    def balance(ctx: Ctx) -> Draft: ...

``kind`` is the template's own kind; ``info=True`` says its drafts carry ``secrets`` and a vague
opening, so it can also be played information-seeking (the user must be asked). Importing this
package registers the built-in templates of the six domains.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from k2.agentic.synth.plan import KINDS, Ctx, Draft
from k2.errors import AgenticError


@dataclass(frozen=True)
class Template:
    id: str
    domain: str
    kind: str
    info: bool
    draw: Callable[[Ctx], Draft]

    def kinds(self) -> tuple[str, ...]:
        """The kinds this template can be played as."""
        return (self.kind, "info") if self.info else (self.kind,)


TEMPLATES: dict[str, Template] = {}


def template(domain: str, kind: str, info: bool = False) -> Callable[[Callable[[Ctx], Draft]], Callable[[Ctx], Draft]]:
    """Register a template function as ``DOMAIN.FUNCTION_NAME``."""
    if kind not in KINDS or kind == "info":
        raise AgenticError(f"a template's own kind is one of {[k for k in KINDS if k != 'info']}, not {kind!r}")

    def register(fn: Callable[[Ctx], Draft]) -> Callable[[Ctx], Draft]:
        tid = f"{domain}.{fn.__name__}"
        TEMPLATES[tid] = Template(tid, domain, kind, info, fn)
        return fn

    return register


def templates() -> dict[str, Template]:
    """Every registered template by id (the built-in ones loaded)."""
    for name in ("bank", "shop", "calendar", "notes", "contacts", "device", "common"):
        importlib.import_module(f"k2.agentic.synth.templates.{name}")
    return dict(sorted(TEMPLATES.items()))
