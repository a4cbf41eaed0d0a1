"""`k2 train --dp-shard 2` under torchrun: the same losses as one process with the same global
batch, end-of-run samples from the gathered model, and a checkpoint that resumes on one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from k2.train.metrics import read_metrics

COMMON = ["--steps", "4", "--eval-every", "4", "--save-every", "2", "--seq-len", "64",
          "--warmup-steps", "1", "--eval-batches", "2", "--log-every", "1", "--no-progress",
          "--sample-tokens", "4"]


def losses(run_dir: Path, kind: str = "train", field: str = "loss") -> dict[int, float]:
    return {r["step"]: r[field] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind}


def k2_train(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                 str(nproc)] if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "k2", "train", *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow
def test_dp_shard_two_ranks_match_one_process_and_resume_on_one(data_dir, tmp_path) -> None:
    data = ["--data-dir", str(data_dir)]
    two, one, resumed = tmp_path / "two", tmp_path / "one", tmp_path / "resumed"
    run = k2_train(*data, *COMMON, "--batch-size", "2", "--dp-shard", "2", "--num-samples", "1",
                   "--run-dir", str(two), nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    run = k2_train(*data, *COMMON, "--batch-size", "4", "--num-samples", "0", "--run-dir", str(one))
    assert run.returncode == 0, run.stderr[-3000:]

    a, b = losses(two), losses(one)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4), step
    assert losses(two, "eval", "val_loss")[4] == pytest.approx(losses(one, "eval", "val_loss")[4], rel=1e-4)
    assert (two / "samples.txt").read_text().startswith("--- sample 0 ---")
    # The sharded run wrote per-rank checkpoints (its default): one manifest, rows in pieces.
    manifest = json.loads((two / "checkpoints" / "step-00000002" / "manifest.json").read_text())
    assert manifest["pieces"] and all(len(p["pieces"]) == 2 for p in manifest["pieces"].values())

    # Resume the sharded run's step-2 checkpoint on one process (2 -> 1 ranks, same global batch).
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    run = k2_train("--resume", "--run-dir", str(resumed), "--batch-size", "4", "--dp-shard", "1",
                   "--allow-changes", "--num-samples", "0", "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from" in run.stdout and "step-00000002" in run.stdout
    c = losses(resumed)
    for step in (3, 4):
        assert c[step] == pytest.approx(b[step], rel=1e-4), step


def test_dp_shard_must_match_the_world_size() -> None:
    from k2.errors import ConfigError
    from k2.parallel.mesh import build_mesh
    import torch

    with pytest.raises(ConfigError, match=r"--dp-shard 2 = 2 ranks, but this run has 1"):
        build_mesh({"dp_shard": 2}, 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"--dp-shard must be at least 1"):
        build_mesh({"dp_shard": 0}, 1, torch.device("cpu"))
    assert build_mesh({"dp_shard": 1}, 4, torch.device("cpu")) is None  # DDP


def test_cpu_offload_needs_sharding() -> None:
    from k2.errors import ConfigError
    from k2.train.config import TrainConfig

    with pytest.raises(ConfigError, match="fsdp_cpu_offload .* needs dp_shard > 1"):
        TrainConfig.resolve(fsdp_cpu_offload=True)
    assert TrainConfig.resolve(fsdp_cpu_offload=True, dp_shard=2).dp_shard == 2
