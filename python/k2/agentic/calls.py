"""Parsing and rendering K2 tool calls, whole or streamed (docs/chat-format.md).

An assistant turn is its content, then optionally a tool-calls section::

    CONTENT<|tool_calls_section_begin|>
    <|tool_call_begin|>functions.NAME:N<|tool_call_argument_begin|>JSON<|tool_call_end|>
    ...<|tool_calls_section_end|>

(no newlines in the real text). The parser splits on the special tokens only, so braces and
escaped quotes inside JSON strings are never misread; a call whose arguments are not a JSON object
comes back with ``error`` set (naming the call) rather than raising; a section cut off by the
token budget yields its complete calls and flags the unfinished one. OpenAI-format messages
(``tool_calls`` with ``id``; ``role: "tool"`` with ``tool_call_id``) convert both ways.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from k2.errors import AgenticError

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
IM_END = "<|im_end|>"
MAX_ARGUMENT_CHARS = 64 * 1024
"""Longer argument text is refused with a structured error instead of being parsed."""


@dataclass
class ToolCall:
    """One tool call.

    ``id`` is K2's ``functions.NAME:N`` (the string a tool result's ``## Return of`` names);
    ``arguments`` is the parsed JSON object, or None when ``error`` says why it could not be.
    """

    name: str
    arguments: dict[str, Any] | None
    id: str = ""
    raw_arguments: str = ""
    error: str | None = None

    def __post_init__(self) -> None:
        if not self.raw_arguments and self.arguments is not None:
            self.raw_arguments = json.dumps(self.arguments, ensure_ascii=False)

    @property
    def index(self) -> int | None:
        """The ``N`` of ``functions.NAME:N``, if the id has one."""
        _, _, tail = self.id.rpartition(":")
        return int(tail) if tail.isdigit() else None

    def to_openai(self) -> dict[str, Any]:
        """``{"id", "type": "function", "function": {"name", "arguments": JSON text}}``."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.raw_arguments},
        }

    @classmethod
    def from_openai(cls, call: Mapping[str, Any]) -> ToolCall:
        """Read an OpenAI (or Hugging Face) tool call; arguments may be a dict or JSON text."""
        fn = call.get("function") or call
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise AgenticError(f"tool call {call!r} has no function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            parsed, error = _parse_arguments(fn["name"], args)
            return cls(fn["name"], parsed, str(call.get("id") or ""), args, error)
        if not isinstance(args, Mapping):
            raise AgenticError(f"tool call {fn['name']}: arguments must be an object or JSON text")
        return cls(fn["name"], dict(args), str(call.get("id") or ""))


@dataclass
class AssistantTurn:
    """A parsed assistant turn: ``content`` (text before the section), ``calls``, and whether
    the section was cut off before ``<|tool_calls_section_end|>``."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    truncated: bool = False


def _parse_arguments(label: str, raw: str) -> tuple[dict[str, Any] | None, str | None]:
    if len(raw) > MAX_ARGUMENT_CHARS:
        return None, f"arguments of {label} are {len(raw)} characters, over the limit of {MAX_ARGUMENT_CHARS}"
    text = raw.strip()
    if not text:
        return {}, None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"arguments of {label} are not valid JSON: {err.msg} at character {err.pos}"
    if not isinstance(value, dict):
        return None, f"arguments of {label} must be a JSON object, not {type(value).__name__}"
    return value, None


def _parse_call(chunk: str, complete: bool) -> ToolCall:
    """One call from the text between ``<|tool_call_begin|>`` and ``<|tool_call_end|>``."""
    header, sep, raw = chunk.partition(ARG_BEGIN)
    header = header.strip()
    name = header.removeprefix("functions.")
    name, colon, counter = name.rpartition(":")
    if not colon or not counter.strip().isdigit():
        name = header.removeprefix("functions.")
    name = name.strip()
    call_id = header
    if not complete:
        return ToolCall(name, None, call_id, raw, f"tool call {call_id or '?'} was cut off before {CALL_END}")
    if not sep:
        return ToolCall(name, None, call_id, "", f"tool call {call_id or '?'} has no {ARG_BEGIN}")
    if not name:
        return ToolCall("", None, call_id, raw, f"tool call {call_id!r} has no function name")
    arguments, error = _parse_arguments(call_id, raw)
    return ToolCall(name, arguments, call_id, raw, error)


def parse_assistant(text: str) -> AssistantTurn:
    """Split an assistant turn (as sampled, with or without ``<|im_end|>``) into content and calls."""
    text = text.split(IM_END, 1)[0]
    start = text.find(SECTION_BEGIN)
    if start < 0:
        start = text.find(CALL_BEGIN)  # a section whose begin token was dropped
        if start < 0:
            return AssistantTurn(text)
        content, section = text[:start], text[start:]
    else:
        content, section = text[:start], text[start + len(SECTION_BEGIN) :]
    section, closed, _ = section.partition(SECTION_END)
    calls = []
    pieces = section.split(CALL_BEGIN)[1:]
    truncated = not closed
    for piece in pieces:
        body, ended, _ = piece.partition(CALL_END)
        calls.append(_parse_call(body, bool(ended)))
        if not ended:
            truncated = True
    return AssistantTurn(content, calls, truncated)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The tool calls of an assistant turn in K2's format (see :func:`parse_assistant`)."""
    return parse_assistant(text).calls


def render_tool_calls(calls: Sequence[ToolCall], start: int = 0) -> str:
    """The tool-calls section for ``calls``; a call without an id is numbered from ``start``."""
    if not calls:
        return ""
    parts = [SECTION_BEGIN]
    for i, call in enumerate(calls):
        call_id = call.id or f"functions.{call.name}:{start + i}"
        raw = call.raw_arguments if call.raw_arguments else json.dumps(call.arguments or {}, ensure_ascii=False)
        parts.append(f"{CALL_BEGIN}{call_id}{ARG_BEGIN}{raw}{CALL_END}")
    parts.append(SECTION_END)
    return "".join(parts)


def render_assistant(content: str, calls: Sequence[ToolCall] = (), start: int = 0) -> str:
    """An assistant turn's text (without the ``<|im_end|>``): the inverse of :func:`parse_assistant`."""
    return content + render_tool_calls(calls, start)


def assistant_message(turn: AssistantTurn) -> dict[str, Any]:
    """The OpenAI-format assistant message of a parsed turn."""
    message: dict[str, Any] = {"role": "assistant", "content": turn.content}
    if turn.calls:
        message["tool_calls"] = [c.to_openai() for c in turn.calls]
    return message


def tool_message(call_id: str, content: str) -> dict[str, Any]:
    """The OpenAI-format tool result message for the call ``call_id``."""
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def calls_from_message(message: Mapping[str, Any]) -> list[ToolCall]:
    """The tool calls of an OpenAI-format assistant message."""
    return [ToolCall.from_openai(c) for c in message.get("tool_calls") or ()]


def render_tool_result(call_id: str, content: str) -> str:
    """A tool result in K2's format: a system-side message named ``tool``."""
    return f"<|im_system|>tool<|im_middle|>## Return of {call_id}\n{content}{IM_END}"


class StreamingToolCallParser:
    """Parses an assistant turn as it streams in, yielding each call when its end token arrives.

    ``feed(text)`` returns the calls completed by that piece; :attr:`content` is the text before
    the section so far; ``close()`` returns the final :class:`AssistantTurn` (a call still open
    then comes back flagged as cut off). Pieces may split special tokens anywhere.
    """

    def __init__(self) -> None:
        self._text = ""
        self._scan = 0
        self._done = 0
        self.calls: list[ToolCall] = []

    @property
    def content(self) -> str:
        """The text before the tool-calls section (all text so far if none began)."""
        text = self._text.split(IM_END, 1)[0]
        for token in (SECTION_BEGIN, CALL_BEGIN):
            at = text.find(token)
            if at >= 0:
                return text[:at]
        # hold back a prefix of a special token that may still be completing
        tail = text.rfind("<|")
        if tail >= 0 and "|>" not in text[tail:]:
            return text[:tail]
        return text

    def feed(self, text: str) -> list[ToolCall]:
        """Add the next piece of text; return the calls it completed."""
        self._text += text
        new = []
        while True:
            end = self._text.find(CALL_END, self._scan)
            if end < 0:
                self._scan = max(self._scan, len(self._text) - len(CALL_END) + 1)
                break
            begin = self._text.rfind(CALL_BEGIN, 0, end)
            if begin >= 0:
                call = _parse_call(self._text[begin + len(CALL_BEGIN) : end], True)
                self.calls.append(call)
                new.append(call)
            self._scan = end + len(CALL_END)
        return new

    def close(self) -> AssistantTurn:
        """The whole turn, parsed (its calls equal to those :meth:`feed` yielded, plus any cut off)."""
        return parse_assistant(self._text)


def iter_tool_calls(pieces: Iterable[str]) -> Iterable[ToolCall]:
    """Yield calls from a stream of text pieces as each completes."""
    parser = StreamingToolCallParser()
    for piece in pieces:
        yield from parser.feed(piece)
