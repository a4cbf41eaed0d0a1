"""Schema-constrained tool calls in the rollout engine (Request.constraint) and the engine-backed
agent policy: the engine's constrained greedy rows equal generate()'s, sampled constrained calls
are valid, forced tokens have log-probability 0, and a bad constraint is named."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from k2.agentic.calls import parse_assistant  # noqa: E402
from k2.agentic.constrain import ToolCallConstrainer  # noqa: E402
from k2.errors import RLError  # noqa: E402
from k2.model import K2ForCausalLM  # noqa: E402
from k2.rl import Request, RolloutEngine  # noqa: E402
from k2.rl.agent_policy import EnginePolicy  # noqa: E402
from k2.rl.logprobs import sequence_logprobs  # noqa: E402

from model_helpers import small_config  # noqa: E402

OPEN = "<|im_assistant|>assistant<|im_middle|>"
SECTION = "<|tool_calls_section_begin|>"


def tools_for(seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for j in range(2):
        props = {"name": {"type": "string", "maxLength": 4}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                 "on": {"type": "boolean"}, "color": {"enum": ["red", "blue"]}}
        keep = dict(rng.sample(sorted(props.items()), rng.randint(1, 4)))
        required = [k for k in keep if rng.random() < 0.5]
        out.append({"type": "function", "function": {"name": f"t{seed}_{j}", "parameters": {
            "type": "object", "properties": keep, "required": required, "additionalProperties": False}}})
    return out


@pytest.fixture(scope="module")
def setup():
    from k2.data.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tokenizer = train_tokenizer([(stdlib / n).read_text() for n in ("textwrap.py", "shlex.py")], 400)
    torch.manual_seed(0)
    model = K2ForCausalLM(small_config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=512,
                                       rope_scaling=None)).eval()
    return model, tokenizer, ToolCallConstrainer(tokenizer)


def requests(tokenizer, constrainer, temperature: float, count: int = 4, budget: int = 48):
    out = []
    for i in range(count):
        tools = tools_for(i)
        ids = tokenizer.encode(OPEN + "x" * i + SECTION).ids
        out.append((Request(ids, budget, temperature, stop_ids=[tokenizer.token_to_id("<|im_end|>")], seed=i,
                            constraint=constrainer.row(tools, ids)), tools))
    return out


def test_constrained_greedy_rows_equal_generate(setup):
    model, tokenizer, constrainer = setup
    reqs = requests(tokenizer, constrainer, 0.0)
    completions = RolloutEngine(model, max_batch=2).generate([r for r, _ in reqs])
    for (request, tools), completion in zip(reqs, completions):
        alone = model.generate([list(request.prompt_ids)], max_new_tokens=request.max_new_tokens,
                               stop_tokens=list(request.stop_ids), constraints=[constrainer.row(tools, request.prompt_ids)])
        assert completion.token_ids == alone[0]
        # the first token is forced (only <|tool_call_begin|> may open a section), yet its reported
        # log-probability is the model's own, as a full forward gives it, not the mask's 0
        assert completion.token_ids[0] == tokenizer.token_to_id("<|tool_call_begin|>")
        full = sequence_logprobs(model, request.prompt_ids, completion.token_ids, 1.0)
        assert completion.logprobs == pytest.approx(full.tolist(), abs=1e-5)
        assert completion.logprobs[0] < -1e-3


def test_constrained_samples_report_the_policys_logprobs(setup):
    """Sampled under the mask at T = 0.7, each token's reported log-probability equals an unmasked
    full forward's at that temperature (the trainer's π_θ), so the RL log-ratio is 0 at θ_old."""
    model, tokenizer, constrainer = setup
    reqs = requests(tokenizer, constrainer, 0.7, count=4, budget=40)
    completions = RolloutEngine(model, max_batch=2).generate([r for r, _ in reqs], seed=3)
    for (request, _), completion in zip(reqs, completions):
        full = sequence_logprobs(model, request.prompt_ids, completion.token_ids, 0.7)
        assert completion.logprobs == pytest.approx(full.tolist(), abs=1e-5)


def test_constrained_sampled_calls_are_valid(setup):
    model, tokenizer, constrainer = setup
    reqs = requests(tokenizer, constrainer, 1.0, count=6, budget=64)
    completions = RolloutEngine(model, max_batch=3).generate([r for r, _ in reqs], seed=5)
    finished = 0
    for (_, tools), completion in zip(reqs, completions):
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        turn = parse_assistant(SECTION + tokenizer.decode(completion.token_ids, skip_special_tokens=False))
        for call in turn.calls:
            if call.error and "cut off" in call.error and completion.finish_reason == "length":
                continue
            assert call.error is None and call.name in schemas, call
            jsonschema.validate(call.arguments, schemas[call.name])
            finished += 1
    assert finished >= 3


def test_a_bad_constraint_is_named(setup):
    model, tokenizer, _ = setup
    with pytest.raises(RLError, match="request 1: constraint must have allowed_mask"):
        RolloutEngine(model).generate([Request([5], 2), Request([5], 2, constraint="no")])


def test_engine_policy_constrains_by_default(setup):
    model, tokenizer, _ = setup
    engine = RolloutEngine(model, max_batch=2)
    policy = EnginePolicy(engine, tokenizer, max_new_tokens=8, temperature=1.0, seed=3)
    messages = [{"role": "user", "content": "hi"}]
    tools = tools_for(0)
    first = policy.request(messages, tools)
    assert first.constraint is not None and first.max_new_tokens == 8
    assert policy.request(messages, None).constraint is None
    text = policy(messages, tools)
    assert isinstance(text, str) and len(policy.completions) == 1
    assert policy.completions[0].token_ids and policy.request(messages, tools).seed != first.seed
    assert EnginePolicy(engine, tokenizer, constrained=False).request(messages, tools).constraint is None
    long = [{"role": "user", "content": "word " * 600}]
    with pytest.raises(RLError, match="no room left"):
        policy.request(long, tools)


def test_pausing_and_resuming_a_constrained_request_with_its_constraint(setup):
    model, tokenizer, constrainer = setup
    fresh = requests(tokenizer, constrainer, 1.0, count=2, budget=40)
    whole = RolloutEngine(model, max_batch=2).generate([r for r, _ in fresh], seed=1)
    paused_reqs = requests(tokenizer, constrainer, 1.0, count=2, budget=40)
    engine = RolloutEngine(model, max_batch=2)
    paused = engine.generate([r for r, _ in paused_reqs], seed=1, max_steps=7)
    assert all(c.finish_reason is None for c in paused)
    resumed = engine.generate([Request(r.prompt_ids, r.max_new_tokens, r.temperature, stop_ids=r.stop_ids, seed=r.seed,
                                       prefix=c, constraint=r.constraint) for (r, _), c in zip(paused_reqs, paused)])
    assert [c.token_ids for c in resumed] == [c.token_ids for c in whole]
