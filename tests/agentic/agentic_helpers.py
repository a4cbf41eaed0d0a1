"""A user-defined Domain subclass (not registered) for the k2.agentic tests; also served over
MCP as ``agentic_helpers:CounterDomain``."""

from __future__ import annotations

from typing import Any, Literal

from k2.agentic import Domain, ToolError, tool


class CounterDomain(Domain):
    """A user's own domain (not registered): named counters."""

    name = "counters"
    policy = "Keep the counters right."

    @classmethod
    def initial_state(cls) -> dict[str, Any]:
        return {"counters": {"a": 1}}

    @tool(kind="read")
    def get(self, key: str) -> int:
        """Read a counter.

        Args:
            key: the counter's name.
        """
        if key not in self.state["counters"]:
            raise ToolError(f"no counter {key}", "not_found")
        return self.state["counters"][key]

    @tool(kind="write")
    def add(self, key: str, amount: int = 1, mode: Literal["add", "set"] = "add") -> int:
        """Add to (or set) a counter, creating it at 0.

        Args:
            key: the counter's name.
            amount: how much.
            mode: add or set.
        """
        value = self.state["counters"].get(key, 0)
        self.state["counters"][key] = value + amount if mode == "add" else amount
        return self.state["counters"][key]

    @tool(kind="generic")
    def crash(self, why: str) -> str:
        """A tool with a bug.

        Args:
            why: anything.
        """
        raise ZeroDivisionError(why)
