"""Live weights (``k2 serve --subscribe``): versions published while a stream decodes are applied
between its tokens; the response lists every version that produced its tokens (final stream
chunk, JSON body, ``x-k2-weight-versions`` header), no request is dropped, and the served model
ends up holding the publisher's weights exactly."""

from __future__ import annotations

import copy
import json
import os
import threading

import openai
import torch

from model_helpers import randomize
from serve_helpers import Server, http, run_to_budget, slow_copy

USER = [{"role": "user", "content": "Say hello"}]


def test_versions_published_mid_stream_are_applied_between_tokens(tiny):
    from k2.broadcast import WeightPublisher, WeightSubscriber
    from k2.serve.app import ChatService, create_app

    model, tokenizer = tiny
    served = slow_copy(model, 0.01)
    trainer = randomize(copy.deepcopy(model), 7, scale=0.15).eval()
    name = f"k2-serve-test-{os.getpid()}-{threading.get_ident() & 0xffff:x}"
    publisher = WeightPublisher(trainer, name=name, timeout=30.0)
    subscriber = WeightSubscriber(served, worker="serve", name=name, timeout=30.0)
    service = run_to_budget(ChatService(served, tokenizer, model_name="tiny", max_batch=4, subscriber=subscriber))
    server = Server(create_app(service))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        side: list = []
        other = threading.Thread(target=lambda: side.append(client.chat.completions.with_raw_response.create(
            model="tiny", messages=USER, max_tokens=30, seed=5)))
        stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=100, seed=3, stream=True,
                                                stream_options={"include_usage": True})
        chunks, published, steps = [], [], None
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 3:
                other.start()
                published.append(publisher.publish())  # returns once the server applied it
                steps = service.engine.last_stats.decode_steps
            elif steps is not None and service.engine.last_stats.decode_steps >= steps + 2 and len(published) == 1:
                # the stream sampled with version 1 (a whole step ran after it was applied)
                with torch.no_grad():
                    for p in trainer.parameters():
                        p.mul_(0.9)
                published.append(publisher.publish())
        other.join(60)
        assert published == [1, 2]
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finals) == 1 and finals[0].model_extra["weight_versions"] == [0, 1, 2]
        assert chunks[-1].usage.completion_tokens == 100 and chunks[-1].model_extra["weight_versions"] == [0, 1, 2]
        # the request that arrived meanwhile was answered whole, with its versions in body and header
        raw = side[0]
        body = raw.parse()
        assert body.usage.completion_tokens == 30
        versions = body.model_extra["weight_versions"]
        assert versions and set(versions) <= {0, 1, 2} and versions == sorted(versions)
        assert raw.headers["x-k2-weight-versions"] == ",".join(map(str, versions))
        # later requests sample from version 2 only, and the model holds the publisher's weights
        after = client.chat.completions.with_raw_response.create(model="tiny", messages=USER, max_tokens=4)
        assert after.parse().model_extra["weight_versions"] == [2] and after.headers["x-k2-weight-versions"] == "2"
        assert json.loads(http("GET", server.url + "/health")[1])["weight_version"] == 2
        assert "k2_serve_weight_version 2.0" in http("GET", server.url + "/metrics")[1].decode()
        theirs = trainer.state_dict()
        assert all(torch.equal(t, theirs[k]) for k, t in served.state_dict().items())
        assert service.follower.applied == [1, 2]
    finally:
        server.close()
        service.stop()
        subscriber.close()
        publisher.close()
