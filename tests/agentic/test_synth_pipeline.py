"""The synthesis pipeline end to end, small n (docs/synthesis.md)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jsonschema
import pytest

from k2.agentic.calls import calls_from_message
from k2.agentic.synth.evolve import ToolVariant
from k2.agentic.synth.judge import regrade
from k2.agentic.synth.output import episode_domain, load_variants, synthesize
from k2.agentic.synth.pipeline import SynthOptions, kind_quotas
from k2.agentic.synth.variant_domain import VariantDomain
from k2.agentic.tasks import load_tasks

N = 80


def _run(path: Path, **options) -> dict:
    return synthesize(SynthOptions(**{"n": N, "seed": 0, "validation": 0.25, "mistake_rate": 0.3, "failure_rate": 0.15, **options}), path)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "run"
    _run(out)
    return out


def _records(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def _variants(out: Path) -> dict[str, dict]:
    return {v["id"]: v for v in map(json.loads, (out / "variants.jsonl").read_text().splitlines())}


def test_same_seed_same_bytes_other_seed_other_bytes(run: Path, tmp_path: Path) -> None:
    _run(tmp_path / "again")
    for name in ("train.jsonl", "validation.jsonl", "train.tasks.json", "validation.tasks.json", "variants.jsonl", "card.json", "card.md"):
        assert (tmp_path / "again" / name).read_bytes() == (run / name).read_bytes(), name
    _run(tmp_path / "other", seed=1)
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (run / "train.jsonl").read_bytes()


@pytest.mark.slow
def test_worker_processes_give_the_same_bytes(run: Path, tmp_path: Path) -> None:
    synthesize(SynthOptions(n=N, seed=0, validation=0.25, mistake_rate=0.3, failure_rate=0.15), tmp_path / "w", workers=2)
    for name in ("train.jsonl", "validation.jsonl", "card.json"):
        assert (tmp_path / "w" / name).read_bytes() == (run / name).read_bytes(), name


def test_every_kept_trajectory_regrades_to_its_recorded_reward(run: Path) -> None:
    variants = load_variants(run / "variants.jsonl")
    seen = 0
    for split in ("train", "validation"):
        tasks = {t.id: t for t in load_tasks(run / f"{split}.tasks.json")}
        for record in _records(run, split):
            task = tasks[record["task_id"]]
            proto = episode_domain(record, variants)
            assert proto.tool_specs() == record["tools"]
            assert record["messages"][0]["content"] == f"{task.raw['k2_synth']['system_prompt']}\n\n{proto.policy}"
            grade = regrade(task, proto, record["messages"], termination=record["termination"])
            assert grade.reward == record["grade"]["reward"] == 1.0, record["task_id"]
            seen += 1
    assert seen == N


def test_records_are_openai_chat_with_declared_schema_valid_calls(run: Path) -> None:
    mistakes = retries = 0
    for record in _records(run, "train") + _records(run, "validation"):
        assert set(record) >= {"messages", "tools", "domain", "task_id", "seed", "grade"}
        assert 1 <= len(record["tools"]) <= 4
        assert record["messages"][0]["role"] == "system" and record["messages"][1]["role"] == "user"
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in record["tools"]}
        answered = {m["tool_call_id"] for m in record["messages"] if m["role"] == "tool"}
        invalid = 0
        for m in record["messages"]:
            for call in m.get("tool_calls") or []:
                assert call["type"] == "function" and call["id"] in answered
                args = json.loads(call["function"]["arguments"])
                if not jsonschema.Draft202012Validator(schemas[call["function"]["name"]]).is_valid(args):
                    invalid += 1
        assert invalid == record["mistakes"]  # the only invalid calls are the planted, recovered ones
        assert record["messages"][-2]["role"] == "assistant" and not record["messages"][-2].get("tool_calls")
        mistakes += record["mistakes"]
        retries += record["retries"]
    assert mistakes > 0 and retries > 0  # the data teach recovery and retries


def test_held_out_variants_and_templates_never_in_train(run: Path) -> None:
    variants = _variants(run)
    held = {vid for vid, v in variants.items() if v["held_out"]}
    held_specs = {json.dumps(variants[vid]["spec"], sort_keys=True) for vid in held}
    card = json.loads((run / "card.json").read_text())
    held_templates = set(card["templates"]["held_out"])
    assert held and held_templates
    for record in _records(run, "train"):
        assert not held & set(record["variants"])
        assert not held_specs & {json.dumps(t, sort_keys=True) for t in record["tools"]}
        assert record["template"] not in held_templates
    validation = _records(run, "validation")
    assert validation and all(held & set(r["variants"]) or r["template"] in held_templates for r in validation)
    assert card["variants"]["held_out_used_in_train"] == 0


def test_the_card_counts_match_the_files_and_the_stated_mix(run: Path) -> None:
    card = json.loads((run / "card.json").read_text())
    records = _records(run, "train") + _records(run, "validation")
    assert card["kept"] == len(records) == N
    assert card["by_kind"] == dict(sorted(Counter(r["kind"] for r in records).items()))
    quotas = kind_quotas(N, SynthOptions().mix)
    names = {"single": "single-call", "multi": "multi-call", "parallel": "parallel-call", "info": "information-seeking",
             "error": "error-recovery", "impossible": "impossible"}
    assert card["by_kind"] == {names[k]: q for k, q in sorted(quotas.items(), key=lambda kv: names[kv[0]])}
    assert card["by_domain"] == dict(sorted(Counter(r["domain"] for r in records).items()))
    assert card["calls_per_trajectory"] == {str(k): v for k, v in sorted(Counter(r["calls"] for r in records).items())}
    assert card["attempted"] == card["kept"] + card["rejected"]
    assert "| information-seeking |" in (run / "card.md").read_text()


def test_information_seeking_episodes_ask_before_any_call(run: Path) -> None:
    infos = [r for r in _records(run, "train") + _records(run, "validation") if r["kind"] == "information-seeking"]
    assert infos
    for r in infos:
        first = r["messages"][2]
        assert first["role"] == "assistant" and "?" in first["content"] and not first.get("tool_calls")
        assert r["messages"][3]["role"] == "user"


def test_kind_quotas() -> None:
    assert kind_quotas(10, {"single": 0.5, "multi": 0.5}) == {"single": 5, "multi": 5}
    assert kind_quotas(7, {"single": 1, "multi": 1, "error": 1}) == {"single": 3, "multi": 2, "error": 2}
    assert sum(kind_quotas(20000, SynthOptions().mix).values()) == 20000


def test_impossible_tasks_make_no_successful_write(run: Path) -> None:
    variants = _variants(run)
    seen = 0
    for r in _records(run, "train") + _records(run, "validation"):
        if r["kind"] != "impossible":
            continue
        seen += 1
        domain = VariantDomain(r["domain"], [ToolVariant.from_json(variants[v]) for v in r["variants"]])
        results = {m["tool_call_id"]: m["content"] for m in r["messages"] if m["role"] == "tool"}
        for m in r["messages"]:
            for call in calls_from_message(m) if m["role"] == "assistant" else []:
                if '"error"' not in results[call.id][:10]:
                    assert domain.tool_kind(call.name) == "read", (r["task_id"], call.name)
    assert seen


@pytest.mark.slow
def test_same_bytes_across_processes_with_other_hash_seeds(tmp_path: Path) -> None:
    """Nothing depends on Python's per-process string hashing (set order, hash())."""
    import os
    import subprocess
    import sys

    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-m", "k2", "synth", "--out", str(out), "--n", "40", "--seed", "4", "--quiet"],
                       check=True, env=env, capture_output=True)
        outs.append(out)
    for name in ("train.jsonl", "validation.jsonl", "variants.jsonl", "card.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_held_out_templates_are_a_share_of_each_kind() -> None:
    from k2.agentic.synth.pipeline import held_out_templates
    from k2.agentic.synth.templates import templates

    chosen = list(templates().values())
    held = held_out_templates(chosen, 0.1, 0)
    for kind in ("single", "multi", "parallel", "error", "impossible"):
        mine = [t.id for t in chosen if t.kind == kind]
        assert len(held & set(mine)) == min(round(0.1 * len(mine)), len(mine) - 1)
    assert held == held_out_templates(chosen, 0.1, 0) and held != held_out_templates(chosen, 0.1, 1)
    assert held_out_templates(chosen, 0.0, 0) == set()
    everything = held_out_templates(chosen, 0.99, 0)
    assert all(any(t.id not in everything for t in chosen if t.kind == k) for k in ("single", "error"))


def test_loading_a_broken_variants_file_names_the_line(tmp_path: Path) -> None:
    from k2.errors import SynthError

    path = tmp_path / "variants.jsonl"
    path.write_text('{"id": "x"}\n')
    with pytest.raises(SynthError, match="line 1 is not a tool variant"):
        load_variants(path)
