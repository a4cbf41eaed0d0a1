"""Shared pieces of the k2 serve tests: tool declarations, a uvicorn server in a thread on a
free local port, and a plain HTTP helper."""

from __future__ import annotations

import json
import socket
import threading
import time

from k2.data.chat import render_chat

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                    "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "b": {"type": "boolean"}},
        "required": ["a", "b"], "additionalProperties": False}}},
]


def corpus() -> list[str]:
    """Chat renderings with tool calls, so the tokenizer learns the words of the tests."""
    texts = []
    for i in range(40):
        messages = [
            {"role": "user", "content": f"What is the weather in Paris for {i % 7 + 1} days? Say hello {i}."},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": i % 7 + 1}}}]},
            {"role": "tool", "tool_call_id": "c", "content": json.dumps({"temp": i, "sky": "clear"})},
            {"role": "assistant", "content": f"It is {i} degrees and clear."},
        ]
        texts.append(render_chat(messages, TOOLS))
    return texts


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    """A plain HTTP request (the standard library's client): status and body."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving ``app`` in a daemon thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def slow_copy(model, step_s: float):
    """A copy of ``model`` whose forwards take ``step_s`` longer (so a test can act mid-generation)."""
    import copy

    slow = copy.deepcopy(model)
    forward = slow.forward

    def slow_forward(*args, **kw):
        time.sleep(step_s)
        return forward(*args, **kw)

    slow.forward = slow_forward
    return slow


def run_to_budget(service):
    """Make ``service``'s requests ignore ``<|im_end|>`` and run to ``max_tokens`` (a known length)."""
    import dataclasses

    plain = service.engine_requests

    def without_stop(req):
        prompt, requests = plain(req)
        return prompt, [dataclasses.replace(r, stop_ids=()) for r in requests]

    service.engine_requests = without_stop
    return service


def slow_service(model, tokenizer, *, step_s: float, to_budget: bool = False, **kwargs):
    """A ChatService on :func:`slow_copy` of ``model``; with ``to_budget``, :func:`run_to_budget`."""
    from k2.serve.app import ChatService

    service = ChatService(slow_copy(model, step_s), tokenizer, model_name="tiny", **kwargs)
    return run_to_budget(service) if to_budget else service
