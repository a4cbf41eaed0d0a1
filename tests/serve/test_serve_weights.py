"""Live weights: a version published while a stream decodes is applied between its tokens; the
response lists both versions, no request is dropped, and later requests sample from the new
weights exactly (the same tokens as an engine on the publisher's model)."""

from __future__ import annotations

import copy
import json
import os
import threading
import time

import openai
import torch

from conftest import Server, http
from model_helpers import randomize

USER = [{"role": "user", "content": "Say hello"}]


def test_version_published_mid_stream_is_applied_between_tokens(tiny):
    from k2.broadcast import WeightPublisher, WeightSubscriber
    from k2.rl.rollout import Request, RolloutEngine
    from k2.serve.app import ChatService, create_app

    model, tokenizer = tiny
    served = copy.deepcopy(model)
    trainer = randomize(copy.deepcopy(model), seed=7, scale=0.15).eval()
    name = f"k2-serve-test-{os.getpid()}"
    publisher = WeightPublisher(trainer, name=name, timeout=30.0)
    subscriber = WeightSubscriber(served, worker="serve", name=name, timeout=30.0)
    forward = served.forward

    def slow_forward(*args, **kwargs):  # a few ms a step, so that the publish lands mid-stream
        time.sleep(0.004)
        return forward(*args, **kwargs)

    served.forward = slow_forward
    service = ChatService(served, tokenizer, model_name="tiny", max_batch=4, subscriber=subscriber)
    server = Server(create_app(service))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        args = dict(model="tiny", messages=USER, max_tokens=120, temperature=1.0, seed=3)
        other: list = []
        side = threading.Thread(target=lambda: other.append(client.chat.completions.create(**args)))
        published: list[int] = []
        stream = client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
        chunks, last = 0, None
        for chunk in stream:
            chunks += 1
            if chunks == 3:
                side.start()
                threading.Thread(target=lambda: published.append(publisher.publish())).start()
            last = chunk
        side.join(60)
        assert published == [1]
        assert last.model_extra["weight_versions"] == [0, 1]
        assert other and other[0].choices[0].finish_reason in ("stop", "length")  # not dropped
        assert json.loads(http("GET", server.url + "/health")[1])["weight_version"] == 1
        after = client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0)
        assert after.model_extra["weight_versions"] == [1]
        # the served model now holds the publisher's weights: same greedy tokens as an engine on it
        from k2.serve.schemas import parse_chat_request

        req = parse_chat_request({"model": "tiny", "messages": USER}, "tiny")
        prompt = service.prompt_ids(req)
        im_end = tokenizer.token_to_id("<|im_end|>")
        with torch.inference_mode():
            ref = RolloutEngine(trainer, max_batch=1, pad_token_id=im_end).generate(
                [Request(prompt, 12, temperature=0, stop_ids=(im_end,), constraint=service.constrainer.row(None, prompt))])[0]
        text = tokenizer.decode(ref.token_ids, skip_special_tokens=False).split("<|im_end|>")[0]
        assert after.choices[0].message.content == text
    finally:
        server.close()
        subscriber.close()
        publisher.close()
