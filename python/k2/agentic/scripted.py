"""A scripted agent that plays a task's gold actions: a reference for tests and benchmarks."""

from __future__ import annotations

from k2.agentic.calls import ToolCall, render_assistant
from k2.agentic.tasks import Task


class GoldAgent:
    """Plays a task the way its gold actions say (docs/agentic.md).

    Turn 1 asks the user for what the task's ``facts`` cover (one question naming the first
    keyword of each); then one turn per gold action (a tool call); then a closing message that
    says every ``communicate_info`` string. ``parallel=True`` puts all calls in one section.
    """

    def __init__(self, task: Task, parallel: bool = False) -> None:
        self.task = task
        self.parallel = parallel
        self.reset()

    def reset(self) -> None:
        ins = self.task.instructions
        facts = ins.get("facts") if isinstance(ins, dict) else None
        keys = [k.split("|")[0].removeprefix("your ") for k in (facts or {})]  # synth keys say "your name"
        self.script: list[str] = []
        self.counter = sum(len(m.get("tool_calls") or ()) for m in self.task.message_history if m.get("role") == "assistant")
        if keys:
            self.script.append(f"Happy to help. Could you tell me your {', '.join(keys)}?")
        calls = [ToolCall(a.name, dict(a.arguments)) for a in self.task.actions]
        groups = [calls] if self.parallel and calls else [[c] for c in calls]
        for group in groups:
            self.script.append(render_assistant("", group, start=self.counter))
            self.counter += len(group)
        said = " ".join(self.task.communicate_info)
        self.script.append(f"All done. {said}".strip() + " Have a nice day.")

    def act(self) -> str:
        """The next assistant turn's text (with ``<|im_end|>``)."""
        return (self.script.pop(0) if self.script else "Goodbye.") + "<|im_end|>"
