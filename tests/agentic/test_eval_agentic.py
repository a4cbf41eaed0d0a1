"""``k2 eval agentic``: exact-match scoring on hand-made calls, next-call prompts that are exact
prefixes of the rendered gold conversation, and the command end to end on a tiny untrained model
and a small ``k2 synth`` output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llguidance")
pytest.importorskip("jsonschema")

from k2.agentic.calls import ToolCall  # noqa: E402
from k2.agentic.evaluate import SchemaChecker, calls_match, json_equal, next_call_items  # noqa: E402
from k2.cli import main  # noqa: E402
from k2.data import render_chat  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_helpers import small_config  # noqa: E402

GOLD = ToolCall("transfer", {"from": "a1", "to": "a2", "amount": 150, "memo": {"tag": "rent", "n": [1, 2]}})


@pytest.mark.parametrize(("arguments", "match"), [
    ({"from": "a1", "to": "a2", "amount": 150, "memo": {"tag": "rent", "n": [1, 2]}}, True),
    ({"memo": {"n": [1, 2], "tag": "rent"}, "amount": 150, "to": "a2", "from": "a1"}, True),   # key order
    ({"from": "a1", "to": "a2", "amount": 150.0, "memo": {"tag": "rent", "n": [1, 2]}}, True),  # 150 == 150.0
    ({"from": "a1", "to": "a2", "amount": 151, "memo": {"tag": "rent", "n": [1, 2]}}, False),  # a value
    ({"from": "a1", "to": "a2", "amount": "150", "memo": {"tag": "rent", "n": [1, 2]}}, False),  # a type
    ({"from": "a1", "to": "a2", "amount": 150, "memo": {"tag": "rent", "n": [2, 1]}}, False),  # array order
    ({"from": "a1", "to": "a2", "amount": 150, "memo": {"tag": "rent", "n": [1, 2]}, "x": 1}, False),  # extra
    ({"from": "a1", "to": "a2", "amount": 150}, False),  # missing
])
def test_exact_match_compares_arguments_as_json_values(arguments, match):
    assert calls_match(GOLD, ToolCall("transfer", arguments)) is match
    assert calls_match(GOLD, ToolCall("transfer2", arguments)) is False  # another name never matches


def test_json_equal_keeps_booleans_apart_from_numbers():
    assert not json_equal(True, 1) and not json_equal(0, False) and json_equal(False, False)
    assert not json_equal(None, 0) and json_equal(None, None)
    assert not calls_match(GOLD, ToolCall("transfer", None, error="not JSON")) and not calls_match(GOLD, None)


def test_schema_checker():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}}}]
    checker = SchemaChecker()
    assert checker.valid(ToolCall("f", {"n": 3}), tools)
    assert not checker.valid(ToolCall("f", {"n": "3"}), tools)
    assert not checker.valid(ToolCall("f", {}), tools)
    assert not checker.valid(ToolCall("g", {"n": 3}), tools)
    assert not checker.valid(ToolCall("f", None, error="cut off"), tools)


def test_next_call_prompts_are_prefixes_of_the_gold_rendering():
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("a", "b")]
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "functions.a:0", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "functions.a:0", "content": "ok"},
        {"role": "assistant", "content": "Both now.", "tool_calls": [
            {"id": "functions.b:1", "type": "function", "function": {"name": "b", "arguments": '{"y": [1, 2]}'}},
            {"id": "functions.a:2", "type": "function", "function": {"name": "a", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "functions.b:1", "content": "ok"},
        {"role": "tool", "tool_call_id": "functions.a:2", "content": "ok"},
        {"role": "assistant", "content": "Done."},
    ]
    full = render_chat(messages, tools)
    items = next_call_items({"messages": messages, "tools": tools})
    assert [(i.gold.name, i.gold.arguments) for i in items] == [("a", {"x": 1}), ("b", {"y": [1, 2]}), ("a", {})]
    for item, counter in zip(items, (0, 1, 2)):
        assert item.prompt.endswith("<|tool_call_begin|>") and full.startswith(item.prompt)
        rest = f"functions.{item.gold.name}:{counter}<|tool_call_argument_begin|>{item.gold.raw_arguments}<|tool_call_end|>"
        assert full[len(item.prompt):].startswith(rest)
    assert items[1].prompt.endswith("Both now.<|tool_calls_section_begin|><|tool_call_begin|>")


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 20-trajectory synthesis output, a tokenizer trained on its training split, and an
    untrained small model saved as a checkpoint with that tokenizer."""
    from k2 import checkpoint
    from k2.agentic.synth import SynthOptions, synthesize
    from k2.data.tokenizer import save_tokenizer, train_tokenizer
    from k2.model import K2ForCausalLM

    root = tmp_path_factory.mktemp("eval")
    data = root / "synth"
    synthesize(SynthOptions(n=20, seed=0, validation=0.3), data)
    tokenizer = train_tokenizer((data / "train.jsonl").read_text().splitlines(), 2000)
    save_tokenizer(tokenizer, root)
    torch.manual_seed(0)
    model = K2ForCausalLM(small_config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=1024,
                                       rope_scaling=None))
    checkpoint.save(root / "checkpoints", model, tokenizer_dir=root, step=0)
    return root / "checkpoints", data


def _run(capsys, *argv: str) -> dict:
    assert main(["eval", "agentic", *argv, "--quiet"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "tool-name accuracy" in out[0] + out[1]
    return json.loads(out[-1])


def _check_figures(figures: dict) -> None:
    for key in ("tool_name_accuracy", "next_call_exact_match", "schema_valid_calls", "schema_valid_of_all_calls",
                "episode_success", "episode_success_single_multi"):
        value = figures[key]
        assert value is None or 0.0 <= value <= 1.0, (key, value)


def test_eval_next_calls_constrained(setup, capsys):
    ckpt, data = setup
    result = _run(capsys, str(ckpt), "--data", str(data), "--limit", "1", "--no-episodes", "--constraints", "on",
                  "--call-tokens", "48")
    figures = result["constrained"]
    _check_figures(figures)
    assert "unconstrained" not in result and result["records"] == 1
    assert result["options"]["call_tokens"] == 48 and result["options"]["episodes"] is False
    # An untrained model may never close a JSON string, so a call may run out of its budget:
    # every call is finished or cut off, and every finished one is valid (None: none finished).
    assert figures["next_calls"] >= 1
    assert figures["calls_finished"] + figures["calls_cut_off"] == figures["next_calls"]
    assert figures["schema_valid_calls"] == (1.0 if figures["calls_finished"] else None)


@pytest.mark.slow
def test_eval_agentic_end_to_end(setup, capsys):
    ckpt, data = setup
    result = _run(capsys, str(ckpt), "--data", str(data), "--limit", "2", "--call-tokens", "48",
                  "--turn-tokens", "64")
    for mode in ("unconstrained", "constrained"):
        _check_figures(result[mode])
        assert result[mode]["episodes"] == 2 and result[mode]["next_calls"] >= 2
    constrained = result["constrained"]
    assert constrained["schema_valid_calls"] == (1.0 if constrained["calls_finished"] else None)
    # the untrained model finishes no valid call on its own
    assert result["unconstrained"]["schema_valid_of_all_calls"] in (0.0, None)


def test_eval_bad_input_is_named(setup, tmp_path, capsys):
    ckpt, data = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "validation.jsonl").write_text("")
    for run, folder, message in ((ckpt, tmp_path, "validation.jsonl does not exist"),
                                 (tmp_path / "nope", data, f"model {tmp_path / 'nope'} does not exist"),
                                 (ckpt, empty, "holds no records")):
        assert main(["eval", "agentic", str(run), "--data", str(folder), "--quiet"]) != 0
        assert message in capsys.readouterr().err
    for flag, value, message in (("--turn-tokens", "4", "--turn-tokens must be at least 8"),
                                 ("--limit", "0", "--limit must be at least 1"),
                                 ("--temperature", "-1", "--temperature must be at least 0")):
        assert main(["eval", "agentic", str(ckpt), "--data", str(data), flag, value, "--quiet"]) != 0
        assert message in capsys.readouterr().err


def test_planted_mistakes_are_no_next_call_targets(setup):
    """A schema-invalid gold call (the synthesis expert's planted mistake) is skipped and counted."""
    from k2.agentic.evaluate import AgenticEvaluator, EvalOptions, Tally, load_model

    ckpt, _ = setup
    model, tokenizer, _ = load_model(ckpt)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}}}]
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": '{"count": 1}'}}]},
        {"role": "tool", "tool_call_id": "functions.f:0", "content": "error"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "functions.f:1", "type": "function", "function": {"name": "f", "arguments": '{"n": 1}'}}]},
    ]
    tally = Tally()
    evaluator = AgenticEvaluator(model, tokenizer, EvalOptions(call_tokens=8))
    evaluator.next_calls([{"messages": messages, "tools": tools}], True, tally)
    assert tally.skipped_mistakes == 1 and tally.next_calls == 1
