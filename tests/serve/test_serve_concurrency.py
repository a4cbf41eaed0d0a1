"""Concurrent requests share the scheduler's batches; a full queue answers 429; /metrics counts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from serve_helpers import Server, http

USER = [{"role": "user", "content": "Say hello"}]


def test_concurrent_requests_all_complete_and_match_their_seeds(client):
    def ask(seed: int):
        return client.chat.completions.create(model="tiny", messages=USER, max_tokens=8 + seed % 5, seed=seed)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    alone = [ask(seed) for seed in (0, 5)]
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in together)
    # per-request random streams: batching with others does not change what a seed samples
    assert together[0].choices[0].message.content == alone[0].choices[0].message.content
    assert together[5].choices[0].message.content == alone[1].choices[0].message.content


def test_a_full_queue_answers_429(tiny):
    from k2.rl.rollout import Request
    from k2.serve.app import ChatService, create_app
    from k2.serve.scheduler import Job

    model, tokenizer = tiny
    service = ChatService(model, tokenizer, model_name="tiny", max_queue=1, start=False)
    server = Server(create_app(service))
    try:
        service.scheduler.submit(Job([Request([1, 2], 2)]))  # the scheduler is not running: it stays queued
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
        assert info.value.status_code == 429 and "queue is full" in info.value.body["message"]
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, stream=True)
        status, body = http("GET", server.url + "/metrics")
        assert status == 200
        assert 'k2_serve_requests_total{status="429"} 2.0' in body.decode()
        assert "k2_serve_queue_length 1.0" in body.decode()
    finally:
        server.close()


def test_metrics_count_requests_and_tokens(client, server):
    def value(text: str, name: str) -> float:
        line = next(line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    before = http("GET", server.url + "/metrics")[1].decode()
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, n=2, seed=1)
    after = http("GET", server.url + "/metrics")[1].decode()
    assert value(after, "k2_serve_completion_tokens_total") - value(before, "k2_serve_completion_tokens_total") \
        == r.usage.completion_tokens
    assert value(after, "k2_serve_prompt_tokens_total") - value(before, "k2_serve_prompt_tokens_total") \
        == r.usage.prompt_tokens
    assert value(after, "k2_serve_request_seconds_count") == value(before, "k2_serve_request_seconds_count") + 1
    assert value(after, "k2_serve_weight_version") == 0
