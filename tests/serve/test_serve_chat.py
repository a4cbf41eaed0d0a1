"""k2 serve's chat completions through the real openai client: plain text, tool calls valid
against their schemas, n > 1, seed reproducibility, stop strings and OpenAI-format 4xx errors."""

from __future__ import annotations

import json

import openai
import pytest

jsonschema = pytest.importorskip("jsonschema")

from serve_helpers import TOOLS, http  # noqa: E402

USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, body = http("GET", server.url + "/health")
    health = json.loads(body)
    assert health["status"] == "ok" and health["weight_version"] == 0


def test_plain_completion(client, tiny):
    _, tokenizer = tiny
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.role == "assistant" and choice.message.tool_calls is None
    assert isinstance(choice.message.content, str)
    # usage counts the tokens of the chat-template prompt and of the completion
    from k2.data.chat import render_chat

    prompt = tokenizer.encode(render_chat(USER, add_generation_prompt=True), add_special_tokens=False).ids
    assert r.usage.prompt_tokens == len(prompt)
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model_extra["weight_versions"] == [0]  # the engine's version when each token was sampled
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_greedy_is_deterministic_and_matches_the_engine(client, service, tiny):
    from k2.rl.rollout import Request, RolloutEngine
    from k2.serve.schemas import parse_chat_request

    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=0)
    model, tokenizer = tiny
    req = parse_chat_request({"model": "tiny", "messages": USER, "max_tokens": 10, "temperature": 0}, "tiny")
    prompt = service.prompt_ids(req)
    im_end = tokenizer.token_to_id("<|im_end|>")
    constraint = service.constrainer.row(None, prompt)
    alone = RolloutEngine(model, max_batch=1, pad_token_id=im_end).generate(
        [Request(prompt, 10, temperature=0, stop_ids=(im_end,), constraint=constraint)])[0]
    text = tokenizer.decode(alone.token_ids, skip_special_tokens=False).split("<|im_end|>")[0]
    assert r.choices[0].message.content == text


def test_tool_calls_are_valid_against_their_schemas(client):
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required",
                                       max_tokens=80, n=3, seed=5, temperature=1.0)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    finished = 0
    for choice in r.choices:
        if choice.finish_reason == "length":
            continue  # an untrained model may run out of budget inside a call
        finished += 1
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.function.name in schemas
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert finished >= 1


def test_named_tool_choice_calls_that_tool(client):
    r = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, max_tokens=80, seed=1, n=2,
        tool_choice={"type": "function", "function": {"name": "add"}})
    for choice in r.choices:
        if choice.finish_reason != "length":
            assert {c.function.name for c in choice.message.tool_calls} == {"add"}


def test_tool_choice_none_never_calls(client):
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="none",
                                       max_tokens=30, n=3, seed=2)
    for choice in r.choices:
        assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
        assert "<|tool_call" not in choice.message.content


def test_tool_result_round_trip(client):
    first = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required",
                                           max_tokens=80, seed=3)
    message = first.choices[0].message
    if not message.tool_calls:
        pytest.skip("the random model ran out of budget inside its call")
    call = message.tool_calls[0]
    follow = USER + [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 12}'}]
    r = client.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, max_tokens=10)
    assert r.usage.prompt_tokens > first.usage.prompt_tokens
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_n_and_seed_reproducibility(client):
    a = client.chat.completions.create(model="tiny", messages=USER, max_tokens=16, n=3, seed=11)
    b = client.chat.completions.create(model="tiny", messages=USER, max_tokens=16, n=3, seed=11)
    c = client.chat.completions.create(model="tiny", messages=USER, max_tokens=16, n=3, seed=12)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    texts = [ch.message.content for ch in a.choices]
    assert texts == [ch.message.content for ch in b.choices]
    assert len(set(texts)) > 1  # each choice samples its own stream
    assert texts != [ch.message.content for ch in c.choices]


def test_stop_string_cuts_the_text(client):
    base = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, seed=4)
    text = base.choices[0].message.content
    if len(text) < 6:
        pytest.skip("too short a completion to cut")
    stop = text[3:5]
    first = text.find(stop)
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, seed=4, stop=[stop])
    assert r.choices[0].message.content == text[:first]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= base.usage.completion_tokens


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=3.0), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    (dict(messages=[]), "messages"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(max_tokens=100000), "max_tokens"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"x": {"type": "string", "pattern": "(["}}}}}], tool_choice="required"), "tools"),
])
def test_bad_requests_get_400_naming_the_field(client, kwargs, param):
    args = dict(model="tiny", messages=USER, max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**args)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param
    assert param.split("[")[0].split(".")[0] in info.value.body["message"]


def test_unknown_model_and_malformed_json(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=USER)
    status, body = http("POST", server.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in json.loads(body)["error"]["message"]
