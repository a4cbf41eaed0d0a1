"""`k2 ckpt inspect` and `k2 ckpt verify`, and the checkpoint benchmarks' smoke runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from k2 import checkpoint
from k2.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = torch.nn.Linear(64, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 64)).sum().backward()
    optimizer.step()
    checkpoint.save(tmp_path, model, optimizer, {"step": 12})
    return tmp_path


def test_inspect_lists_groups_step_and_tensors(saved: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["ckpt", "inspect", str(saved), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "step-00000012" in out and "step 12" in out
    assert "model" in out and "optimizer" in out and "train_state" in out
    assert "weight" in out and "[32, 64]" in out and "8.1 KiB" in out  # 32*64*4 + 32*4 bytes


def test_verify_reports_what_it_read(saved: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["ckpt", "verify", str(saved)]) == 0
    assert capsys.readouterr().out.startswith("OK ")


def test_verify_of_a_directory_without_checkpoint_fails_with_its_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["ckpt", "verify", str(tmp_path)]) == 1
    assert str(tmp_path) in capsys.readouterr().err


@pytest.mark.slow
def test_python_benchmark_quick_run_prints_a_json_line(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "checkpoint.py"), "--quick", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["bench"] == "checkpoint" and line["load_speed_vs_load_file"] > 0
