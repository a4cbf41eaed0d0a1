"""Grading a trajectory against a task, with tau2-bench's semantics (docs/agentic.md).

Components (the reward is the product of those in ``reward_basis``, default DB and COMMUNICATE):

- **DB**: the gold actions are replayed on a fresh copy of the task's initial state; the agent's
  final state must hash equal. Any path to the same end state passes.
- **ENV_ASSERTION**: each ``env_assertions`` call on the agent's final state returns its
  ``assert_value``.
- **COMMUNICATE**: each ``communicate_info`` string occurs (case-insensitive, commas ignored) in
  some assistant message.
- **ACTION**: each gold action is matched by some agent call (same name; equal arguments, or the
  ``compare_args`` subset).
- **NL_ASSERTION**: each natural-language assertion judged by a :class:`Judge`; when no judge
  can decide one, the component — and the reward, if it is in the basis — is ``None``
  ("ungraded"), never a guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from k2.agentic.calls import ToolCall, calls_from_message
from k2.agentic.domain import Domain, get_domain
from k2.agentic.tasks import Action, Task
from k2.errors import AgenticError, TaskError
from k2.optional import require

GOOD_ENDINGS = ("user_stop", "agent_stop")


@dataclass
class Component:
    """One grading component: ``reward`` 1.0/0.0, or None when ungraded, and why."""

    reward: float | None
    details: list[str] = field(default_factory=list)


@dataclass
class Grade:
    """``reward`` (None when an in-basis component could not be graded) and each component."""

    reward: float | None
    components: dict[str, Component]
    basis: list[str]

    @property
    def graded(self) -> bool:
        return self.reward is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "reward": self.reward,
            "basis": self.basis,
            "components": {k: {"reward": c.reward, "details": c.details} for k, c in self.components.items()},
        }


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = json.loads(json.dumps(value))
    return base


def initial_domain(domain: str | type[Domain] | Domain, task: Task | None, **options: Any) -> Domain:
    """A fresh domain set up for ``task``: its initial state, ``agent_data`` merged in, then the
    ``initialization_actions`` run (not the message history: see :func:`replay_calls`)."""
    cls = get_domain(domain)
    proto = domain if isinstance(domain, Domain) else None
    state = proto.default_state() if proto is not None else cls.initial_state()
    if task is not None and task.agent_data:
        state = _deep_merge(state, task.agent_data)
    made = proto.fresh(state, **options) if proto is not None else cls(state, **options)
    if task is not None:
        for i, action in enumerate(task.initialization_actions):
            with made.deterministic():
                result = made.call(action.func_name, action.arguments)
            if not result.ok:
                raise TaskError(
                    f"task {task.id!r}: field initial_state.initialization_actions[{i}]: "
                    f"{action.func_name} failed: {result.content}"
                )
    return made


def _result_ok(content: Any) -> bool:
    if not isinstance(content, str):
        return True
    try:
        value = json.loads(content)
    except json.JSONDecodeError:
        return True
    return not (isinstance(value, dict) and isinstance(value.get("error"), dict))


def trajectory_calls(trajectory: Sequence[Mapping[str, Any]], successful_only: bool = False) -> list[ToolCall]:
    """The assistant's tool calls in a trajectory (OpenAI messages), in order; with
    ``successful_only``, only those whose tool result was not an error."""
    results = {m.get("tool_call_id"): m.get("content") for m in trajectory if m.get("role") == "tool"}
    calls = []
    for message in trajectory:
        if message.get("role") != "assistant":
            continue
        for call in calls_from_message(message):
            if successful_only and (call.error is not None or not _result_ok(results.get(call.id))):
                continue
            calls.append(call)
    return calls


def replay_calls(domain: Domain, calls: Sequence[ToolCall]) -> None:
    """Run calls on ``domain`` in order (errors leave the state as it was)."""
    for call in calls:
        domain.execute(call)


def gold_state_hash(task: Task, domain: Domain) -> str:
    """The state hash after replaying the task's message history and gold actions on a fresh
    copy of its initial state. Cached on the task per domain class and starting state (domains
    are deterministic functions of their state; the stochastic mode is off for the replay)."""
    cache = task.__dict__.setdefault("_gold_hashes", {})
    key = (type(domain), getattr(domain, "_start", None))
    if key not in cache:
        gold = initial_domain(domain, task)
        history = [c for m in task.message_history if m.get("role") == "assistant" for c in calls_from_message(m)]
        replay_calls(gold, history)
        for action in task.actions:
            result = gold.call(action.name, action.arguments)
            if not result.ok:
                raise TaskError(
                    f"task {task.id!r}: gold action {action.action_id} ({action.name}) fails: {result.content}"
                )
        cache[key] = gold.state_hash()
    return cache[key]


def _normalize(value: Any) -> Any:
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        try:
            return _normalize(json.loads(value))
        except json.JSONDecodeError:
            return value
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def action_matches(action: Action, call: ToolCall) -> bool:
    """tau2's match: same name, and equal arguments on ``compare_args`` (all of the call's if None)."""
    if call.name != action.name or call.arguments is None:
        return False
    keys = list(call.arguments) if action.compare_args is None else action.compare_args
    if not keys:
        return True
    mine = {k: _normalize(v) for k, v in call.arguments.items() if k in keys}
    gold = {k: _normalize(v) for k, v in action.arguments.items() if k in keys}
    return mine == gold


def _assistant_texts(trajectory: Sequence[Mapping[str, Any]]) -> list[str]:
    texts = []
    for m in trajectory:
        if m.get("role") != "assistant":
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content:
            texts.append(content)
    return texts


class Judge(Protocol):
    """Decides natural-language assertions about a trajectory: True, False, or None (cannot)."""

    def judge(self, assertion: str, trajectory: Sequence[Mapping[str, Any]]) -> bool | None: ...


class ProgrammaticJudge:
    """Decides assertions of the forms it can check exactly, and nothing else:

    - ``... (says|mentions|tells ...|informs ...) "TEXT"`` — some assistant message contains TEXT;
    - ``... (does not|doesn't|never) (say|mention|...) "TEXT"`` — no assistant message does;
    - ``... calls TOOL`` / ``... does not call TOOL`` — a tool of that name was (not) called.
    """

    _QUOTED = re.compile(r"[\"“]([^\"”]+)[\"”]")

    def judge(self, assertion: str, trajectory: Sequence[Mapping[str, Any]]) -> bool | None:
        text = assertion.strip()
        lowered = text.lower()
        negated = bool(re.search(r"\b(does not|doesn't|never|do not|must not)\b", lowered))
        quoted = self._QUOTED.findall(text)
        if quoted and re.search(r"\b(say|says|mention|mentions|tell|tells|inform|informs|state|states)\b", lowered):
            said = " ".join(_assistant_texts(trajectory)).lower()
            found = all(q.lower() in said for q in quoted)
            return (not any(q.lower() in said for q in quoted)) if negated else found
        m = re.search(r"\bcalls? (?:the )?(?:tool )?`?([a-z_][a-z0-9_]*)`?", lowered)
        if m:
            called = {c.name for c in trajectory_calls(trajectory)}
            return (m.group(1) not in called) if negated else (m.group(1) in called)
        return None


class OpenAIJudge:
    """Asks an OpenAI-compatible chat endpoint whether an assertion holds (``openai`` package).

    Args:
        model: the model name the endpoint serves.
        base_url: the endpoint (e.g. ``http://localhost:8000/v1``).
        api_key: its key (default: ``OPENAI_API_KEY`` from the environment, else "none").
    """

    PROMPT = (
        "You grade a conversation between a customer-service agent and a user. Decide whether "
        "the assertion holds for the agent's behaviour. Answer with JSON only: "
        '{"met": true} or {"met": false}.'
    )

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, client: Any = None) -> None:
        if client is None:
            import os

            openai = require("openai", extra="agentic", purpose="k2.agentic's OpenAI-endpoint judge")
            client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "none"))
        self.client = client
        self.model = model

    def judge(self, assertion: str, trajectory: Sequence[Mapping[str, Any]]) -> bool | None:
        transcript = "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in trajectory)
        reply = self.client.chat.completions.create(
            model=self.model,
            temperature=0,
            messages=[
                {"role": "system", "content": self.PROMPT},
                {"role": "user", "content": f"Conversation:\n{transcript}\n\nAssertion: {assertion}"},
            ],
        )
        text = reply.choices[0].message.content or ""
        m = re.search(r"\{.*\}", text, re.S)
        try:
            met = json.loads(m.group(0)).get("met") if m else None
        except json.JSONDecodeError:
            met = None
        return met if isinstance(met, bool) else None


class ChainJudge:
    """The first judge that decides (programmatic first, then an endpoint)."""

    def __init__(self, *judges: Judge) -> None:
        self.judges = judges

    def judge(self, assertion: str, trajectory: Sequence[Mapping[str, Any]]) -> bool | None:
        for j in self.judges:
            verdict = j.judge(assertion, trajectory)
            if verdict is not None:
                return verdict
        return None


def _all(results: list[tuple[bool | None, str]]) -> Component:
    details = [d for ok, d in results if ok is not True]
    if any(ok is None for ok, _ in results):
        return Component(None, details)
    return Component(1.0 if all(ok for ok, _ in results) else 0.0, details)


def grade(
    task: Task,
    domain: str | type[Domain] | Domain,
    trajectory: Sequence[Mapping[str, Any]],
    *,
    judge: Judge | None = None,
    termination: str | None = None,
) -> Grade:
    """Grade a trajectory (OpenAI-format messages, the task's message history included).

    Args:
        task: the task.
        domain: the environment's domain *instance* after the episode (its state is the agent's
            final state), or a domain name/class, in which case the trajectory's successful tool
            calls are replayed on a fresh initial state to get that final state.
        trajectory: the conversation.
        judge: decides NL assertions (default: :class:`ProgrammaticJudge`).
        termination: how the episode ended; other than a user or agent stop scores 0 (tau2).
    """
    judge = judge or ProgrammaticJudge()
    if isinstance(domain, Domain):
        predicted = domain
    else:
        predicted = initial_domain(domain, task)
        replay_calls(predicted, trajectory_calls(trajectory, successful_only=True))
    components: dict[str, Component] = {}

    if predicted.stateful:
        same = gold_state_hash(task, predicted) == predicted.state_hash()
        details = [] if same else ["the final state differs from the gold actions' state"]
        components["DB"] = Component(1.0 if same else 0.0, details)
    else:
        components["DB"] = Component(None, [f"domain {predicted.name} has no state k2 can compare"])

    checks = []
    for a in task.env_assertions:
        try:
            value = predicted.run_assertion(a.func_name, a.arguments)
        except AgenticError as err:
            raise TaskError(f"task {task.id!r}: env assertion {a.func_name}: {err}") from err
        checks.append((value == a.assert_value, a.message or f"{a.func_name}({a.arguments}) != {a.assert_value}"))
    components["ENV_ASSERTION"] = _all(checks)

    said = [t.lower().replace(",", "") for t in _assistant_texts(trajectory)]
    components["COMMUNICATE"] = _all(
        [(any(info.lower() in s for s in said), f"never said {info!r}") for info in task.communicate_info]
    )

    calls = trajectory_calls(trajectory)
    components["ACTION"] = _all(
        [(any(action_matches(a, c) for c in calls), f"no call matched {a.action_id} ({a.name})") for a in task.actions]
    )

    nl = []
    for assertion in task.nl_assertions:
        verdict = judge.judge(assertion, trajectory)
        nl.append((verdict, f"{'ungraded' if verdict is None else 'not met'}: {assertion}"))
    components["NL_ASSERTION"] = _all(nl)

    basis = list(task.reward_basis)
    rewards = [components[k].reward for k in basis]
    if any(r is None for r in rewards):
        reward: float | None = None
    else:
        reward = 1.0
        for r in rewards:
            reward *= r if r is not None else 0.0
    if termination is not None and termination not in GOOD_ENDINGS and reward is not None:
        reward = 0.0
        components.setdefault("DB", Component(0.0)).details.append(f"episode ended by {termination}")
    return Grade(reward, components, basis)
