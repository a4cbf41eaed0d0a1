"""The expert policy: asks, reads before writing, retries transient failures, recovers from its
planted mistakes (docs/synthesis.md)."""

from __future__ import annotations

import json
import random

import jsonschema

from k2.agentic.synth.evolve import evolve_tools
from k2.agentic.synth.expert import mistaken_arguments
from k2.agentic.synth.pipeline import Synthesizer, SynthOptions


def _episodes(synth: Synthesizer, kind: str, count: int):
    return [e for e in (synth.episode(kind, i) for i in range(count)) if e.record]


def test_planted_mistakes_are_invalid_then_fixed_in_the_next_turn() -> None:
    synth = Synthesizer(SynthOptions(n=1, per_tool=20, stochastic=False, mistake_rate=0.99))
    fixed = 0
    for ep in _episodes(synth, "multi", 30):
        messages = ep.record["messages"]
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in ep.record["tools"]}
        turns = [m for m in messages if m["role"] == "assistant"]
        for i, m in enumerate(turns):
            for call in m.get("tool_calls") or []:
                args = json.loads(call["function"]["arguments"])
                if not jsonschema.Draft202012Validator(schemas[call["function"]["name"]]).is_valid(args):
                    result = next(x for x in messages if x.get("tool_call_id") == call["id"])
                    assert json.loads(result["content"])["error"]["code"] == "invalid_arguments"
                    nxt = turns[i + 1]["tool_calls"][0]
                    assert nxt["function"]["name"] == call["function"]["name"]
                    assert jsonschema.Draft202012Validator(schemas[nxt["function"]["name"]]).is_valid(json.loads(nxt["function"]["arguments"]))
                    fixed += 1
    assert fixed >= 10


def test_mistaken_arguments_are_realistic_and_rejected() -> None:
    rng = random.Random(0)
    kinds = set()
    for v in evolve_tools("bank", 30, seed=1, tools=["transfer"])[1:]:
        base = {"from_account": "acc-1002", "to_account": "acc-1001", "amount_cents": 1500}
        wrong = mistaken_arguments(rng, v, base)
        assert wrong is not None and not jsonschema.Draft202012Validator(v.parameters).is_valid(wrong)
        right = v.from_base(base)
        if wrong == base:
            kinds.add("base names")
        elif set(wrong) == set(right):
            kinds.add("base format")
        elif set(wrong) < set(right):
            kinds.add("missing required")
    assert kinds == {"base names", "base format", "missing required"}


def test_transient_failures_are_retried_and_the_task_still_solved() -> None:
    synth = Synthesizer(SynthOptions(n=1, per_tool=10, failure_rate=0.5, mistake_rate=0.0, max_retries=6))
    retried = [e for e in _episodes(synth, "single", 40) if e.record["retries"]]
    assert retried
    for ep in retried:
        contents = [json.loads(m["content"]) for m in ep.record["messages"] if m["role"] == "tool"]
        codes = [c["error"]["code"] for c in contents if isinstance(c, dict) and "error" in c]
        assert set(codes) <= {"timeout", "unavailable"} and codes
        if ep.kept:
            assert ep.record["grade"]["reward"] == 1.0
    assert sum(e.kept for e in retried) >= len(retried) // 2


def test_reads_come_before_writes_in_multi_call_plans() -> None:
    synth = Synthesizer(SynthOptions(n=1, per_tool=10, stochastic=False, mistake_rate=0.0))
    checked = 0
    for ep in _episodes(synth, "multi", 40):
        variants = {synth.pool.variants[v].name: synth.pool.variants[v] for v in ep.record["variants"]}
        from k2.agentic.synth.variant_domain import VariantDomain

        domain = VariantDomain(ep.record["domain"], list(variants.values()))
        kinds = [domain.tool_kind(c["function"]["name"]) for m in ep.record["messages"] if m["role"] == "assistant"
                 for c in m.get("tool_calls") or []]
        if "write" in kinds and ep.record["template"] not in ("notes.new_note",):
            assert kinds[0] == "read", (ep.record["template"], kinds)
            checked += 1
    assert checked >= 5
