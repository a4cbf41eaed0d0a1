"""The expert agent: plays a template's plan against the user simulator and the domain (docs/synthesis.md).

It behaves the way the data should teach: it asks the user for what it does not know (the
information-seeking opening hides the secrets, so the plan starts with a question), reads before
it writes (the templates' plans do), confirms before writing where the plan says so, retries
calls that failed transiently (``retryable`` errors from a stochastic domain), and — with
probability ``mistake_rate`` per episode — first writes one call the way a model that skimmed the
declaration would (the base tool's parameter names, the base argument format, or a required
argument left out), reads the ``invalid_arguments`` error and writes the call correctly. Every
value it tells the user is read from the tool results it got, not from the plan.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from k2.agentic.env import AgentEnv
from k2.agentic.grading import Grade
from k2.agentic.synth.evolve import ToolVariant
from k2.agentic.synth.plan import Call, Step
from k2.agentic.tools import validator_for

YES = re.compile(r"\b(yes|go ahead|correct|please do)\b", re.I)
FIXES = ("Sorry, I wrote the arguments wrong; fixing that.", "Let me correct the arguments.", "My mistake, retrying with the declared arguments.")
RETRIES = ("The service did not respond; trying again.", "That was a temporary failure, so I'll retry.", "")
CONFIRMS = ("Shall I go ahead?", "Shall I proceed?", "Is that OK?", "Do you want me to go ahead?", "Should I do that?")
GIVE_UP = "I'm sorry, I couldn't complete that: the service is not responding right now. Please try again later."


@dataclass
class Played:
    """An episode's outcome: the ``messages`` (OpenAI format), how it ended, its grade, and the
    expert's ``mistakes``, ``retries`` and, if it gave up, why (``bail``)."""

    messages: list[dict[str, Any]]
    termination: str | None
    grade: Grade | None
    mistakes: int = 0
    retries: int = 0
    bail: str | None = None
    calls: int = 0


def _text(text: Any, results: Mapping[str, Any]) -> str:
    return text(results) if callable(text) else str(text)


def _parse(content: str) -> Any:
    try:
        return json.loads(content)
    except (json.JSONDecodeError, TypeError):
        return content


def _error(value: Any) -> dict[str, Any] | None:
    return value["error"] if isinstance(value, dict) and isinstance(value.get("error"), dict) else None


def mistaken_arguments(rng: random.Random, variant: ToolVariant, base_args: Mapping[str, Any]) -> dict[str, Any] | None:
    """A realistic wrong version of a call's arguments that the variant's schema rejects, or None.

    The candidates: the base tool's names and formats (a model that memorized the original tool),
    the variant's names with base-format values, or a required argument left out.
    """
    right = variant.from_base(base_args)
    candidates: list[dict[str, Any]] = [dict(base_args)]
    formatted = {p.name: base_args[p.base] for p in variant.params if p.format != "same" and p.base in base_args}
    if formatted:
        candidates.append({**right, **formatted})
    required = [k for k in variant.parameters.get("required", []) if k in right]
    if required:
        drop = rng.choice(required)
        candidates.append({k: v for k, v in right.items() if k != drop})
    validator = validator_for(variant.parameters)
    wrong = [c for c in candidates if c != right and not validator.is_valid(c)]
    return rng.choice(wrong) if wrong else None


class ExpertAgent:
    """Plays ``steps`` (a template's plan) with ``tools`` (the agent's variants, by base tool).

    Args:
        steps: the plan.
        tools: the agent's declared variants.
        rng: the episode's random source (mistakes, phrasing).
        mistake_rate: the chance that the episode contains one recovered mistake.
        max_retries: retries of a transiently failing call before giving up.
    """

    def __init__(self, steps: Sequence[Step], tools: Sequence[ToolVariant], rng: random.Random,
                 mistake_rate: float = 0.1, max_retries: int = 3) -> None:
        self.steps = list(steps)
        self.by_base = {v.base: v for v in tools}
        self.rng = rng
        self.will_err = rng.random() < mistake_rate
        self.max_retries = max_retries

    def _openai_call(self, name: str, args: Mapping[str, Any]) -> dict[str, Any]:
        return {"id": "", "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}

    def play(self, env: AgentEnv) -> Played:
        env.reset()
        played = Played([], None, None)
        results: dict[str, Any] = {}
        for step in self.steps:
            if env.done:
                played.bail = played.bail or "the episode ended before the plan did"
                break
            if step.kind in ("ask", "confirm"):
                text = _text(step.text, results)
                if step.kind == "confirm" and text.endswith("Shall I go ahead?"):
                    text = text[: -len("Shall I go ahead?")] + self.rng.choice(CONFIRMS)
                obs, _, done, _ = env.step({"role": "assistant", "content": text})
                reply = obs.messages[-1]["content"] if obs.messages else ""
                ok = all(e.lower() in reply.lower() for e in step.expects) if step.kind == "ask" else bool(YES.search(reply))
                if not ok and not done:
                    self._give_up(env, played, f"the user's reply to {step.kind} did not fit the plan: {reply!r}")
                    break
            elif step.kind == "calls":
                if not self._run_calls(env, step, results, played):
                    break
            elif step.kind == "say":
                env.step({"role": "assistant", "content": _text(step.text, results)})
        if not env.done:
            played.bail = played.bail or "the user did not end the conversation"
        played.messages = list(env.messages)
        played.termination = env.termination
        played.grade = env.grade
        return played

    def _give_up(self, env: AgentEnv, played: Played, why: str) -> None:
        played.bail = why
        if not env.done:
            env.step({"role": "assistant", "content": GIVE_UP})

    def _run_calls(self, env: AgentEnv, step: Step, results: dict[str, Any], played: Played) -> bool:
        written = []
        for c in step.calls:
            v = self.by_base[c.name]
            written.append((c, v, v.from_base(c.args)))
        content = ""
        if self.will_err:
            for c, v, _ in written:
                wrong = mistaken_arguments(self.rng, v, c.args)
                if wrong is None:
                    continue
                self.will_err = False
                obs, _, _, _ = env.step({"role": "assistant", "content": "", "tool_calls": [self._openai_call(v.name, wrong)]})
                played.calls += 1
                err = _error(_parse(obs.messages[0]["content"]))
                if err is None or err.get("code") != "invalid_arguments":
                    self._give_up(env, played, f"the planted mistake was not refused: {obs.messages[0]['content']}")
                    return False
                played.mistakes += 1
                content = self.rng.choice(FIXES)
                break
        pending = list(range(len(written)))
        attempts = 0
        while pending:
            message = {"role": "assistant", "content": content,
                       "tool_calls": [self._openai_call(written[i][1].name, written[i][2]) for i in pending]}
            obs, _, done, _ = env.step(message)
            played.calls += len(pending)
            again = []
            for i, tool_msg in zip(pending, obs.messages):
                call: Call = written[i][0]
                value = _parse(tool_msg["content"])
                err = _error(value)
                if err is not None and err.get("retryable"):
                    again.append(i)
                elif call.expect_error is not None:
                    if err is None or err.get("code") != call.expect_error:
                        self._give_up(env, played, f"{call.name} should have failed with {call.expect_error}: {tool_msg['content']}")
                        return False
                    results[call.label] = err
                elif err is not None:
                    self._give_up(env, played, f"{call.name} failed: {tool_msg['content']}")
                    return False
                else:
                    results[call.label] = value
            if done:
                return False
            pending = again
            if pending:
                attempts += 1
                played.retries += 1
                if attempts > self.max_retries:
                    self._give_up(env, played, f"transient failures outlasted {self.max_retries} retries")
                    return False
                content = self.rng.choice(RETRIES)
        return True
