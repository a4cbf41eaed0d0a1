"""Smoke test: bench/optim_step.py --quick runs and ends with its JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_optim_step_benchmark_quick() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "optim_step.py"), "--quick", "--steps", "1"],
                            capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("# k2 optimizer step")
    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "optim_step"
    for key in ("speedup_vs_reference_loop", "speedup_vs_torch_muon", "ns_fraction_of_matmul"):
        assert summary[key] > 0, key
    assert summary["max_rel_weight_diff_vs_reference"] < 1e-4  # MuonClip did the reference's math
