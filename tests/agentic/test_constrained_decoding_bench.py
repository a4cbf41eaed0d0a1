"""Smoke test: bench/constrained_decoding.py --quick runs and ends with its JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_constrained_decoding_bench_quick() -> None:
    pytest.importorskip("llguidance")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "constrained_decoding.py"), "--quick"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "constrained_decoding" and summary["batch"] == 2
    assert summary["s_per_token_constrained"] > 0 and summary["s_per_token_unconstrained"] > 0
    assert summary["ratio"] > 0 and 0 < summary["in_call_share"] <= 1
    assert 0 < summary["s_per_token_constraint_work"] < summary["s_per_token_constrained"]
