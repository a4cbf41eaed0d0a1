"""Crash safety: a save killed at any point leaves the previous checkpoint loadable, and `latest`
never names a partial one.

The saving process is a subprocess that uses only the native writer (no torch import, so each
one starts in a fraction of a second). It dies either at a named fault-injection point
(``K2_CKPT_FAULT=<phase>``, SIGKILL from inside) or from a SIGKILL sent at a random moment.
Durability itself (the fsync/rename order) is checked from the recorded trace in
test_checkpoint.py and in the Rust unit tests, since a killed process leaves the page cache
intact.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from k2 import _native, checkpoint

SAVER = """
import json, sys
import numpy as np
from k2 import _native

def save(root, step):
    # Four 256 KiB tensors whose values encode the step, in two shards.
    tensors = [
        (f"t{i}", "F32", [64, 1024], np.full(64 * 1024, step * 10 + i, np.float32).view(np.uint8))
        for i in range(4)
    ]
    writer = _native.CheckpointWriter(f"{root}/step-{step:08d}", chunk_bytes=1 << 16)
    writer.write_groups([("model", tensors)], 1 << 19)
    writer.write_file("train_state.json", json.dumps({"step": step}).encode())
    writer.commit(publish_latest=True, keep_last=2)

if __name__ == "__main__":
    root, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for step in range(first, first + count):
        save(root, step)
"""


def run_saver(root: Path, first: int, count: int, fault: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("K2_CKPT_FAULT", None)
    if fault is not None:
        env["K2_CKPT_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-c", SAVER, str(root), str(first), str(count)], env=env)


def check_checkpoint(directory: Path) -> int:
    """Verify every byte of a checkpoint and that its contents are those of its step."""
    reader = _native.CheckpointReader(directory)
    reader.verify()
    step = json.loads(reader.read_file("train_state.json"))["step"]
    assert directory.name == f"step-{step:08d}"
    for i in range(4):
        values = reader.array(f"t{i}").view(np.float32)
        assert values.size == 64 * 1024 and np.all(values == step * 10 + i)
    return step


def check_root(root: Path) -> int:
    """`latest` names a complete checkpoint; every checkpoint the root lists is complete."""
    latest = _native.read_latest(root)
    assert latest is not None
    for name in _native.list_checkpoints(root):
        check_checkpoint(root / name)
    return check_checkpoint(root / latest)


def prepare(root: Path) -> None:
    assert run_saver(root, 1, 2).wait(timeout=60) == 0
    assert check_root(root) == 2


# The checkpoint `latest` names after a save of step 3 dies at each phase.
EXPECTED_LATEST = {phase: 2 for phase in checkpoint.FAULT_PHASES} | {"after_latest": 3, "mid_prune": 3}


def test_every_fault_phase_is_covered() -> None:
    assert set(EXPECTED_LATEST) == set(checkpoint.FAULT_PHASES)
    assert len(checkpoint.FAULT_PHASES) >= 8


@pytest.mark.slow
@pytest.mark.parametrize("phase", checkpoint.FAULT_PHASES)
def test_a_save_killed_at_each_phase_leaves_a_loadable_checkpoint(tmp_path: Path, phase: str) -> None:
    prepare(tmp_path)
    proc = run_saver(tmp_path, 3, 1, fault=phase)
    assert proc.wait(timeout=60) == -signal.SIGKILL, f"the save did not die at {phase}"
    assert check_root(tmp_path) == EXPECTED_LATEST[phase]
    check_checkpoint(tmp_path / "step-00000002")  # the previous checkpoint always loads
    # The next save succeeds and clears what the crash left behind.
    assert run_saver(tmp_path, 4, 1).wait(timeout=60) == 0
    assert check_root(tmp_path) == 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_sigkill_at_random_moments_never_exposes_a_partial_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(1234)
    prepare(tmp_path)
    step = 3
    for _ in range(6):
        proc = run_saver(tmp_path, step, 1000)
        time.sleep(rng.uniform(0.15, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        step = check_root(tmp_path) + 2  # skip past whatever may be half-written



TORCH_SAVER = """
import sys
import torch
from k2 import checkpoint

model = torch.nn.Linear(256, 256)
checkpoint.save(sys.argv[1], model, torch.optim.AdamW(model.parameters()), {"step": 2}, keep_last=2)
"""


@pytest.mark.slow
def test_the_python_api_survives_a_crash_mid_write(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 256)).sum().backward()
    optimizer.step()
    checkpoint.save(tmp_path, model, optimizer, {"step": 1}, keep_last=2)

    env = dict(os.environ, K2_CKPT_FAULT="mid_write")
    crashed = subprocess.run([sys.executable, "-c", TORCH_SAVER, str(tmp_path)], env=env, timeout=120)
    assert crashed.returncode == -signal.SIGKILL

    fresh = torch.nn.Linear(256, 256)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    assert checkpoint.load(tmp_path, fresh, fresh_optimizer).train_state == {"step": 1}
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], exp_avg)
