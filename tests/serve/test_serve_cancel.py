"""A client that goes away frees its rows: its choices end at the next token instead of running to
their budget (streamed and plain requests)."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from serve_helpers import Server, slow_service

USER = [{"role": "user", "content": "Say hello"}]
STEP_S = 0.02
LENGTH = 100


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
def test_a_closed_connection_ends_its_generation(tiny, stream):
    from k2.serve.app import create_app

    model, tokenizer = tiny
    # requests run to their budget (no <|im_end|>), so an uncancelled one takes LENGTH steps
    service = slow_service(model, tokenizer, step_s=STEP_S, to_budget=True, max_batch=2)
    server = Server(create_app(service))
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = json.dumps({"model": "tiny", "messages": USER, "max_tokens": LENGTH, "seed": 1, "stream": stream})
        connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        if stream:
            response = connection.getresponse()
            assert response.status == 200
            response.fp.readline()  # the first event: the request is queued
        # admission into the engine is the scheduler thread's, a moment after the first event
        deadline = time.perf_counter() + 10
        while not service.scheduler.running_rows and time.perf_counter() < deadline:
            time.sleep(0.005)
        started = time.perf_counter()
        assert service.scheduler.running_rows == 1
        connection.sock.close()
        connection.close()
        while service.scheduler.running_rows and time.perf_counter() - started < LENGTH * STEP_S:
            time.sleep(0.01)
        ended = time.perf_counter() - started
        assert service.scheduler.running_rows == 0
        assert ended < 0.5 * LENGTH * STEP_S, f"generation went on for {ended:.2f} s after the client left"
    finally:
        server.close()
        service.stop()
