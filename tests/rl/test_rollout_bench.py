"""bench/rollout.py runs (its --quick mode) and reports what it measured."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "rollout.py"


def test_rollout_bench_quick(capsys):
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("bench_rollout", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    assert "k2 engine tok/s" in out and out.strip().splitlines()[-1].startswith('{"bench": "rollout"')
    assert result["batch"] == 2 and result["new_tokens"] == 8 and result["threads"] == 1
    rates = result["uniform_tokens_per_s"]
    assert set(rates) == {"k2_engine", "k2_generate", "transformers"}
    assert all(rate > 0 for rate in rates.values())
    assert result["uniform_ratio_vs_transformers"] > 0
