"""The judge filter: planted bad trajectories are rejected for the right reason (docs/synthesis.md)."""

from __future__ import annotations

import copy
import json

import pytest

from k2.agentic.synth.judge import REASONS, regrade, rubric
from k2.agentic.synth.pipeline import Synthesizer, SynthOptions
from k2.agentic.synth.variant_domain import VariantDomain
from k2.agentic.tasks import Task


@pytest.fixture(scope="module")
def synth() -> Synthesizer:
    return Synthesizer(SynthOptions(n=1, per_tool=10, stochastic=False, mistake_rate=0.0))


def _kept(synth: Synthesizer, kind: str, with_calls: bool = True):
    for i in range(50):
        ep = synth.episode(kind, i)
        if ep.kept and (ep.record["calls"] > 0) == with_calls:
            return ep
    raise AssertionError(f"no kept {kind} episode")


def _judge(synth: Synthesizer, ep, messages, termination="user_stop", chars=None):
    """Regrade planted messages from scratch, then apply the rubric (as the pipeline does)."""
    record = ep.record
    task = Task(ep.task)
    variants = [synth.pool.variants[v] for v in record["variants"]]
    proto = VariantDomain(record["domain"], variants, policy=None)
    grade = regrade(task, proto, messages, termination=termination)
    return rubric(messages, record["tools"], grade=grade, termination=termination, max_chars=3600, rendered_chars=chars)


def _calls(messages):
    return [(i, c) for i, m in enumerate(messages) if m["role"] == "assistant" for c in m.get("tool_calls") or []]


def test_a_good_trajectory_passes(synth: Synthesizer) -> None:
    ep = _kept(synth, "multi")
    assert _judge(synth, ep, ep.record["messages"]) == []


def test_undeclared_tool(synth: Synthesizer) -> None:
    ep = _kept(synth, "single")
    messages = copy.deepcopy(ep.record["messages"])
    _, call = _calls(messages)[0]
    call["function"]["name"] = "not_a_declared_tool"
    assert "undeclared_tool" in _judge(synth, ep, messages)


def test_unrecovered_invalid_arguments(synth: Synthesizer) -> None:
    ep = _kept(synth, "single")
    messages = copy.deepcopy(ep.record["messages"])
    _, call = _calls(messages)[-1]
    call["function"]["arguments"] = json.dumps({"surely_not_a_parameter": 1})
    reasons = _judge(synth, ep, messages)
    assert "invalid_arguments" in reasons


def test_a_recovered_mistake_is_kept() -> None:
    synth = Synthesizer(SynthOptions(n=1, per_tool=10, stochastic=False, mistake_rate=0.99))
    for i in range(40):
        ep = synth.episode("single", i)
        if ep.record and ep.record["mistakes"]:
            assert ep.kept, ep.reasons
            break
    else:
        raise AssertionError("no episode with a planted mistake")


def test_outcome_not_told(synth: Synthesizer) -> None:
    ep = _kept(synth, "multi")
    messages = copy.deepcopy(ep.record["messages"])
    last_tool = max(i for i, m in enumerate(messages) if m["role"] == "tool")
    cut = messages[: last_tool + 1]
    assert "outcome_not_told" in _judge(synth, ep, cut)


def test_wrong_values_are_not_solved(synth: Synthesizer) -> None:
    ep = _kept(synth, "single")
    messages = copy.deepcopy(ep.record["messages"])
    for m in messages:
        if m["role"] == "assistant" and not m.get("tool_calls"):
            m["content"] = "All done."
    assert "not_solved" in _judge(synth, ep, messages)


def test_wrong_write_is_not_solved(synth: Synthesizer) -> None:
    for i in range(80):  # a bank transfer: plant a different amount in the write
        ep = synth.episode("multi", i)
        if ep.kept and ep.record["template"] == "bank.transfer":
            break
    else:
        raise AssertionError("no transfer episode")
    messages = copy.deepcopy(ep.record["messages"])
    variants = {v.name: v for v in (synth.pool.variants[x] for x in ep.record["variants"])}
    idx, call = [(i, c) for i, c in _calls(messages) if variants[c["function"]["name"]].base == "transfer"][0]
    v = variants[call["function"]["name"]]
    base = v.to_base(json.loads(call["function"]["arguments"]))
    base["amount_cents"] -= 100
    call["function"]["arguments"] = json.dumps(v.from_base(base))
    assert _judge(synth, ep, messages) == ["not_solved"]


def test_ended_by_limit_and_too_long(synth: Synthesizer) -> None:
    ep = _kept(synth, "single")
    assert "ended_by_limit" in _judge(synth, ep, ep.record["messages"], termination="max_turns")
    assert "too_long" in _judge(synth, ep, ep.record["messages"], chars=5000)


def test_reasons_are_listed_in_a_fixed_order(synth: Synthesizer) -> None:
    ep = _kept(synth, "single")
    messages = copy.deepcopy(ep.record["messages"])
    _, call = _calls(messages)[0]
    call["function"]["name"] = "nope"
    reasons = _judge(synth, ep, messages[:-2], termination="max_steps", chars=9999)
    assert reasons == [r for r in REASONS if r in reasons] and len(reasons) >= 4
