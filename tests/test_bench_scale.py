"""bench/scale.py (slow): under torchrun with gloo, DDP, FSDP2, expert parallelism and FSDP2 x EP
on 2 ranks hold what ``k2 plan`` predicts; DDP holds the one-process bytes, FSDP2 and FSDP2 x EP
(dp_shard 1 x ep 2) halve them, expert parallelism halves the experts; every layout reports
tokens/s, and communication time on 2 ranks only (docs/plan.md, "Measured as ranks are added")."""

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
    result = scale.main(["--quick", "--steps", "1", "--profile-steps", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "plan within 10 % of measured: yes" in printed
    assert "ddp holds the one-process bytes on every rank: yes" in printed
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {(r["layout"], r["ranks"]): r for r in result["rows"]}
    assert set(rows) == {(layout, n) for layout in scale.LAYOUTS for n in (1, 2)}
    one, ddp, fsdp, ep, fsdp_ep = (rows["ddp", 1], rows["ddp", 2], rows["fsdp", 2], rows["ep", 2],
                                   rows["fsdp_ep", 2])
    assert fsdp_ep["mesh"] == "dp_shard 1 x ep 2"
    for kind in scale.KINDS:
        for row in rows.values():
            assert row["measured"][kind] == pytest.approx(row["predicted"][kind], rel=0.1), (kind, row)
        # DDP: every rank holds the whole model, gradients and optimizer state
        assert ddp["measured"][kind] == one["measured"][kind], kind
        # FSDP2: each rank holds half of everything (within 1 %: tiny's rows divide by 2)
        assert 2 * fsdp["measured"][kind] == pytest.approx(one["measured"][kind], rel=0.01), kind
        # ep: the routed experts are halved, everything else stays whole
        assert 2 * ep["expert_bytes"][kind] == one["expert_bytes"][kind], kind
        dense = one["measured"][kind] - one["expert_bytes"][kind]
        assert ep["measured"][kind] - ep["expert_bytes"][kind] == dense, kind
        # FSDP2 x EP on dp_shard 1 x ep 2: experts split in two (sharded over one rank), the rest
        # sharded over both ranks: half of everything
        assert 2 * fsdp_ep["expert_bytes"][kind] == one["expert_bytes"][kind], kind
        assert 2 * fsdp_ep["measured"][kind] == pytest.approx(one["measured"][kind], rel=0.01), kind
    assert one["expert_bytes"]["parameters"] > 0
    assert ddp["n_times_bytes_over_one"] == 2 and ddp["one_over_n"] is None
    assert result["plan_within_10pct"] and result["one_over_n_within_10pct"]
    assert result["ddp_replicated_within_10pct"]
    assert {ddp["optimizer"], ep["optimizer"], one["optimizer"]} == {"MuonClip"}
    assert {fsdp["optimizer"], fsdp_ep["optimizer"]} == {"DistributedMuonClip"}
    for (layout, n), row in rows.items():
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0, (layout, n)
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_s"], rel=1e-2)
        if n == 1:  # no process group: no collective
            assert row["comm_s"] == 0 and row["comm_ops"] == {} and row["tokens_per_s_vs_one"] == 1
        else:  # every sharded or replicated layout talks: gloo collectives seen, time > 0
            assert row["comm_s"] > 0 and 0 < row["comm_fraction"] <= 1, (layout, row["comm_s"])
            assert any(name.startswith("gloo:all_") for name in row["comm_ops"]), row["comm_ops"]
