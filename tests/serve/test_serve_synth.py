"""A synthesis role that speaks the OpenAI API (k2.agentic.synth.backends.OpenAIExpert) driven
through a local ``k2 serve``: its requests (messages, declared tools, tool_choice, temperature 0,
seed) are accepted, the served model's tool calls reach the agent environment schema-valid, and
the tool results go back to the server in the next request."""

from __future__ import annotations

import json

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema")

from model_helpers import randomize, small_config  # noqa: E402
from serve_helpers import Server, http  # noqa: E402


def _metric(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("k2_serve_requests_total")}


def test_openai_expert_plays_an_episode_through_k2_serve(tiny):
    from k2.agentic.env import AgentEnv
    from k2.agentic.synth.backends import OpenAIExpert
    from k2.agentic.synth.evolve import evolve_tools
    from k2.agentic.synth.variant_domain import VariantDomain
    from k2.agentic.tasks import example_tasks
    from k2.model import K2ForCausalLM
    from k2.serve.app import ChatService, create_app

    _, tokenizer = tiny
    torch.manual_seed(0)
    config = small_config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=2048, rope_scaling=None)
    model = randomize(K2ForCausalLM(config), 1, scale=0.15).eval()  # the prompt is ~800 tokens
    service = ChatService(model, tokenizer, model_name="expert", max_batch=2)
    server = Server(create_app(service))
    # evolved tools: a renamed get_settings (no arguments) and a connect_wifi variant (the task's)
    variant = next(v for v in evolve_tools("device", 10, seed=0, tools=["get_settings"]) if v.name == "show_config")
    wifi = next(v for v in evolve_tools("device", 10, seed=0, tools=["connect_wifi"]) if v.name != "connect_wifi")
    domain = VariantDomain("device", [variant, wifi])
    task = domain.translate_task(next(t for t in example_tasks("device") if t.id == "device-join-cafe"))
    sent: list[dict] = []

    class Expert(OpenAIExpert):
        """The role as shipped, with a token budget (a random model rarely stops on its own) and
        the first turn's tool named (so the episode surely round-trips a call that a random model
        can finish: one without arguments)."""

        def request_for(self, env):
            request = {**super().request_for(env), "max_tokens": 24}
            if not sent:
                request.update(tool_choice={"type": "function", "function": {"name": variant.name}}, max_tokens=40)
            sent.append(request)
            return request

    try:
        env = AgentEnv(domain, task, seed=0, max_turns=3)
        played = Expert("expert", base_url=server.url + "/v1", api_key="none", seed=5, max_turns=3).play(env)
        statuses = _metric(http("GET", server.url + "/metrics")[1].decode())
    finally:
        server.close()
        service.stop()
    assert statuses == {'k2_serve_requests_total{status="200"}': float(len(sent))}  # every turn answered
    assert len(sent) >= 2 and all(r["temperature"] == 0 and r["seed"] == 5 for r in sent)
    first = played.messages[2]
    assert first["role"] == "assistant" and first["tool_calls"] and not first["content"]  # parsed by k2 serve
    schema = variant.spec["function"]["parameters"]
    for call in first["tool_calls"]:  # constrained decoding: declared tool, schema-valid arguments
        assert call["function"]["name"] == variant.name
        arguments = call["function"]["arguments"]
        jsonschema.validate(json.loads(arguments) if isinstance(arguments, str) else arguments, schema)
    result = played.messages[3]
    assert result["role"] == "tool" and result["tool_call_id"] == f"functions.{variant.name}:0"
    # the tool result went back to k2 serve in the next turn's request (and was accepted above)
    assert sent[1]["messages"][3]["role"] == "tool" and sent[1]["messages"][3]["content"] == result["content"]
    assert played.termination is not None or played.bail


def test_rewriter_and_judge_roles_through_k2_serve(server):
    """The other synthesis roles that speak the OpenAI API, against k2 serve: the rewriter's answer
    comes back as text, and the judge's answer — model output, so untrusted — is parsed or refused
    with a SynthError that quotes it (a random model does not write the JSON asked for)."""
    from k2.agentic.synth.backends import OpenAIRewriter, OpenAIRubricJudge
    from k2.errors import SynthError

    before = _metric(http("GET", server.url + "/metrics")[1].decode())
    rewriter = OpenAIRewriter("tiny", base_url=server.url + "/v1", api_key="none", seed=3)
    text = "Look up an order by its id."
    reworded = rewriter(text)
    assert isinstance(reworded, str) and reworded  # the model's words, or the original if it wrote none
    judge = OpenAIRubricJudge("tiny", base_url=server.url + "/v1", api_key="none", seed=3)
    transcript = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]
    try:
        verdict = judge(transcript, [])
    except SynthError as err:
        assert "not the JSON asked for" in str(err)
    else:
        assert verdict in ([], ["judge_rejected"])
    after = _metric(http("GET", server.url + "/metrics")[1].decode())
    key = 'k2_serve_requests_total{status="200"}'
    assert after[key] - before.get(key, 0.0) == 2  # both requests answered
