"""`k2 train --resume`: it finds the newest complete, verified checkpoint whatever state a killed
save left `latest` in, falls back past a corrupt one saying so, continues with the stored
settings, refuses (or, asked to, warns about) changed training settings, and a resume that
fails leaves every file of the run as it was (docs/training.md, Resuming)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from k2.cli import main
from k2.data import PrepareOptions, prepare
from k2.train.metrics import read_metrics
from k2.train.schedule import WSDSchedule

# The smallest real runs: short sequences, AdamW (the resume logic does not depend on the
# optimizer; tests/test_train.py resumes MuonClip bit-identically), a small validation split.
FLAGS = ["--seq-len", "32", "--batch-size", "2", "--warmup-steps", "1", "--eval-batches", "1",
         "--log-every", "1", "--num-samples", "0", "--no-progress", "--eval-every", "4",
         "--save-every", "2", "--keep-last", "3", "--optimizer", "adamw"]
STEP2, STEP4 = "step-00000002", "step-00000004"


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the run, by relative path (what a failed command must leave alone)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def train(data_dir: Path, run: Path, *args: str) -> int:
    return main(["train", *FLAGS, "--data-dir", str(data_dir), "--run-dir", str(run), *args])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Two standard-library modules in 1 KiB chunks, 5% for validation (about 750 tokens)."""
    corpus = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "heapq.py"):
        shutil.copy(stdlib / name, corpus / name)
    out = tmp_path_factory.mktemp("data")
    prepare(PrepareOptions(corpus=(corpus,), out_dir=out, vocab_size=300, val_fraction=0.05,
                           chunk_bytes=1024))
    return out


@pytest.fixture(scope="module")
def finished(data_dir: Path, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (`latest` names step 4)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train(data_dir, run, "--steps", "4") == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", STEP2, STEP4]
    return run


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def corrupt(checkpoint: Path) -> None:
    shard = sorted(checkpoint.glob("model-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0xFF  # a byte of tensor data: the file still parses, its checksum fails
    shard.write_bytes(bytes(raw))


@pytest.mark.slow
def test_resume_adopts_a_complete_checkpoint_latest_does_not_name_yet(data_dir, run, capsys) -> None:
    # The state a save killed at `latest_tmp_written` (or `after_rename`) leaves: step 4 is
    # complete and renamed into place, `latest` still names step 2.
    (run / "checkpoints" / "latest").write_text(STEP2 + "\n")
    (run / "checkpoints" / "latest.tmp").write_text(STEP4 + "\n")
    saved = snapshot(run / "checkpoints" / STEP4)
    capsys.readouterr()
    assert train(data_dir, run, "--steps", "4", "--resume") == 0
    out = capsys.readouterr().out
    assert f"adopting {STEP4}" in out and f"`latest` names {STEP2}" in out
    assert f"resumed from {run / 'checkpoints' / STEP4} at step 4" in out
    assert snapshot(run / "checkpoints" / STEP4) == saved
    assert latest(run) == STEP4


@pytest.mark.slow
def test_resume_finds_checkpoints_when_a_killed_first_save_left_no_latest(data_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "K2_CKPT_FAULT": "after_rename"}
    killed = subprocess.run([sys.executable, "-m", "k2", "train", *FLAGS, "--data-dir", str(data_dir),
                             "--run-dir", str(run), "--steps", "4"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert not (run / "checkpoints" / "latest").exists()
    assert (run / "checkpoints" / STEP2 / "manifest.json").is_file()
    capsys.readouterr()
    assert train(data_dir, run, "--steps", "4", "--resume") == 0
    out = capsys.readouterr().out
    assert f"no `latest`; adopting {STEP2}" in out and "at step 2" in out
    assert latest(run) == STEP4
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("named", [STEP2, STEP4])
def test_resume_falls_back_past_a_corrupt_checkpoint_saying_so(data_dir, run, named, capsys) -> None:
    corrupt(run / "checkpoints" / STEP4)
    (run / "checkpoints" / "latest").write_text(named + "\n")
    bad = snapshot(run / "checkpoints" / STEP4)
    capsys.readouterr()
    assert train(data_dir, run, "--steps", "4", "--resume") == 0
    out = capsys.readouterr().out
    assert f"{STEP4} fails verification" in out and f"falling back to {STEP2}" in out
    assert "at step 2" in out
    # The corrupt checkpoint is kept, byte for byte, outside the checkpoint root; training
    # redid steps 3 and 4 and saved a good step 4 in its place.
    rejected = run / "checkpoints-rejected" / STEP4
    assert snapshot(rejected) == bad and f"moved to {rejected}" in out
    assert latest(run) == STEP4
    assert main(["ckpt", "verify", str(run / "checkpoints")]) == 0


@pytest.mark.slow
def test_resume_refuses_when_no_checkpoint_verifies_and_changes_nothing(data_dir, run, capsys) -> None:
    corrupt(run / "checkpoints" / STEP2)
    corrupt(run / "checkpoints" / STEP4)
    before = snapshot(run)
    capsys.readouterr()
    assert train(data_dir, run, "--steps", "4", "--resume") == 1
    err = capsys.readouterr().err
    assert f"no checkpoint in {run / 'checkpoints'} verifies" in err
    assert STEP2 in err and STEP4 in err and "Traceback" not in err
    assert snapshot(run) == before


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--preset", "small"], "preset: 'tiny' in the checkpoint, 'small' now"),
    (["--adamw-lr", "0.01"], "adamw_lr: 0.003 in the checkpoint, 0.01 now"),
    (["--weight-decay", "0.2", "--seed", "3"], "seed: 0 in the checkpoint, 3 now"),
    (["--allow-changes", "--preset", "small"], "preset cannot change"),
    (["--allow-changes", "--batch-size", "8"], "batch"),
])
def test_a_failed_resume_changes_no_file_of_the_run(data_dir, run, args, message, capsys) -> None:
    before = snapshot(run)
    capsys.readouterr()
    assert train(data_dir, run, "--steps", "4", "--resume", *args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if "--allow-changes" not in args and "preset" not in message:
        assert "--allow-changes" in err  # the way out is named
    if args[:1] == ["--weight-decay"]:
        assert "weight_decay: 0.1 in the checkpoint, 0.2 now" in err  # every difference named
    assert snapshot(run) == before  # config.json, environment.json, metrics, checkpoints


@pytest.mark.slow
def test_resume_continues_with_the_stored_settings(data_dir, run, capsys) -> None:
    # Only the run and data directories given: the checkpoint's settings (seq_len 64, ...) hold,
    # not the defaults (seq_len 256) that a fresh run would take.
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(run), "--data-dir", str(data_dir),
                 "--no-progress", "--steps", "4"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["seq_len"] == 32


@pytest.mark.slow
def test_allow_changes_warns_naming_each_difference_and_continues(data_dir, run, capsys) -> None:
    capsys.readouterr()
    assert train(data_dir, run, "--steps", "6", "--adamw-lr", "0.004", "--resume",
                 "--allow-changes") == 0
    out = capsys.readouterr().out
    assert "adamw_lr: 0.003 in the checkpoint, 0.004 now" in out
    assert "steps: 4 in the checkpoint, 6 now" in out
    train_records = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    # The new peak rate drives the steps after the resume, on the new 6-step schedule.
    schedule = WSDSchedule(peak=1.0, total_steps=6, warmup_steps=1, decay_fraction=0.3, floor=0.1)
    for r in train_records[4:]:
        assert r["lr"] == pytest.approx(0.004 * schedule(r["step"] - 1), rel=1e-12)


# ---------------------------------------------------------------- the choice alone (fast)

def saved_root(tmp_path: Path, steps: list[int]) -> Path:
    """A run directory whose root holds small checkpoints of the given steps, saved the way
    the loop saves them (`latest` names the last)."""
    import torch

    from k2 import checkpoint

    model = torch.nn.Linear(4, 4)
    for step in steps:
        checkpoint.save(tmp_path / "run" / "checkpoints", model, None,
                        {"step": step, "config": {"lr": 0.5, "steps": 9}}, durable=False)
    return tmp_path / "run"


def test_the_choice_follows_latest_when_it_names_the_newest(tmp_path) -> None:
    from k2.train.resume import find_resume_point

    point = find_resume_point(saved_root(tmp_path, [2, 4]))
    assert (point.path.name, point.step, point.notes, point.rejected) == (STEP4, 4, [], [])
    assert point.stored_config == {"lr": 0.5, "steps": 9}


def test_the_choice_adopts_newer_and_skips_corrupt_checkpoints(tmp_path) -> None:
    from k2.errors import CheckpointError, ConfigError
    from k2.train.resume import commit_resume, find_resume_point

    run = saved_root(tmp_path, [2, 4, 6])
    root = run / "checkpoints"
    (root / "latest").write_text(STEP2 + "\n")
    point = find_resume_point(run)
    assert point.path.name == "step-00000006" and "`latest` names step-00000002" in point.notes[0]
    (root / "latest").unlink()
    assert find_resume_point(run).notes[0].startswith("no `latest`; adopting step-00000006")
    corrupt_bytes = root / "step-00000006" / "train_state.json"
    corrupt_bytes.write_text(corrupt_bytes.read_text().replace("0.5", "0.7"))
    point = find_resume_point(run)
    assert point.path.name == STEP4 and "step-00000006 fails verification" in point.notes[0]
    before = snapshot(root / "step-00000006")
    commit_resume(point, run, log=lambda _: None)
    assert snapshot(run / "checkpoints-rejected" / "step-00000006") == before
    assert latest(run) == STEP4 and not (root / "step-00000006").exists()
    corrupt(root / STEP2)
    corrupt(root / STEP4)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies \(step-00000004: .*; "
                       r"step-00000002: "):
        find_resume_point(run)
    shutil.rmtree(root)
    root.mkdir()
    with pytest.raises(ConfigError, match="holds no checkpoint to resume from"):
        find_resume_point(run)
