"""OpenAI-endpoint roles of synthesis, run with the real openai client against a local fake
chat-completions server (docs/synthesis.md)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

pytest.importorskip("openai")

from k2.agentic.env import AgentEnv  # noqa: E402
from k2.agentic.synth.backends import OpenAIExpert, OpenAIRewriter, OpenAIRubricJudge, openai_user  # noqa: E402
from k2.agentic.synth.evolve import evolve_tools  # noqa: E402
from k2.agentic.synth.pipeline import Synthesizer, SynthOptions  # noqa: E402
from k2.agentic.synth.variant_domain import VariantDomain  # noqa: E402
from k2.agentic.tasks import example_tasks  # noqa: E402
from k2.errors import ConfigError, SynthError  # noqa: E402


def _tool_call(name: str, arguments: dict) -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


@pytest.fixture
def server():
    requests: list[dict] = []
    script: dict[str, list[dict]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            queue = script.get(body["model"]) or [{"role": "assistant", "content": "Thanks, bye ###STOP###"}]
            message = queue.pop(0) if len(queue) > 1 else queue[0]
            reply = {
                "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1", requests, script
    httpd.shutdown()


def test_expert_endpoint_plays_a_variant_domain(server) -> None:
    base_url, requests, script = server
    variant = next(v for v in evolve_tools("bank", 40, seed=0, tools=["transfer"]) if v.name != "transfer")
    task = next(t for t in example_tasks("bank") if t.id == "bank-move-savings")
    call = variant.from_base({"from_account": "acc-1002", "to_account": "acc-1001", "amount_cents": 150000})
    script["expert"] = [
        {"role": "assistant", "content": None, "tool_calls": [_tool_call(variant.name, call)]},
        {"role": "assistant", "content": "Done. Your savings now hold 10500.00."},
    ]
    domain = VariantDomain("bank", [variant])
    task = domain.translate_task(task)
    assert task.actions[0].name == variant.name and task.actions[0].arguments == call
    env = AgentEnv(domain, task, seed=0)
    played = OpenAIExpert("expert", base_url=base_url, api_key="x", seed=5).play(env)
    assert played.termination == "user_stop" and played.grade is not None and played.grade.reward == 1.0
    first = requests[0]
    assert first["model"] == "expert" and first["temperature"] == 0 and first["seed"] == 5
    assert first["tools"] == [variant.spec] and first["tool_choice"] == "auto"
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    second = requests[1]["messages"]
    assert second[-1]["role"] == "tool" and second[-1]["tool_call_id"] == f"functions.{variant.name}:0"
    assert second[-2]["tool_calls"][0]["function"]["name"] == variant.name


def test_judge_rewriter_and_user_endpoints(server) -> None:
    base_url, requests, script = server
    script["judge"] = [{"role": "assistant", "content": 'Verdict: {"keep": false, "reason": "rude"}'}]
    judge = OpenAIRubricJudge("judge", base_url=base_url, api_key="x")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert judge(messages, []) == ["judge_rejected"]
    sent = json.loads(requests[-1]["messages"][1]["content"])
    assert sent == {"tools": [], "messages": messages}
    script["rewrite"] = [{"role": "assistant", "content": "  Look up an account.  "}]
    assert OpenAIRewriter("rewrite", base_url=base_url, api_key="x")("Get an account.") == "Look up an account."
    assert requests[-1]["messages"][1] == {"role": "user", "content": "Get an account."}
    user = openai_user("user", base_url=base_url, api_key="x")(example_tasks("bank")[0], 3)
    assert "###STOP###" in user.start() and requests[-1]["seed"] == 3


def test_synthesizer_with_endpoint_roles(server) -> None:
    base_url, requests, script = server
    script["judge"] = [{"role": "assistant", "content": '{"keep": true}'}]
    script["rewrite"] = [{"role": "assistant", "content": "Reworded."}]
    synth = Synthesizer(
        SynthOptions(n=2, domains=("device",), per_tool=3, stochastic=False),
        describe=OpenAIRewriter("rewrite", base_url=base_url, api_key="x"),
        rubric_judge=OpenAIRubricJudge("judge", base_url=base_url, api_key="x"),
    )
    assert {v.spec["function"]["description"] for v in synth.pool.variants.values() if not v.id.endswith(".v0")} == {"Reworded."}
    ep = synth.episode("single", 0)
    assert ep.kept and requests[-1]["model"] == "judge"


def test_bad_endpoint_answers_and_options_are_clear_errors() -> None:
    with pytest.raises(SynthError, match="not the JSON asked for"):
        OpenAIRubricJudge.verdict("I think it is fine")
    with pytest.raises(ConfigError, match="--openai-model"):
        OpenAIRubricJudge("", client=object())
    with pytest.raises(ConfigError, match="--openai-model"):
        openai_user("", client=object())


def test_an_endpoint_expert_that_does_nothing_is_rejected(server) -> None:
    base_url, requests, script = server
    script["lazy"] = [{"role": "assistant", "content": "I am not sure I can help."}]
    synth = Synthesizer(SynthOptions(n=1, domains=("bank",), per_tool=3, stochastic=False),
                        expert=OpenAIExpert("lazy", base_url=base_url, api_key="x"))
    ep = synth.episode("multi", 0)
    assert not ep.kept and "not_solved" in ep.reasons
    assert requests[0]["model"] == "lazy" and requests[0]["tools"] == ep.record["tools"]
    assert ep.record["messages"][2] == {"role": "assistant", "content": "I am not sure I can help."}
