"""OpenAI-compatible chat endpoints for every synthesis role (docs/synthesis.md).

The programmatic roles are the default and need no network. For a user with a strong model,
each role can instead ask an endpoint (``openai`` package, the ``agentic`` extra; base URL, model
and key from the options):

- tool evolution: :class:`OpenAIRewriter` rewords each variant's description;
- the user: :func:`openai_user` (k2.agentic's :class:`~k2.agentic.users.OpenAIUser`);
- the expert: :class:`OpenAIExpert` writes each assistant turn from the conversation and the
  declared tools (the endpoint's own ``tool_calls``);
- the judge: :class:`OpenAIRubricJudge` adds the endpoint's verdict on the rubric to the
  programmatic checks (it can only reject more).

The tests check the requests these build against a fake client; the calls to a live endpoint
(``client.chat.completions.create``) are the only untested lines. Output made with an endpoint
is as deterministic as the endpoint (temperature 0 and the episode's seed are sent).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from k2.agentic.env import AgentEnv
from k2.agentic.synth.expert import Played
from k2.agentic.users import OpenAIUser
from k2.errors import ConfigError, SynthError
from k2.optional import require


def make_client(base_url: str | None, api_key: str | None) -> Any:
    """An ``openai.OpenAI`` client (the key defaults to ``OPENAI_API_KEY``, else "none")."""
    openai = require("openai", extra="agentic", purpose="k2 synth's OpenAI-endpoint roles")
    return openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "none"))


class _Endpoint:
    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, client: Any = None,
                 seed: int | None = 0) -> None:
        if not model:
            raise ConfigError("synth: an OpenAI-endpoint role needs --openai-model")
        self.model = model
        self.seed = seed
        self.client = client if client is not None else make_client(base_url, api_key)

    def request(self, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """The keyword arguments of ``chat.completions.create`` for these messages."""
        options: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0, **extra}
        if self.seed is not None:
            options["seed"] = self.seed
        return options

    def ask(self, messages: list[dict[str, Any]], **extra: Any) -> Any:
        return self.client.chat.completions.create(**self.request(messages, **extra))  # live call


class OpenAIRewriter(_Endpoint):
    """Rewords a tool description without changing what it says (tool evolution)."""

    PROMPT = (
        "Reword this description of a software tool for an API reference. Keep every fact, "
        "format and constraint; change only the wording. Answer with the new description only."
    )

    def request_for(self, text: str) -> dict[str, Any]:
        return self.request([{"role": "system", "content": self.PROMPT}, {"role": "user", "content": text}])

    def __call__(self, text: str) -> str:
        reply = self.client.chat.completions.create(**self.request_for(text))  # live call
        out = (reply.choices[0].message.content or "").strip()
        return out or text


def openai_user(model: str, base_url: str | None = None, api_key: str | None = None, client: Any = None):
    """A user factory ``(task, seed) -> OpenAIUser`` for :class:`~k2.agentic.synth.pipeline.Synthesizer`."""
    if not model:
        raise ConfigError("synth: --user openai needs --openai-model")
    shared = client if client is not None else make_client(base_url, api_key)
    return lambda task, seed: OpenAIUser(task, model, client=shared, seed=seed)


def _message(choice: Any) -> dict[str, Any]:
    """An assistant message dict from an OpenAI response choice's ``message``."""
    msg = choice.message
    out: dict[str, Any] = {"role": "assistant", "content": msg.content or ""}
    calls = getattr(msg, "tool_calls", None) or []
    if calls:
        out["tool_calls"] = [
            {"id": "", "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in calls
        ]
    return out


class OpenAIExpert(_Endpoint):
    """An expert played by an endpoint: each assistant turn is the model's reply to the
    conversation so far with the agent's tools declared (it does not see the plan). The plan's
    role is then only the grade: the judge keeps what solves the task."""

    def __init__(self, *args: Any, max_turns: int = 16, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_turns = max_turns

    def request_for(self, env: AgentEnv) -> dict[str, Any]:
        return self.request([dict(m) for m in env.messages], tools=env.tools, tool_choice="auto")

    def play(self, env: AgentEnv) -> Played:
        env.reset()
        played = Played([], None, None)
        for _ in range(self.max_turns):
            if env.done:
                break
            reply = self.client.chat.completions.create(**self.request_for(env))  # live call
            message = _message(reply.choices[0])
            played.calls += len(message.get("tool_calls") or ())
            env.step(message)
        if not env.done:
            played.bail = f"the endpoint's expert did not finish within {self.max_turns} turns"
        played.messages, played.termination, played.grade = list(env.messages), env.termination, env.grade
        return played


class OpenAIRubricJudge(_Endpoint):
    """Asks an endpoint whether a trajectory meets the quality rubric; returns reasons to reject
    (``judge_rejected: ...``), empty to keep."""

    PROMPT = (
        "You review a conversation in which an assistant used the declared tools for a user. "
        "Check: it used only declared tools with arguments matching their schemas, it asked for "
        "what it did not know, and it told the user the outcome. Answer with JSON only: "
        '{"keep": true} or {"keep": false, "reason": "..."}.'
    )

    def request_for(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        transcript = json.dumps({"tools": list(tools), "messages": list(messages)}, ensure_ascii=False)
        return self.request([{"role": "system", "content": self.PROMPT}, {"role": "user", "content": transcript}])

    def __call__(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[str]:
        reply = self.client.chat.completions.create(**self.request_for(messages, tools))  # live call
        return self.verdict(reply.choices[0].message.content or "")

    @staticmethod
    def verdict(text: str) -> list[str]:
        m = re.search(r"\{.*\}", text, re.S)
        try:
            data = json.loads(m.group(0)) if m else None
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("keep"), bool):
            raise SynthError(f"synth: the judge endpoint's answer is not the JSON asked for: {text[:200]!r}")
        return [] if data["keep"] else ["judge_rejected"]
