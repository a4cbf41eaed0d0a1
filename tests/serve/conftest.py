"""Fixtures for the k2 serve tests: a tiny random model with a small K2 tokenizer, served by
uvicorn in a thread on a free local port, and the real ``openai`` client pointed at it."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("llguidance")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_helpers import randomize, small_config  # noqa: E402

from k2.data.chat import render_chat  # noqa: E402

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


def _corpus() -> list[str]:
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


@pytest.fixture(scope="session")
def tiny():
    from k2.data.tokenizer import train_tokenizer
    from k2.model import K2ForCausalLM

    tokenizer = train_tokenizer(_corpus(), 400)
    torch.manual_seed(0)
    config = small_config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=512, rope_scaling=None)
    model = randomize(K2ForCausalLM(config), 0, scale=0.15).eval()
    return model, tokenizer


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


@pytest.fixture(scope="module")
def service(tiny):
    from k2.serve.app import ChatService

    model, tokenizer = tiny
    svc = ChatService(model, tokenizer, model_name="tiny", max_batch=4, max_queue=16)
    yield svc
    svc.scheduler.stop()


@pytest.fixture(scope="module")
def server(service):
    from k2.serve.app import create_app

    srv = Server(create_app(service))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
