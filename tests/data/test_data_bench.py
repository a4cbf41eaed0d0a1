"""Smoke run of bench/loader.py (`--quick`): it runs and ends with its JSON line. (The Rust
bench binary has its own smoke test under `cargo test`.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_python_loader_bench_quick_prints_its_ratios() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loader.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["bench"] == "loader"
    assert last["k2_tokens_per_s"] > 0 and last["k2_vs_numpy"] > 0 and last["k2_vs_torch"] > 0
