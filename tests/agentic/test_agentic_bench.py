"""Smoke test: bench/agentic_env.py --quick runs both parts and ends with its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_agentic_env_bench_quick() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "agentic_env.py"), "--quick"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "agentic_env"
    overhead = summary["overhead"]
    assert overhead["env_steps"] > overhead["episodes"] > 0 and overhead["direct_calls_per_s"] > 0
    rollout = summary["rollout"]
    assert rollout["env_steps"] == rollout["batch"] * rollout["rounds"] and 0 < rollout["env_share"] < 1
