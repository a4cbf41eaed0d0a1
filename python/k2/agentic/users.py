"""User simulators: a deterministic programmatic user and an OpenAI-endpoint one (docs/agentic.md).

A simulator opens the conversation (:meth:`start`) and answers each agent message
(:meth:`respond`); a reply containing :data:`STOP` ends the episode.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any, Protocol

from k2.agentic.tasks import Task
from k2.optional import require

STOP = "###STOP###"


class UserSimulator(Protocol):
    def start(self) -> str: ...

    def respond(self, agent_message: str) -> str: ...


_THANKS = ("Thanks, that's everything. " + STOP, "Great, thank you. That's all. " + STOP, "Perfect, thanks! " + STOP)
_YES = ("Yes, please go ahead.", "Yes, that's right. Please do it.", "Correct, go ahead.")
_UNKNOWN = ("I'm sorry, I don't know that.", "I don't have that information, sorry.")


class ProgrammaticUser:
    """A deterministic user that plays a task from its instructions.

    It opens with ``reason_for_call`` (or the plain-string instructions). To each agent message
    it answers, in this order: when it asks a question (``?``), the ``facts`` whose keyword
    (``|``-separated alternatives, case-insensitive) the message mentions; for a question those
    do not cover: the whole ``known_info`` the first time, "I don't know" once when the task has
    ``unknown_info``, then a confirmation; once the agent stops asking, the next of the
    instructions' ``follow_ups``, else a thank-you with :data:`STOP`. ``seed`` picks among
    phrasings; the same seed gives the same conversation. It stops after ``max_turns`` replies.
    """

    def __init__(self, task: Task, seed: int = 0, max_turns: int = 20) -> None:
        self.task = task
        self.rng = random.Random(seed)
        self.max_turns = max_turns
        raw = task.instructions
        self.structured = isinstance(raw, Mapping)
        ins: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        self.opening = (ins.get("reason_for_call") or ins.get("task_instructions") or "Hello.") if self.structured else str(raw)
        self.known = ins.get("known_info")
        self.unknown = ins.get("unknown_info")
        facts = ins.get("facts") or {}
        self.facts = [([k.strip().lower() for k in key.split("|") if k.strip()], value) for key, value in facts.items()]
        self.follow_ups = list(ins.get("follow_ups") or [])
        self.turns = 0
        self.told_known = False
        self.told_unknown = False
        self.confirmations = 0

    def start(self) -> str:
        return self.opening

    def respond(self, agent_message: str) -> str:
        self.turns += 1
        if self.turns > self.max_turns:
            return self.rng.choice(_THANKS)
        text = agent_message.lower()
        if "?" in agent_message:
            answers = [value for keys, value in self.facts if any(k in text for k in keys)]
            if answers:
                return " ".join(dict.fromkeys(answers))
            if self.known and not self.told_known and not self.facts:
                self.told_known = True
                return self.known
            if self.unknown and not self.told_unknown:
                self.told_unknown = True
                return self.rng.choice(_UNKNOWN)
            if self.confirmations < 3:
                self.confirmations += 1
                return self.rng.choice(_YES)
        if self.follow_ups:
            return self.follow_ups.pop(0)
        return self.rng.choice(_THANKS)


class OpenAIUser:
    """A user played by a model behind an OpenAI-compatible chat endpoint (``openai`` package).

    The model gets the task's persona and instructions as its system prompt and sees the agent's
    messages as the other side; it ends with :data:`STOP` when its goal is met.

    Args:
        task: the task whose user to play.
        model: the model the endpoint serves.
        base_url: the endpoint (e.g. ``http://localhost:8000/v1``).
        api_key: default ``OPENAI_API_KEY`` from the environment, else "none".
        temperature: sampling temperature; ``seed`` is passed to the endpoint.
        client: an ``openai.OpenAI``-like client to use instead of making one.
    """

    def __init__(
        self,
        task: Task,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
        client: Any = None,
    ) -> None:
        if client is None:
            openai = require("openai", extra="agentic", purpose="k2.agentic's OpenAI-endpoint user")
            client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "none"))
        self.client = client
        self.model = model
        self.temperature = temperature
        self.seed = seed
        ins = task.instructions
        if isinstance(ins, Mapping):
            parts = [f"{k.replace('_', ' ').capitalize()}: {v}" for k, v in ins.items() if isinstance(v, str) and k != "domain"]
            instructions = "\n".join(parts)
        else:
            instructions = str(ins)
        persona = f"Persona: {task.persona}\n" if task.persona else ""
        self.history: list[dict[str, str]] = [{
            "role": "system",
            "content": (
                "You play a customer talking to a support agent. Stay in character, reveal "
                "information only when asked, and never invent facts you were not given. When "
                f"your goal is met (or cannot be), reply with {STOP} at the end.\n"
                f"{persona}{instructions}"
            ),
        }]

    def _ask(self) -> str:
        options: dict[str, Any] = {"model": self.model, "messages": self.history, "temperature": self.temperature}
        if self.seed is not None:
            options["seed"] = self.seed
        reply = self.client.chat.completions.create(**options)
        text = reply.choices[0].message.content or ""
        self.history.append({"role": "assistant", "content": text})
        return text

    def start(self) -> str:
        self.history.append({"role": "user", "content": "(The agent greets you: Hi! How can I help you today?)"})
        return self._ask()

    def respond(self, agent_message: str) -> str:
        self.history.append({"role": "user", "content": agent_message})
        return self._ask()
