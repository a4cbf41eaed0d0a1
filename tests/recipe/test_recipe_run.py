"""``k2 recipe`` end to end: stage markers, skipping finished stages, resuming an interrupted or
crashed stage through its own ``--resume``, and the evaluation's figures against the stages' own
(docs/recipe.md)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from k2.cli import main
from k2.errors import ConfigError, K2Error
from k2.recipe import load, run
from k2.recipe.stages import Stage, check_marker, forget_after, marker_path, read_marker, run_stage


def test_a_stage_that_returns_0_gets_an_atomic_marker(tmp_path: Path) -> None:
    stage = Stage("synth", tmp_path / "synth", {"n": 3}, ["version"])
    lines: list[str] = []
    marker = run_stage(stage, tmp_path, lines.append)
    assert marker == read_marker(tmp_path, "synth")
    assert marker["settings"] == {"n": 3} and marker["attempts"] == 1 and marker["command"] == "k2 version"
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["synth.done.json"]  # no temporary, no attempts file


def test_a_failing_stage_leaves_no_marker_and_restarts_clean(tmp_path: Path) -> None:
    directory = tmp_path / "train"
    directory.mkdir()
    (directory / "partial.txt").write_text("half a run, no checkpoint")
    stage = Stage("train", directory, {}, ["ckpt", "verify", str(tmp_path / "no-such-checkpoint")])
    lines: list[str] = []
    with pytest.raises(K2Error):
        run_stage(stage, tmp_path, lines.append)
    assert read_marker(tmp_path, "train") is None
    assert not directory.exists()  # nothing to resume from: cleared for a clean start
    assert any("nothing to resume from" in line for line in lines)
    attempts = json.loads((tmp_path / "stages" / "train.attempts.json").read_text())
    assert len(attempts) == 1 and attempts[0]["exit"] is None
    # The next attempt succeeds: the marker counts both attempts' time.
    marker = run_stage(Stage("train", directory, {}, ["version"]), tmp_path, lines.append)
    assert marker["attempts"] == 2 and marker["seconds"] >= attempts[0]["seconds"]


def test_a_finished_stage_with_other_settings_is_refused(tmp_path: Path) -> None:
    stage = Stage("sft", tmp_path / "sft", {"steps": 3, "lr": 0.001}, ["version"])
    marker = run_stage(stage, tmp_path, lambda _: None)
    check_marker(stage, marker, tmp_path)  # same settings: fine
    changed = Stage("sft", tmp_path / "sft", {"steps": 5, "lr": 0.001}, ["version"])
    with pytest.raises(ConfigError, match=r"stage sft finished .* other settings \(steps: 3 then, 5 now\)"):
        check_marker(changed, marker, tmp_path)


def test_rerunning_a_stage_forgets_the_later_ones(tmp_path: Path) -> None:
    stages = [Stage(n, tmp_path / n, {}, ["version"]) for n in ("train", "synth", "sft", "rl")]
    for s in stages:
        run_stage(s, tmp_path, lambda _: None)
        s.directory.mkdir()
    forget_after(stages, 1, tmp_path, lambda _: None)
    assert [marker_path(tmp_path, s.name).exists() for s in stages] == [True, True, False, False]
    assert [s.directory.exists() for s in stages] == [True, True, False, False]


TINY = """
[train]
data_dir = "{data_dir}"
steps = 2
seq_len = 64
batch_size = 2
warmup_steps = 1
eval_every = 2
eval_batches = 1
save_every = 1
log_every = 1
num_samples = 0

[synth]
n = 12
per_tool = 4
mix = "single=1"
max_tools = 2
tool_chars = 0
validation = 0.3

[sft]
steps = 3
seq_len = 1024
batch_size = 1
warmup_steps = 1
eval_every = 3
eval_batches = 1
save_every = 1
log_every = 1

[rl]
task = "arithmetic"
task_working = "steps"
task_digits = 1
seq_len = 256
steps = 2
warm_start_steps = 1
warm_start_examples = 8
prompts_per_step = 2
samples_per_prompt = 2
token_budget = 8
eval_prompts = 4
eval_every = 3
save_every = 1
batch_size = 2
critic_share = 0.5
critic_eval_prompts = 2
critic_batch = 2
ptx_weight = 0.5
ptx_seq_len = 1024
ptx_batch_size = 1

[eval]
val_batches = 0
agentic_limit = 1
agentic_batch = 2
call_tokens = 8
turn_tokens = 8
episode_tokens = 1024
arithmetic_prompts = 4
report_episodes = 1
"""


def interrupt_at_second_step(monkeypatch, cls, how):  # noqa: ANN001
    """Make ``cls.train_step`` stop the run at its second call: ``how`` "sigint" is Ctrl-C (the
    harness saves and exits 130), "crash" an exception out of the stage (a kill after step 1's save)."""
    original = cls.train_step
    calls = []

    def step(self, step, log):  # noqa: ANN001
        calls.append(step)
        if len(calls) == 2:
            if how == "crash":
                raise RuntimeError("simulated crash in the middle of a stage")
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step, log)

    monkeypatch.setattr(cls, "train_step", step)


@pytest.mark.slow
def test_recipe_runs_resumes_after_ctrl_c_and_a_crash_and_reports(data_dir: Path, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    from k2.rl.job import RLJob
    from k2.train.sft import SFTJob

    config_path = tmp_path / "recipe.toml"
    config_path.write_text(TINY.format(data_dir=data_dir))
    out = tmp_path / "out"

    # 1. Ctrl-C during SFT: train and synth finish, SFT saves and stops; exit status 130.
    with monkeypatch.context() as m:
        interrupt_at_second_step(m, SFTJob, "sigint")
        assert main(["recipe", "--config", str(config_path), "--out", str(out)]) == 130
    assert read_marker(out, "train") and read_marker(out, "synth")
    assert read_marker(out, "sft") is None and (out / "sft" / "checkpoints").is_dir()
    html = (out / "report.html").read_text()
    assert "2 of 4 stages finished" in html and "Interrupted during sft" in html
    table = json.loads((out / "stage_table.json").read_text())
    assert [r["done"] for r in table["rows"]] == [True, True, False, False]
    assert table["rows"][0]["next_call_exact_match"] is not None  # the pretrained model met the held-out tasks

    # 2. A crash in RL: SFT resumes from its checkpoint and finishes; the error passes on.
    with monkeypatch.context() as m:
        interrupt_at_second_step(m, RLJob, "crash")
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(load(config_path), out)
    log = capsys.readouterr().out
    assert "train: finished earlier" in log and "synth: finished earlier" in log
    assert "sft: resuming the interrupted run" in log
    assert read_marker(out, "sft")["attempts"] == 2 and read_marker(out, "rl") is None
    assert "3 of 4 stages finished" in (out / "report.html").read_text()

    # 3. Run again: only RL runs, resumed from its step-1 checkpoint; the report is complete.
    result = run(load(config_path), out)
    assert result.skipped == ["train", "synth", "sft"] and result.finished == ["train", "synth", "sft", "rl"]
    assert result.interrupted is None
    assert "rl: resuming the interrupted run" in capsys.readouterr().out
    rl_marker = read_marker(out, "rl")
    assert rl_marker["attempts"] == 2 and "--resume" not in rl_marker["command"]

    table = json.loads((out / "stage_table.json").read_text())
    rows = {r["stage"]: r for r in table["rows"]}
    assert all(r["done"] for r in rows.values())
    figures = {name: json.loads((out / "eval" / f"{name}.json").read_text()) for name in ("train", "sft", "rl")}
    # The pretrained model's loss on the whole validation split is k2 train's own final evaluation.
    train_evals = [r for r in map(json.loads, (out / "train" / "metrics.jsonl").read_text().splitlines())
                   if r["kind"] == "eval"]
    assert figures["train"]["val_loss"]["val_loss"] == pytest.approx(train_evals[-1]["val_loss"], abs=1e-5)
    assert figures["train"]["val_loss"]["bigram_nats"] == table["baselines"]["bigram_nats"]
    # The arithmetic figure after RL is k2 rl's own final held-out evaluation (same prompts, budget).
    rl_evals = [r for r in map(json.loads, (out / "rl" / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "eval"]
    for key in ("accuracy", "reward", "truncation_rate"):
        assert figures["rl"]["arithmetic"][key] == pytest.approx(rl_evals[-1][key]), key
    # ... and asks for the worked steps and operand digits the RL stage trained on, after every stage.
    assert {figures[name]["arithmetic"]["working"] for name in figures} == {"steps"}
    assert {figures[name]["arithmetic"]["digits"] for name in figures} == {1}
    operands = [int(x) for name in figures for ex in figures[name]["arithmetic"]["examples"]
                for x in re.findall(r"\d+", ex["prompt"])]
    assert operands and max(operands) < 10
    # RL's PTX batches came from the SFT stage's shards, in warm-start and RL steps alike.
    assert f"--ptx-data={out / 'sft' / 'data'}" in rl_marker["command"]
    rl_steps = [r for r in map(json.loads, (out / "rl" / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    assert {r["phase"] for r in rl_steps} == {"warm_start", "rl"} and all(r["ptx_loss"] > 0 for r in rl_steps)
    assert "critic" in figures["rl"] and "critic" not in figures["sft"]
    for name in ("train", "sft", "rl"):
        agentic = figures[name]["agentic"]
        assert agentic["records"] == 1 and agentic["constrained"]["next_calls"] >= 1
        assert len(agentic["episodes"]) == 1 and agentic["episodes"][0]["messages"]
    html = (out / "report.html").read_text()
    assert "4 of 4 stages finished" in html and html.count('class="episode') == 1 and "<script" not in html
    record = json.loads((out / "recipe.json").read_text())
    assert record["complete"] and set(record["stages"]) == {"train", "synth", "sft", "rl"}
    assert record["machine"]["cpu_count"] == os.cpu_count()

    # 4. Once more: nothing runs and nothing is evaluated again.
    before = {p: p.stat().st_mtime_ns for p in (out / "eval").iterdir()}
    result = run(load(config_path), out)
    assert result.skipped == ["train", "synth", "sft", "rl"]
    assert {p: p.stat().st_mtime_ns for p in (out / "eval").iterdir()} == before
