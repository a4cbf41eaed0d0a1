"""Streamed chat completions through the openai client: the deltas add up to the non-streamed
response (content, tool calls, finish reasons, usage), and the stream ends with [DONE]."""

from __future__ import annotations

import json

import pytest

from serve_helpers import TOOLS, http

USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def collect(stream):
    contents: dict[int, str] = {}
    calls: dict[int, dict[int, dict]] = {}
    finish: dict[int, str] = {}
    usage = None
    chunks = 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                contents[choice.index] = contents.get(choice.index, "") + delta.content
            for call in delta.tool_calls or ():
                slot = calls.setdefault(choice.index, {}).setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.id or slot["id"]
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return contents, calls, finish, usage, chunks


def test_streamed_text_equals_the_whole_response(client):
    args = dict(model="tiny", messages=USER, max_tokens=20, n=2, seed=9)
    whole = client.chat.completions.create(**args)
    contents, calls, finish, usage, chunks = collect(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks > 3  # token by token, not one final chunk
    for choice in whole.choices:
        assert contents.get(choice.index, "") == choice.message.content
        assert finish[choice.index] == choice.finish_reason
    assert not calls
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_tool_calls_equal_the_whole_response(client):
    args = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=80, n=2, seed=5)
    whole = client.chat.completions.create(**args)
    _, calls, finish, _, _ = collect(client.chat.completions.create(**args, stream=True))
    for choice in whole.choices:
        assert finish[choice.index] == choice.finish_reason
        expected = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
        got = [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.get(choice.index, {}).items())]
        assert got == expected
    assert any(choice.message.tool_calls for choice in whole.choices)


def test_stream_with_stop_string_and_raw_sse(client, server):
    base = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, seed=4)
    text = base.choices[0].message.content
    if len(text) < 6:
        pytest.skip("too short a completion to cut")
    stop = text[3:6]
    contents, _, finish, _, _ = collect(client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=24, seed=4, stop=stop, stream=True))
    assert contents.get(0, "") == text[: text.find(stop)] and finish[0] == "stop"
    body = json.dumps({"model": "tiny", "messages": USER, "max_tokens": 5, "stream": True}).encode()
    status, raw = http("POST", server.url + "/v1/chat/completions", body)
    events = [line for line in raw.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
