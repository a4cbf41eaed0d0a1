"""`k2 train`: a short run learns, a killed run resumes bit-identically, Ctrl-C saves, two
torchrun processes match one, and bad settings fail before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from k2 import checkpoint
from k2.cli import main
from k2.model import K2Config, K2ForCausalLM
from k2.train.config import TrainConfig
from k2.train.pretrain import sample_positions
from k2.train.metrics import read_metrics

# Small but real: the tiny preset on short sequences of a small code corpus.
FLAGS = ["--seq-len", "64", "--batch-size", "4", "--warmup-steps", "2", "--eval-batches", "2",
         "--log-every", "1", "--sample-tokens", "8", "--num-samples", "1", "--no-progress"]


def k2_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "k2", *args]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")
            if r["kind"] == "train"}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model = K2ForCausalLM(K2Config.from_preset("tiny"))
    checkpoint.load(run_dir / "checkpoints", model, restore_rng=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(train_losses(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"training did not reach step {step} in {timeout} s")


def test_sample_positions_restart_at_the_sample_and_at_documents() -> None:
    positions = torch.tensor([[7, 8, 9, 0, 1], [0, 1, 2, 3, 4], [5, 0, 1, 0, 1]])
    assert sample_positions(positions).tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4],
                                                    [0, 0, 1, 0, 1]]


@pytest.mark.slow
def test_short_run_learns_and_writes_its_run_directory(data_dir, tmp_path) -> None:
    run = tmp_path / "run"
    code = main(["train", *FLAGS, "--data-dir", str(data_dir), "--run-dir", str(run),
                 "--steps", "30", "--eval-every", "15", "--save-every", "15"])
    assert code == 0
    losses = list(train_losses(run).values())
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    for name in ("config.json", "environment.json", "samples.txt", "loss.png", "max_logit.png"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 30 and config["seq_len"] == 64
    env = json.loads((run / "environment.json").read_text())
    assert env["torch"] == torch.__version__
    records = read_metrics(run / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30]
    assert any(r["kind"] == "baseline" for r in records)
    train = [r for r in records if r["kind"] == "train"]
    assert len(train[-1]["max_logit"]) == 4 and len(train[-1]["expert_balance"]) == 3

    # A second run with the same --run-dir does not touch the first: it gets run-1.
    assert main(["train", *FLAGS, "--data-dir", str(data_dir), "--run-dir", str(run),
                 "--steps", "2", "--eval-every", "2", "--save-every", "2"]) == 0
    assert (tmp_path / "run-1" / "checkpoints" / "latest").exists()
    assert len(train_losses(run)) == 30

    # k2 sample continues a prompt from the trained run.
    result = subprocess.run(k2_cmd("sample", str(run), "--prompt", "def f(x):",
                                   "--max-new-tokens", "5"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def f(x):")

    # ... and chat messages, rendered with K2's chat template.
    messages = tmp_path / "chat.json"
    messages.write_text(json.dumps([{"role": "user", "content": "Write a function."}]))
    result = subprocess.run(k2_cmd("sample", str(run), "--messages", str(messages),
                                   "--max-new-tokens", "3", "--temperature", "0"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("<|im_user|>user<|im_middle|>Write a function.<|im_end|>"
                                    "<|im_assistant|>assistant<|im_middle|>")


@pytest.mark.slow
def test_a_killed_run_resumes_bit_identically(data_dir, tmp_path) -> None:
    common = [*FLAGS, "--data-dir", str(data_dir), "--steps", "14", "--eval-every", "7",
              "--save-every", "4", "--num-samples", "0"]
    straight = tmp_path / "straight"
    assert subprocess.run(k2_cmd("train", *common, "--run-dir", str(straight)),
                          capture_output=True, timeout=300).returncode == 0

    broken = tmp_path / "broken"
    proc = subprocess.Popen(k2_cmd("train", *common, "--run-dir", str(broken)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(broken, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(train_losses(broken))
    assert killed_at < 14
    resumed = subprocess.run(k2_cmd("train", *common, "--run-dir", str(broken), "--resume"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    assert train_losses(broken) == train_losses(straight)  # bit-identical floats, every step
    a, b = final_weights(straight), final_weights(broken)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(k2_cmd("train", *FLAGS, "--data-dir", str(data_dir), "--run-dir",
                                   str(run), "--steps", "500", "--save-every", "400"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "--resume" in out
    saved = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert saved and int(saved[-1].split("-")[1]) == max(train_losses(run))


@pytest.mark.slow
def test_two_torchrun_processes_match_one_process(data_dir, tmp_path) -> None:
    """2 gloo ranks with 2 sequences each against 1 process with 4: the loader gives both the
    same global batch at every step and DDP averages the gradients, so the losses agree up to
    floating-point summation order. We allow 1e-4 relative per step: the reductions differ in
    order (per-rank means, then an all-reduce), and over 20 steps such 1e-7-sized differences
    could in principle flip a near-tied top-k expert choice, which would show up far above it."""
    common = ["--data-dir", str(data_dir), "--steps", "20", "--eval-every", "20",
              "--save-every", "20", "--num-samples", "0", "--seq-len", "64",
              "--warmup-steps", "2", "--eval-batches", "2", "--log-every", "1", "--no-progress"]
    one = tmp_path / "one"
    single = subprocess.run(k2_cmd("train", *common, "--batch-size", "4", "--run-dir", str(one)),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dist_run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "k2", "train", *common, "--batch-size", "2", "--run-dir", str(two)],
        capture_output=True, text=True, timeout=300, env=env)
    assert dist_run.returncode == 0, dist_run.stderr[-3000:]
    a, b = train_losses(one), train_losses(two)
    assert a.keys() == b.keys() == set(range(1, 21))
    env = json.loads((two / "environment.json").read_text())
    assert env["world_size"] == 2
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--lr", "-1"], "lr must be a positive number"),
    (["--seq-len", "4096"], "max_position_embeddings = 1024"),
    (["--corpus", "/no/such/corpus"], "corpus path /no/such/corpus does not exist"),
    (["--warmup-steps", "900", "--steps", "10"], "warmup_steps"),
])
def test_bad_settings_fail_before_any_work(args, message, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--data-dir", str(tmp_path / "data"), *args]) == 1
    assert message in capsys.readouterr().err
    assert not run.exists() and not (tmp_path / "data").exists()


def test_config_file_then_flags(tmp_path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nsteps = 50\nlr = 0.01\nbf16 = false\ncorpus = []\n')
    config = TrainConfig.resolve(toml, lr=0.02)
    assert (config.steps, config.lr, config.bf16) == (50, 0.02, False)
    toml.write_text("stepz = 5\n")
    with pytest.raises(Exception, match="unknown field.*stepz"):
        TrainConfig.resolve(toml)
    with pytest.raises(Exception, match="steps must be of type int"):
        TrainConfig.resolve(None, steps="many")
