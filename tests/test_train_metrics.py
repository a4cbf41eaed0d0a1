"""The metrics log and `k2 plot`."""

from __future__ import annotations

import json
import subprocess
import sys

from k2.train.metrics import MetricsLog, read_metrics


def write_run(run_dir) -> None:
    with MetricsLog(run_dir / "metrics.jsonl") as log:
        log.write(0, "baseline", unigram_nats=5.0, bigram_nats=4.0)
        for step in range(6):
            log.write(step, "train", loss=5.0 - 0.3 * step, lr=1e-3, grad_norm=1.0 + step,
                      max_logit=[10.0 + step, 8.0], clipped_heads=[0, 1],
                      expert_balance=[1.5, 1.2], tokens_per_s=1000.0)
        log.write(5, "eval", val_loss=3.6)


def test_log_round_trips_and_survives_a_torn_line(tmp_path) -> None:
    write_run(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "kind": "tr')  # a crash in the middle of a line
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 8
    assert records[1] == {"step": 0, "kind": "train", "loss": 5.0, "lr": 1e-3, "grad_norm": 1.0,
                          "max_logit": [10.0, 8.0], "clipped_heads": [0, 1],
                          "expert_balance": [1.5, 1.2], "tokens_per_s": 1000.0}


def test_non_finite_values_stay_visible(tmp_path) -> None:
    with MetricsLog(tmp_path / "m.jsonl") as log:
        log.write(1, "train", loss=float("nan"))
    assert json.loads((tmp_path / "m.jsonl").read_text())["loss"] == "nan"


def test_k2_plot_writes_every_figure(tmp_path) -> None:
    write_run(tmp_path)
    result = subprocess.run([sys.executable, "-m", "k2", "plot", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = {"loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "max_logit.png",
             "clipped_heads.png", "expert_balance.png"}
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name


def test_k2_plot_on_a_missing_run_names_it(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "k2", "plot", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "nope" in result.stderr and "metrics.jsonl" in result.stderr


def write_run_with_skipped_steps(run_dir) -> None:
    """What the loop logs when MuonClip skips non-finite steps (here 1, 3 and 5): NaN loss and
    gradient norm, and no per-layer values."""
    with MetricsLog(run_dir / "metrics.jsonl") as log:
        for step in range(6):
            skipped = step % 2 == 1
            log.write(step, "train", loss=float("nan") if skipped else 5.0 - 0.3 * step,
                      lr=1e-3, grad_norm=float("nan") if skipped else 1.0,
                      max_logit=[] if skipped else [10.0 + step, 8.0],
                      clipped_heads=[] if skipped else [0, 1],
                      expert_balance=[] if skipped else [1.5], tokens_per_s=1000.0,
                      skipped_steps=(step + 1) // 2)


def test_k2_plot_draws_a_run_with_skipped_steps(tmp_path, capsys) -> None:
    from k2.cli import main

    write_run_with_skipped_steps(tmp_path)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    assert main(["plot", str(tmp_path)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    for name in ("loss.png", "grad_norm.png", "max_logit.png", "clipped_heads.png",
                 "expert_balance.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_skipped_steps_are_gaps_in_every_series(tmp_path) -> None:
    import math

    from k2.train.plots import layer_series, scalar_series

    write_run_with_skipped_steps(tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    steps, layers = layer_series(records, "max_logit")
    assert steps == [0, 1, 2, 3, 4, 5] and len(layers) == 2
    assert [v if not math.isnan(v) else None for v in layers[0]] == [10.0, None, 12.0, None,
                                                                     14.0, None]
    steps, loss = scalar_series(records, "train", "loss")
    assert steps == [0, 1, 2, 3, 4, 5]
    assert [math.isnan(v) for v in loss] == [False, True] * 3
