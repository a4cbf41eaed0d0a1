"""A domain whose tools are variants of a base domain's tools (docs/synthesis.md).

:class:`VariantDomain` holds the base domain's state and declares only the given variants. A
call is validated against the variant's schema (so a caller who ignored the declaration gets the
usual ``invalid_arguments`` error), mapped to the base call by the variant, and run by the base
tool on the same state. Grading, environments and the tests treat it like any other domain:
the same calls reach the same state whichever declarations they were written against.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from k2.agentic.domain import Domain, get_domain
from k2.agentic.synth.evolve import ToolVariant
from k2.agentic.tasks import Task
from k2.errors import AgenticError


class VariantDomain(Domain):
    """The base domain ``base`` seen through ``variants`` (at most one per variant name).

    Args:
        base: the base domain (name or class).
        variants: the declared tools.
        state: the database (default: the base domain's initial state).
        policy: the agent's policy text (default: the base domain's).
        stochastic, failure_rate, seed: as for :class:`~k2.agentic.Domain`.
    """

    def __init__(
        self,
        base: str | type[Domain],
        variants: Sequence[ToolVariant],
        state: Mapping[str, Any] | None = None,
        *,
        policy: str | None = None,
        **options: Any,
    ) -> None:
        self.base_cls = get_domain(base)
        self.variants = list(variants)
        self.by_name = {v.name: v for v in self.variants}
        if len(self.by_name) != len(self.variants):
            raise AgenticError(f"two variants share a name: {[v.name for v in self.variants]}")
        for v in self.variants:
            if v.domain != self.base_cls.name:
                raise AgenticError(f"variant {v.id} belongs to domain {v.domain}, not {self.base_cls.name}")
        self.name = self.base_cls.name  # type: ignore[misc]
        self.policy = self.base_cls.policy if policy is None else policy  # type: ignore[misc]
        # what the environment's prompt cache tells apart (docs/agentic.md, Environment)
        self.prompt_key = hashlib.sha256(json.dumps([v.spec for v in self.variants], sort_keys=True).encode()).hexdigest()
        self._inner = self.base_cls.__new__(self.base_cls)
        super().__init__(self.base_cls.initial_state() if state is None else state, **options)

    def set_state(self, state: Mapping[str, Any]) -> str:
        text = super().set_state(state)
        self._inner.state = self.state  # the base tools work on this very dict
        return text

    def fresh(self, state: Mapping[str, Any] | None = None, **options: Any) -> VariantDomain:
        return VariantDomain(self.base_cls, self.variants, state, policy=self.policy, **options)

    def tool_specs(self) -> list[dict[str, Any]]:
        return [v.spec for v in self.variants]

    def tool_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def tool_kind(self, name: str) -> str:
        return self.base_cls._methods()[self.by_name[name].base][2]

    def _schema(self, name: str) -> dict[str, Any] | None:
        v = self.by_name.get(name)
        return v.parameters if v is not None else None

    def _invoke(self, name: str, arguments: dict[str, Any]) -> Any:
        v = self.by_name[name]
        method = self.base_cls._methods()[v.base][0]
        return method(self._inner, **v.to_base(arguments))

    def run_assertion(self, func_name: str, arguments: Mapping[str, Any]) -> Any:
        return self._inner.run_assertion(func_name, arguments)

    def translate_task(self, task: Task) -> Task:
        """A copy of a task written against the base tools (its gold actions) written against
        this domain's variants instead, so it can be played and graded here. Raises AgenticError
        when an action's tool has no variant here."""
        raw = task.to_json()
        by_base = {v.base: v for v in self.variants}
        for action in (raw.get("evaluation_criteria") or {}).get("actions") or []:
            v = by_base.get(action["name"])
            if v is None:
                raise AgenticError(f"task {task.id!r}: no variant of {action['name']} among {sorted(by_base)}")
            action["name"] = v.name
            action["arguments"] = v.from_base(action.get("arguments") or {})
            if action.get("compare_args") is not None:
                names = {p.base: p.name for p in v.params}
                action["compare_args"] = [names.get(k, k) for k in action["compare_args"]]
        return Task(raw, task.source)
