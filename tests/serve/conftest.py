"""Fixtures for the k2 serve tests: a tiny random model with a small K2 tokenizer, served by
uvicorn in a thread on a free local port, and the real ``openai`` client pointed at it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("llguidance")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_helpers import randomize, small_config  # noqa: E402

from serve_helpers import Server, corpus  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    from k2.data.tokenizer import train_tokenizer
    from k2.model import K2ForCausalLM

    tokenizer = train_tokenizer(corpus(), 400)
    torch.manual_seed(0)
    config = small_config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=512, rope_scaling=None)
    model = randomize(K2ForCausalLM(config), 0, scale=0.15).eval()
    return model, tokenizer


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
