"""Smoke run of bench/sft.py (`--quick`): both jobs step on the same data and it ends with its
JSON line (the numbers of a quick run mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a few tiny-preset steps of each job on the CPU
def test_sft_bench_quick_prints_its_ratio() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "sft.py"), "--quick"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["bench"] == "sft" and last["train_tokens_per_s"] > 0 and last["sft_tokens_per_s"] > 0
    assert 0 < last["masked_share"] < 1
    assert last["sft_vs_train"] == pytest.approx(last["sft_tokens_per_s"] / last["train_tokens_per_s"], rel=1e-2)
