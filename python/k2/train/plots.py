"""PNG plots of a run's metrics (``k2 plot RUN`` redraws them; training draws them at the end).

One figure per quantity, written beside ``metrics.jsonl``:
``loss.png`` (train and validation loss), ``lr.png``, ``grad_norm.png``, ``max_logit.png`` (per
layer), ``clipped_heads.png`` (per layer), ``expert_balance.png`` (per MoE layer) and
``tokens_per_s.png``. A quantity the log never recorded gets no figure. A step the optimizer
skipped (non-finite values) is a gap in every curve.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from k2.train.metrics import read_metrics


def _number(value: Any) -> float | None:
    """A logged number as a float: the log spells non-finite values as strings ("nan", "inf")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(value)
    return None


def scalar_series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` in the ``kind`` records; a non-finite value (a skipped step)
    stays as NaN/inf, which matplotlib draws as a gap."""
    steps, values = [], []
    for r in records:
        if r.get("kind") == kind and (value := _number(r.get(key))) is not None:
            steps.append(r["step"])
            values.append(value)
    return steps, values


def layer_series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[list[float]]]:
    """Steps of the ``train`` records that carry the per-layer list ``key``, and one series per
    layer. A step MuonClip skipped logs an empty list: it becomes NaN (a gap) in every layer."""
    rows = [(r["step"], r[key]) for r in records
            if r.get("kind") == "train" and isinstance(r.get(key), list)]
    layers = max((len(v) for _, v in rows), default=0)
    series = [[math.nan] * len(rows) for _ in range(layers)]
    for i, (_, values) in enumerate(rows):
        for layer, value in enumerate(values):
            number = _number(value)
            series[layer][i] = math.nan if number is None else number
    return [step for step, _ in rows], series


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw every figure for the run in ``run_dir``; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = run_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    train_steps, train_loss = scalar_series(records, "train", "loss")
    eval_steps, val_loss = scalar_series(records, "eval", "val_loss")
    if train_loss or val_loss:
        fig, ax = plt.subplots(figsize=(7, 4))
        if train_loss:
            ax.plot(train_steps, train_loss, label="train loss", lw=1)
        if val_loss:
            ax.plot(eval_steps, val_loss, "o-", label="validation loss")
        for r in records:
            if r.get("kind") == "baseline":
                ax.axhline(r["bigram_nats"], ls="--", color="gray", label="KN bigram")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.legend()
        save(fig, "loss.png")

    scalar_plots = [("lr", "learning rate", "lr.png"), ("grad_norm", "gradient norm", "grad_norm.png"),
                    ("tokens_per_s", "tokens / s", "tokens_per_s.png")]
    for key, label, name in scalar_plots:
        steps, values = scalar_series(records, "train", key)
        if values:
            fig, ax = plt.subplots(figsize=(7, 3.5))
            ax.plot(steps, values, lw=1)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            save(fig, name)

    layer_plots = [("max_logit", "max attention logit", "max_logit.png"),
                   ("clipped_heads", "heads clipped", "clipped_heads.png"),
                   ("expert_balance", "max load / mean load", "expert_balance.png")]
    for key, label, name in layer_plots:
        steps, layers = layer_series(records, key)
        if layers:
            fig, ax = plt.subplots(figsize=(7, 3.5))
            for layer, values in enumerate(layers):
                ax.plot(steps, values, lw=1, label=f"layer {layer}")
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.legend(fontsize="small", ncol=2)
            save(fig, name)
    return written
