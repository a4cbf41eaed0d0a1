"""Smoke test: bench/model_throughput.py --quick runs and ends with its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_model_throughput_quick_prints_a_table_and_a_json_line() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "model_throughput.py"), "--quick"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any("mla_layer" in line for line in lines)
    summary = json.loads(lines[-1])
    assert summary["bench"] == "model_throughput"
    assert summary["k2_tokens_per_s"] > 0 and summary["speedup_vs_best_hf"] > 0
    assert set(summary["block_speedups"]) == {"mla_layer", "moe_layer", "head_loss"}
