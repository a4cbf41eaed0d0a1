"""Chat-completion requests and responses in the OpenAI schema (docs/serve.md).

:func:`parse_chat_request` checks a decoded JSON body field by field and returns a
:class:`ChatRequest`, or raises :class:`~k2.errors.ServeError` naming the field at fault (the
server answers it with a 400 in OpenAI's error format, :func:`error_body`). :func:`choice_of`
turns what the model generated into an OpenAI ``choice``: the text is untrusted, so a tool-calls
section that does not parse never raises — its broken calls are left out of ``tool_calls`` and
the raw text is kept as the content.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from k2.agentic.calls import IM_END, parse_assistant
from k2.errors import ServeError

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_N = 16
MAX_STOP = 4


@dataclass
class ChatRequest:
    """A validated ``POST /v1/chat/completions`` body (only the fields k2 acts on)."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "auto"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    stream: bool = False

    @property
    def forced_tool(self) -> str | None:
        """The function name ``tool_choice`` names, if it names one."""
        if isinstance(self.tool_choice, dict):
            return self.tool_choice["function"]["name"]
        return None


def _bad(name: str, why: str) -> ServeError:
    return ServeError(f"'{name}' {why}", field=name)


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _bad(name, f"must be a number, got {value!r}")
    if not low <= value <= high:
        raise _bad(name, f"must be in [{low}, {high}], got {value!r}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise _bad(name, f"must be in [{low}, {high if high is not None else 'inf'}], got {value}")
    return value


def _content_ok(content: Any) -> bool:
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    )


def _message(i: int, message: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise _bad(where, "must be an object")
    role = message.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    if not _content_ok(message.get("content")):
        raise _bad(f"{where}.content", "must be a string, null or a list of text parts")
    if message.get("content") is None and not (role == "assistant" and message.get("tool_calls")):
        raise _bad(f"{where}.content", "is required")
    if message.get("name") is not None and not isinstance(message["name"], str):
        raise _bad(f"{where}.name", "must be a string")
    out = dict(message)
    if role == "developer":
        out["role"] = "system"  # K2's format has no developer role; it is the system prompt
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise _bad(f"{where}.tool_call_id", "is required for a tool message (a string)")
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise _bad(f"{where}.tool_calls", "must be a list, on an assistant message")
        for j, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not isinstance(
                fn.get("arguments"), (str, Mapping)
            ):
                raise _bad(f"{where}.tool_calls[{j}].function", "needs a name and arguments")
    return out


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad("tools", "must be a list")
    names = set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise _bad(f"{where}.type", "must be 'function'")
        fn = tool.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"{where}.function.name", "is required (a non-empty string)")
        if fn["name"] in names:
            raise _bad(f"{where}.function.name", f"repeats {fn['name']!r}")
        names.add(fn["name"])
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, Mapping) or params.get("type", "object") != "object"):
            raise _bad(f"{where}.function.parameters", "must be a JSON Schema of type object")
    return [dict(t) for t in value] or None


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    if value is None:
        return "auto"
    if value in ("auto", "none", "required"):
        if value == "required" and not tools:
            raise _bad("tool_choice", "is 'required' but no tools are given")
        return value
    fn = value.get("function") if isinstance(value, Mapping) and value.get("type") == "function" else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise _bad("tool_choice", "must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}")
    if fn["name"] not in {t["function"]["name"] for t in tools or ()}:
        raise _bad("tool_choice", f"names {fn['name']!r}, which is not among the tools")
    return {"type": "function", "function": {"name": fn["name"]}}


def parse_chat_request(body: Any, model_name: str) -> ChatRequest:
    """Validate a decoded chat-completion body.

    Raises:
        ServeError: naming the field at fault (status 404 for an unknown model).
    """
    if not isinstance(body, Mapping):
        raise ServeError("the request body must be a JSON object", field=None)
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model", "is required (a string)")
    if model != model_name:
        raise ServeError(f"model {model!r} does not exist; this server serves {model_name!r}", field="model",
                         status=404, code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "is required (a non-empty list)")
    tools = _tools(body.get("tools"))
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP} of them")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed", f"must be an integer, got {seed!r}")
    for name in ("logprobs", "top_logprobs", "response_format", "logit_bias"):
        if body.get(name):
            raise ServeError(f"'{name}' is not supported by k2 serve", field=name)
    return ChatRequest(
        model=model,
        messages=[_message(i, m) for i, m in enumerate(messages)],
        tools=tools,
        tool_choice=_tool_choice(body.get("tool_choice"), tools),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        max_tokens=_integer(body, "max_completion_tokens", 1) or _integer(body, "max_tokens", 1),
        stop=stop,
        n=_integer(body, "n", 1, MAX_N) or 1,
        seed=seed,
        stream=stream,
    )


def error_body(message: str, field: str | None = None, code: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's error format."""
    kind = "invalid_request_error" if code in ("invalid_request_error", "model_not_found") else code
    return {"error": {"message": message, "type": kind, "param": field, "code": code}}


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded), and whether one was found."""
    cut = min((at for at in (text.find(s) for s in stop) if at >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def choice_of(index: int, text: str, engine_finish: str | None, stop: list[str], tools_on: bool) -> dict[str, Any]:
    """An OpenAI ``choice`` from the decoded text of one completion (special tokens kept).

    ``engine_finish`` is the engine's reason (``stop`` or ``length``). Calls that parse become
    ``message.tool_calls`` and make the reason ``tool_calls``; when none parses, the raw text
    is the content.
    """
    text = text.split(IM_END, 1)[0]
    text, stopped = cut_at_stop(text, stop)
    turn = parse_assistant(text) if tools_on else None
    calls = [c for c in turn.calls if c.error is None and c.name] if turn is not None else []
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish = "stop" if stopped else (engine_finish or "stop")
    if calls:
        assert turn is not None
        message["content"] = turn.content or None
        message["tool_calls"] = [c.to_openai() for c in calls]
        if not turn.truncated:
            finish = "tool_calls"
    return {"index": index, "message": message, "finish_reason": finish, "logprobs": None}
