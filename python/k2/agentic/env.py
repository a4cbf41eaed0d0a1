"""The Gym-style agent environment (docs/agentic.md).

``env = make_env(domain, task, user=..., seed=...)``; ``obs = env.reset()``;
``obs, reward, done, info = env.step(action)`` where ``action`` is the assistant's turn as
sampled: text, or token ids (then ``obs.ids`` holds the observation's ids, so the training
sequence is prompt ids + sampled ids + observation ids + ... and is never re-encoded).

A turn with tool calls runs them in order against the domain and observes the tool results; a
turn without calls goes to the user simulator and observes its reply. The episode ends when the
user says ``###STOP###`` (``user_stop``), the agent does (``agent_stop``), after ``max_turns``
messages to the user or ``max_steps`` steps. ``obs.text`` is the K2-format text that follows
the assistant's turn — ``<|im_end|>`` if the sample lacked it, the new messages, and the next
``<|im_assistant|>assistant<|im_middle|>`` — so the concatenated episode equals
``render_chat(info["messages"], tools)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from k2.agentic.calls import (
    IM_END,
    assistant_message,
    calls_from_message,
    parse_assistant,
    render_assistant,
    render_tool_result,
    tool_message,
)
from k2.agentic.domain import Domain, ToolResult
from k2.agentic.grading import Grade, Judge, grade, initial_domain, replay_calls
from k2.agentic.tasks import Task
from k2.agentic.users import STOP, OpenAIUser, ProgrammaticUser, UserSimulator
from k2.data.chat import render_chat
from k2.data.tokenizer import SPECIAL_TOKENS
from k2.errors import AgenticError

GENERATION_PROMPT = "<|im_assistant|>assistant<|im_middle|>"
_PREFIXES: dict[tuple[Any, ...], str] = {}


@dataclass
class Observation:
    """What the agent sees next: the new OpenAI-format ``messages``, their K2-format ``text``
    (ending with the assistant prompt unless the episode is over) and its token ``ids`` (when
    the environment has a tokenizer)."""

    messages: list[dict[str, Any]]
    text: str
    ids: list[int] | None = None


_RESERVED = tuple(SPECIAL_TOKENS)


def neutralize(text: str) -> str:
    """``text`` with every reserved token string broken by a zero-width space after ``<|``, so
    that tokenizing an observation never yields a reserved id from tool or user content."""
    if "<|" not in text:
        return text
    for token in _RESERVED:
        if token in text:
            text = text.replace(token, "<\u200b|" + token[2:])
    return text


def _user_message_text(content: str) -> str:
    return f"<|im_user|>user<|im_middle|>{content}{IM_END}"


class AgentEnv:
    """One episode at a time of an agent against a domain, a task and a user simulator.

    Args:
        domain: a registered name, ``module:Class``, a Domain class or an instance (used as the
            prototype: each reset starts from a fresh copy set up for the task).
        task: the task (its user instructions, initial state and grading); None gives a free
            conversation with no reward.
        user: ``"programmatic"`` (default), a :class:`~k2.agentic.users.UserSimulator`, or a
            callable ``(task, seed) -> UserSimulator`` (e.g. to make an :class:`OpenAIUser`).
        seed: seeds the user simulator and the domain's stochastic failures.
        tokenizer: a ``tokenizers.Tokenizer``; needed to step with token ids and to get ``obs.ids``.
        stochastic, failure_rate: the domain's simulated transient failures.
        max_turns: most agent messages to the user; max_steps: most steps in all.
        judge: decides NL assertions when grading.
        system_prompt: text before the domain's policy in the system message.
    """

    def __init__(
        self,
        domain: str | type[Domain] | Domain,
        task: Task | None = None,
        *,
        user: str | UserSimulator | Callable[[Task, int], UserSimulator] = "programmatic",
        seed: int = 0,
        tokenizer: Any = None,
        stochastic: bool = False,
        failure_rate: float = 0.1,
        max_turns: int = 20,
        max_steps: int = 60,
        judge: Judge | None = None,
        system_prompt: str = "",
    ) -> None:
        self.domain_spec = domain
        self.task = task
        self.user_spec = user
        self.seed = seed
        self.tokenizer = tokenizer
        self.stochastic = stochastic
        self.failure_rate = failure_rate
        self.max_turns = max_turns
        self.max_steps = max_steps
        self.judge = judge
        self.system_prompt = system_prompt
        self.domain: Domain | None = None
        self.done = True
        self.messages: list[dict[str, Any]] = []
        self.tools: list[dict[str, Any]] = []

    # ---- helpers -----------------------------------------------------------------------------
    def _make_user(self) -> UserSimulator:
        spec = self.user_spec
        if spec == "programmatic":
            if self.task is None:
                raise AgenticError("the programmatic user needs a task to play")
            return ProgrammaticUser(self.task, seed=self.seed)
        if isinstance(spec, str):
            raise AgenticError(f"unknown user {spec!r}: use 'programmatic', a simulator or a factory")
        if hasattr(spec, "respond"):
            return spec  # type: ignore[return-value]
        return spec(self.task, self.seed)  # type: ignore[operator,arg-type]

    def _encode(self, text: str) -> list[int] | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    # ---- Gym API -----------------------------------------------------------------------------
    def reset(self) -> Observation:
        """Start an episode: a fresh domain for the task, the system message (policy), the
        task's message history (its tool calls replayed), and the user's opening message — or,
        when the history ends with the agent speaking, the user's reply."""
        self.domain = initial_domain(
            self.domain_spec, self.task, stochastic=self.stochastic, failure_rate=self.failure_rate, seed=self.seed
        )
        self.tools = self.domain.tool_specs()
        self.user = self._make_user()
        policy = "\n\n".join(p for p in (self.system_prompt, self.domain.policy) if p)
        self.messages = [{"role": "system", "content": policy}] if policy else []
        history = self.task.message_history if self.task is not None else []
        with self.domain.deterministic():
            for message in history:
                if message.get("role") == "assistant":
                    replay_calls(self.domain, calls_from_message(message))
        self.messages.extend(dict(m) for m in history)
        self.calls_made = sum(len(m.get("tool_calls") or ()) for m in history if m.get("role") == "assistant")
        if not history:
            self.messages.append({"role": "user", "content": neutralize(self.user.start())})
        elif history[-1].get("role") == "assistant" and not history[-1].get("tool_calls"):
            reply = self.user.respond(history[-1].get("content") or "")
            self.messages.append({"role": "user", "content": neutralize(reply)})
        # after a user or tool message it is the agent's turn
        self.turns = 0
        self.steps = 0
        self.done = False
        self.termination: str | None = None
        self.grade: Grade | None = None
        text = self._render_start(policy, history)
        ids = None
        if self.tokenizer is not None:  # the same prompt recurs every episode of a task: cache it
            cache = self.__dict__.setdefault("_prompt_ids", {})
            ids = cache.get(text)
            if ids is None:
                if len(cache) > 64:
                    cache.clear()
                ids = cache[text] = self.tokenizer.encode(text, add_special_tokens=False).ids
            ids = list(ids)
        return Observation(list(self.messages), text, ids)

    def _render_start(self, policy: str, history: list[dict[str, Any]]) -> str:
        """``render_chat(self.messages, self.tools, add_generation_prompt=True)``, with the
        tool declarations and policy rendered once per domain."""
        assert self.domain is not None
        # prompt_key: domains whose tools vary per instance (k2.agentic.synth's VariantDomain) say which
        key = (type(self.domain), self.domain.name, policy, getattr(self.domain, "prompt_key", None))
        cache = _PREFIXES
        prefix = cache.get(key)
        if prefix is None:
            if len(cache) >= 4096:
                cache.clear()
            head = [{"role": "system", "content": policy}] if policy else []
            prefix = cache[key] = render_chat(head, self.tools)
        rest = self.messages[1:] if policy else self.messages
        if history:
            return prefix + render_chat(rest, add_generation_prompt=True)
        return prefix + "".join(_user_message_text(m["content"]) for m in rest) + GENERATION_PROMPT

    def step(
        self, action: str | Sequence[int] | Mapping[str, Any]
    ) -> tuple[Observation, float | None, bool, dict[str, Any]]:
        """Play one assistant turn: the sampled text or token ids, or an OpenAI-format assistant
        message (whose calls then get K2's ``functions.NAME:N`` ids, which the tool messages
        carry).

        Returns:
            (observation, reward, done, info). ``reward`` is 0.0 until the episode ends, then the
            grade's reward (None when ungraded); ``info`` has ``messages`` (the trajectory so
            far, OpenAI format), ``termination``, ``tool_results`` and at the end ``grade``.
        """
        if self.done or self.domain is None:
            raise AgenticError("the episode is over (or never began): call reset()")
        if isinstance(action, str):
            text = action
        elif isinstance(action, Mapping):  # an OpenAI-format assistant message
            calls = calls_from_message(action)
            for i, call in enumerate(calls):
                call.id = f"functions.{call.name}:{self.calls_made + i}"
            text = render_assistant(str(action.get("content") or ""), calls) + IM_END
        else:
            if self.tokenizer is None:
                raise AgenticError("stepping with token ids needs a tokenizer: make_env(..., tokenizer=...)")
            text = self.tokenizer.decode(list(action), skip_special_tokens=False)
        self.steps += 1
        turn = parse_assistant(text)
        new: list[dict[str, Any]] = []
        pieces: list[str] = [] if IM_END in text else [IM_END]
        message = assistant_message(turn)
        results: list[ToolResult] = []
        if turn.calls:
            for i, call in enumerate(turn.calls):
                if not call.id:
                    call.id = f"functions.{call.name}:{self.calls_made}"
                    message["tool_calls"][i]["id"] = call.id
                self.calls_made += 1
                result = self.domain.execute(call)
                results.append(result)
                content = neutralize(result.content)
                new.append(tool_message(call.id, content))
                pieces.append(render_tool_result(call.id, content))
            self.messages.append(message)
        else:
            self.messages.append(message)
            if STOP in turn.content:
                self.done, self.termination = True, "agent_stop"
            else:
                self.turns += 1
                reply = neutralize(self.user.respond(turn.content))
                new.append({"role": "user", "content": reply})
                pieces.append(_user_message_text(reply))
                if STOP in reply:
                    self.done, self.termination = True, "user_stop"
        self.messages.extend(new)
        if not self.done and self.turns >= self.max_turns:
            self.done, self.termination = True, "max_turns"
        if not self.done and self.steps >= self.max_steps:
            self.done, self.termination = True, "max_steps"
        reward: float | None = 0.0
        info: dict[str, Any] = {"messages": self.messages, "termination": self.termination, "tool_results": results}
        if self.done:
            if self.task is not None:
                self.grade = grade(self.task, self.domain, self.messages, judge=self.judge, termination=self.termination)
                reward = self.grade.reward
                info["grade"] = self.grade
        else:
            pieces.append(GENERATION_PROMPT)
        obs_text = "".join(pieces)
        return Observation(new, obs_text, self._encode(obs_text)), reward, self.done, info


def make_env(
    domain: str | type[Domain] | Domain,
    task: Task | str | None = None,
    *,
    user: str | UserSimulator | Callable[[Task, int], UserSimulator] = "programmatic",
    seed: int = 0,
    **options: Any,
) -> AgentEnv:
    """Make an environment; ``task`` may be a :class:`Task` or the id of a built-in example task
    of the domain. ``user="openai"`` needs ``user_model`` and ``user_base_url`` options."""
    if isinstance(task, str):
        from k2.agentic.tasks import example_tasks, find_task

        name = domain if isinstance(domain, str) else getattr(domain, "name", "")
        task = find_task(example_tasks(name), task)
    if user == "openai":
        model = options.pop("user_model", None)
        base_url = options.pop("user_base_url", None)
        if not model:
            raise AgenticError("user='openai' needs user_model= (and user_base_url= for a local endpoint)")
        user = lambda t, s: OpenAIUser(t, model=model, base_url=base_url, seed=s)  # noqa: E731
    return AgentEnv(domain, task, user=user, seed=seed, **options)
