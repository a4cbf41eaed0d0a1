"""Smoke run of bench/broadcast.py --quick: it completes and ends with its JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_broadcast_bench_quick_run_prints_a_table_and_ratios() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "broadcast.py"), "--quick"],
                         capture_output=True, text=True, timeout=180, env=env, check=False)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert any("gloo per tensor" in line for line in lines)
    result = json.loads(lines[-1])
    ratios = result["ratios"]["synthetic 16 MiB/1w"]
    assert set(ratios) == {"shm_vs_gloo_per_tensor", "shm_swap_vs_gloo_per_tensor",
                           "shm_ring_vs_gloo_per_tensor", "k2_gloo_vs_gloo_per_tensor",
                           "k2_gloo_fast_vs_gloo_per_tensor", "shm_vs_save_load", "shm_of_memcpy"}
    assert all(value > 0 for value in ratios.values())
