"""``k2 synth``: a small run, progress on stderr, and clear errors for bad options (docs/synthesis.md)."""

from __future__ import annotations

import json

import pytest

from k2.cli import main


def test_small_run_writes_the_outputs_and_reports_progress(tmp_path, capsys) -> None:
    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), "--n", "24", "--seed", "3", "--domains", "bank,device",
                 "--mix", "single=1,error=1"]) == 0
    captured = capsys.readouterr()
    assert "synth: 24/24 kept" in captured.err
    assert "wrote 24 trajectories" in captured.out
    card = json.loads((out / "card.json").read_text())
    assert card["by_kind"] == {"error-recovery": 12, "single-call": 12}
    assert set(card["by_domain"]) <= {"bank", "device"}
    lines = (out / "train.jsonl").read_text().splitlines() + (out / "validation.jsonl").read_text().splitlines()
    assert len(lines) == 24
    # a second run into the same folder is refused unless asked for
    assert main(["synth", "--out", str(out), "--n", "4", "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["synth", "--out", str(out), "--n", "4", "--quiet", "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "0"], "--n must be a positive integer"),
        (["--domains", "bank,banana"], "unknown domain 'banana'"),
        (["--mix", "single=1,chatty=2"], "unknown task kind 'chatty'"),
        (["--mix", "single"], "is not KIND=SHARE"),
        (["--mix", "single=lots"], "is not a number"),
        (["--mix", "single=0"], "share of 0"),
        (["--held-out", "1.5"], "--held-out must be in [0, 1)"),
        (["--failure-rate", "-0.1"], "--failure-rate must be in [0, 1)"),
        (["--max-tools", "0"], "--max-tools must be between 1 and 8"),
        (["--per-tool", "1"], "--per-tool must be at least 2"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--user", "openai"], "--openai-model"),
        (["--judge", "openai", "--workers", "2", "--openai-model", "m"], "--workers > 1 needs programmatic roles"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path, capsys, argv, message) -> None:
    assert main(["synth", "--out", str(tmp_path / "x"), "--quiet", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("k2 synth: error: ") and message in err


def test_output_path_that_is_a_file(tmp_path, capsys) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["synth", "--out", str(target), "--n", "2", "--quiet"]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_a_tokenizer_limits_tokens(tmp_path, tokenizer, capsys) -> None:
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), "--n", "12", "--quiet", "--tokenizer", str(path), "--max-tokens", "1500"]) == 0
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    records += [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    from k2.data.chat import render_chat

    for r in records:
        assert r["tokens"] == len(tokenizer.encode(render_chat(r["messages"], r["tools"]), add_special_tokens=False).ids) <= 1500
    card = json.loads((out / "card.json").read_text())
    assert card["rendered_tokens"]["max"] == max(r["tokens"] for r in records)
    assert card["rejection_reasons"].get("too_long", 0) > 0  # a 400-token vocabulary makes long ones
    assert main(["synth", "--out", str(tmp_path / "x"), "--n", "2", "--quiet", "--tokenizer", str(tmp_path / "none.json")]) == 1
    assert "--tokenizer" in capsys.readouterr().err
