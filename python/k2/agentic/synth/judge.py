"""The judge filter: grade every trajectory and hold it to a quality rubric (docs/synthesis.md).

A trajectory is kept only when k2.agentic's grader gives it reward 1 and the rubric finds nothing:

| reason | rejected when |
| --- | --- |
| ``ended_by_limit`` | the episode ended by a turn or step limit, not by the user or the agent |
| ``not_graded`` | the grader could not decide the reward |
| ``not_solved`` | the reward is below 1 (wrong end state, something not communicated, ...) |
| ``expert_gave_up`` | the expert stopped following its plan (unexpected error, user reply, retries spent) |
| ``undeclared_tool`` | a call names a tool the agent does not declare |
| ``invalid_arguments`` | a call's arguments break the tool's schema and the next assistant turn does not call that tool validly (one recovered mistake is data; an unrecovered one is not) |
| ``unanswered_call`` | a call has no tool message answering it |
| ``outcome_not_told`` | the conversation does not end with an assistant message in words, after the last tool result |
| ``too_long`` | the rendered conversation is longer than ``max_chars`` characters, or (with a tokenizer) ``max_tokens`` tokens |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from k2.agentic.calls import calls_from_message
from k2.agentic.grading import Grade, grade, initial_domain, replay_calls, trajectory_calls
from k2.agentic.tasks import Task
from k2.agentic.tools import validator_for

REASONS = (
    "ended_by_limit", "not_graded", "not_solved", "expert_gave_up", "undeclared_tool",
    "invalid_arguments", "unanswered_call", "outcome_not_told", "too_long",
)


def _valid(call: Any, schemas: Mapping[str, Any]) -> bool:
    return call.error is None and call.name in schemas and validator_for(schemas[call.name]).is_valid(call.arguments or {})


def rubric(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]],
    *,
    grade: Grade | None,
    termination: str | None,
    gave_up: bool = False,
    max_chars: int | None = None,
    rendered_chars: int | None = None,
    max_tokens: int | None = None,
    tokens: int | None = None,
) -> list[str]:
    """The rubric's reasons to reject a trajectory, in :data:`REASONS` order (empty: keep it)."""
    reasons: set[str] = set()
    if termination not in ("user_stop", "agent_stop"):
        reasons.add("ended_by_limit")
    if grade is None or grade.reward is None:
        reasons.add("not_graded")
    elif grade.reward < 1.0:
        reasons.add("not_solved")
    if gave_up:
        reasons.add("expert_gave_up")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    turns = [m for m in messages if m.get("role") == "assistant"]
    answered = {m.get("tool_call_id") for m in messages if m.get("role") == "tool"}
    for i, message in enumerate(turns):
        for call in calls_from_message(message):
            if call.id not in answered:
                reasons.add("unanswered_call")
            if call.name not in schemas:
                reasons.add("undeclared_tool")
            elif not _valid(call, schemas):
                following = calls_from_message(turns[i + 1]) if i + 1 < len(turns) else []
                if not any(c.name == call.name and _valid(c, schemas) for c in following):
                    reasons.add("invalid_arguments")
    last_tool = max((i for i, m in enumerate(messages) if m.get("role") == "tool"), default=-1)
    last_said = max((i for i, m in enumerate(messages) if m.get("role") == "assistant" and not m.get("tool_calls")
                     and (m.get("content") or "").strip()), default=-1)
    last_agent = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    if last_said < last_tool or last_said != last_agent or last_said < 0:
        reasons.add("outcome_not_told")
    if max_chars is not None and rendered_chars is not None and rendered_chars > max_chars:
        reasons.add("too_long")
    if max_tokens is not None and tokens is not None and tokens > max_tokens:
        reasons.add("too_long")
    return [r for r in REASONS if r in reasons]


def regrade(task: Task, domain: Any, messages: Sequence[Mapping[str, Any]], termination: str | None = None) -> Grade:
    """Grade a recorded trajectory from scratch: a fresh domain set up for the task (``domain`` is a
    prototype such as a :class:`~k2.agentic.synth.variant_domain.VariantDomain`), the trajectory's
    successful calls replayed on it, then k2.agentic's grader."""
    final = initial_domain(domain, task)
    replay_calls(final, trajectory_calls(messages, successful_only=True))
    return grade(task, final, messages, termination=termination)
