"""bench/scale.py (slow): under torchrun with gloo, FSDP2 and expert parallelism on 2 ranks hold
what ``k2 plan`` predicts, and FSDP2 halves (expert parallelism halves the experts of) the
one-process bytes (docs/plan.md, "Measured as ranks are added")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import scale  # noqa: E402


@pytest.mark.slow
def test_bytes_per_rank_follow_the_plan_and_fall_as_one_over_n(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "scale.json"
    result = scale.main(["--quick", "--steps", "1", "--out", str(out)])
    assert "plan within 10 % of measured: yes" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {(r["layout"], r["ranks"]): r for r in result["rows"]}
    assert set(rows) == {("fsdp", 1), ("ep", 1), ("fsdp", 2), ("ep", 2)}
    one, fsdp, ep = rows["fsdp", 1], rows["fsdp", 2], rows["ep", 2]
    for kind in scale.KINDS:
        for row in rows.values():
            assert row["measured"][kind] == pytest.approx(row["predicted"][kind], rel=0.1), (kind, row)
        # FSDP2: each rank holds half of everything (within 1 %: tiny's rows divide by 2)
        assert 2 * fsdp["measured"][kind] == pytest.approx(one["measured"][kind], rel=0.01), kind
        # ep: the routed experts are halved, everything else stays whole
        assert 2 * ep["expert_bytes"][kind] == one["expert_bytes"][kind], kind
        dense = one["measured"][kind] - one["expert_bytes"][kind]
        assert ep["measured"][kind] - ep["expert_bytes"][kind] == dense, kind
    assert one["expert_bytes"]["parameters"] > 0
    assert result["plan_within_10pct"] and result["one_over_n_within_10pct"]
    assert all(r["step_s"] > 0 for r in rows.values())
