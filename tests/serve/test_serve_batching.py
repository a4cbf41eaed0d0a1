"""Continuous batching across requests: a request that arrives while others generate joins the
running batch at the next step (it does not wait for a whole generate call), and a request whose
client left before it started is never run."""

from __future__ import annotations

import http.client
import json
import threading
import time

from k2.rl.rollout import Request, RolloutEngine
from k2.serve.scheduler import Job, Scheduler

from serve_helpers import Server, slow_service

USER = [{"role": "user", "content": "Say hello"}]


def test_a_job_arriving_mid_generation_joins_the_running_call(tiny):
    model, _ = tiny
    scheduler = Scheduler(RolloutEngine(model, max_batch=4))
    long_tokens: list[int] = []
    occupancy: list[int] = []
    short = Job([Request([4, 9, 2], 5, seed=3), Request([4, 9], 4, seed=4)])  # two choices

    def on_long(choice: int, token: int) -> None:
        long_tokens.append(token)
        occupancy.append(scheduler.running_rows)
        if len(long_tokens) == 3:  # three tokens in, from inside the running call
            scheduler.submit(short)

    long = Job([Request([5, 6, 7], 80, seed=1)], on_token=on_long)  # no stop ids: 80 tokens
    scheduler.start()
    try:
        scheduler.submit(long)
        done = short.future.result(timeout=60)
        at_short_end = len(long_tokens)
        long.future.result(timeout=60)
    finally:
        scheduler.stop()
    assert [len(c.token_ids) for c in done] == [5, 4] and [c.index for c in done] == [0, 1]
    assert at_short_end < 20  # the short job ended a few steps after it arrived, long before the long one
    assert scheduler.calls == 1  # all in one generate call
    assert max(occupancy) == 3  # the long row and both short rows decoded together
    alone = RolloutEngine(model, max_batch=1).generate([Request([4, 9, 2], 5, seed=3)])[0]
    assert done[0].token_ids == alone.token_ids  # joining a running batch does not change the sample


def test_a_cancelled_job_that_has_not_started_never_runs(tiny):
    model, _ = tiny
    engine = RolloutEngine(model, max_batch=2)
    scheduler = Scheduler(engine)
    tokens: list[int] = []
    job = Job([Request([3, 4], 6, seed=1)] * 2, on_token=lambda c, t: tokens.append(t))
    scheduler.submit(job)
    job.cancel()  # the client left while it waited
    scheduler.start()
    try:
        done = job.future.result(timeout=30)
    finally:
        scheduler.stop()
    assert tokens == [] and [c.token_ids for c in done] == [[], []]
    assert engine.last_stats.tokens == 0


def test_a_plain_request_arriving_mid_stream_is_answered_before_the_stream_ends(tiny):
    import openai

    from k2.serve.app import create_app

    model, tokenizer = tiny
    service = slow_service(model, tokenizer, step_s=0.01, to_budget=True, max_batch=4)
    server = Server(create_app(service))
    try:
        fast = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = fast.chat.completions.create(model="tiny", messages=USER, max_tokens=60, seed=2, stream=True,
                                              stream_options={"include_usage": True})
        chunks = iter(stream)
        next(chunks)
        next(chunks)  # the stream is decoding
        answer = fast.chat.completions.create(model="tiny", messages=USER, max_tokens=3, seed=1)
        running = service.scheduler.running_rows
        rest = list(chunks)
        assert answer.usage.completion_tokens == 3
        assert running == 1  # answered while the stream's row still decoded
        assert rest[-1].usage.completion_tokens == 60
        assert service.scheduler.calls == 1
    finally:
        server.close()
        service.stop()


def test_a_plain_request_whose_client_leaves_while_queued_is_never_run(tiny):
    from k2.serve.app import ChatService, create_app

    model, tokenizer = tiny
    service = ChatService(model, tokenizer, model_name="tiny", max_batch=2, start=False)
    server = Server(create_app(service))
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = json.dumps({"model": "tiny", "messages": USER, "max_tokens": 20, "seed": 1})
        connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        deadline = time.monotonic() + 10
        while not service.scheduler.queued and time.monotonic() < deadline:
            time.sleep(0.01)
        job = service.scheduler.queue.queue[0]
        connection.sock.close()
        connection.close()
        while not job.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert job.cancelled  # the handler saw the disconnect while the job waited
        service.start()
        assert [c.token_ids for c in job.future.result(timeout=30)] == [[]]
        assert service.engine.last_stats.tokens == 0 and service.scheduler.calls == 1
    finally:
        server.close()
        service.stop()
