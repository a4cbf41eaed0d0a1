"""A client that goes away frees its rows: its choices end at the next token instead of running to
their budget (streamed and plain requests)."""

from __future__ import annotations

import copy
import http.client
import json
import time

import pytest

from serve_helpers import Server

USER = [{"role": "user", "content": "Say hello"}]
STEP_S = 0.02


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
def test_a_closed_connection_ends_its_generation(client, tiny, stream):
    from k2.serve.app import ChatService, create_app

    # a seed whose completion runs long (same weights, fast server)
    seed, length = max(((s, client.chat.completions.create(model="tiny", messages=USER, max_tokens=150, seed=s)
                         .usage.completion_tokens) for s in range(6)), key=lambda p: p[1])
    assert length >= 60, "no long completion among the seeds"
    model, tokenizer = tiny
    slow = copy.deepcopy(model)
    forward = slow.forward

    def slow_forward(*args, **kwargs):
        time.sleep(STEP_S)
        return forward(*args, **kwargs)

    slow.forward = slow_forward
    service = ChatService(slow, tokenizer, model_name="tiny", max_batch=2)
    server = Server(create_app(service))
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = json.dumps({"model": "tiny", "messages": USER, "max_tokens": 150, "seed": seed, "stream": stream})
        connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        if stream:
            response = connection.getresponse()
            assert response.status == 200
            response.fp.readline()  # the first event: generation is under way
        else:
            deadline = time.perf_counter() + 10
            while not service.scheduler.running_rows and time.perf_counter() < deadline:
                time.sleep(0.005)
        started = time.perf_counter()
        assert service.scheduler.running_rows == 1
        connection.sock.close()
        connection.close()
        while service.scheduler.running_rows and time.perf_counter() - started < length * STEP_S:
            time.sleep(0.01)
        ended = time.perf_counter() - started
        assert service.scheduler.running_rows == 0
        assert ended < 0.5 * length * STEP_S, f"generation went on for {ended:.2f} s after the client left"
    finally:
        server.close()
        service.stop()
