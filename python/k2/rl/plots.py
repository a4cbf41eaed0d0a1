"""PNG plots of an RL run's metrics, beside ``metrics.jsonl`` (docs/rl.md, "The RL loop"):
``rl_reward.png`` (train reward, held-out reward), ``rl_accuracy.png`` (train and held-out
accuracy), ``rl_truncation.png``, ``rl_response_len.png``, ``rl_entropy.png``,
``rl_log_ratio.png`` and ``rl_tokens_per_s.png`` (rollout and trainer). A quantity the log never
recorded gets no figure; :func:`k2.train.plots.plot_run` draws the shared ones (loss, lr, ...).
"""

from __future__ import annotations

from pathlib import Path

from k2.train.metrics import read_metrics
from k2.train.plots import scalar_series

FIGURES = [
    ("rl_reward.png", "reward", [("train", "reward", "train (shaped)"), ("eval", "reward", "held-out, greedy")]),
    ("rl_accuracy.png", "accuracy", [("train", "accuracy", "train samples"), ("eval", "accuracy", "held-out, greedy")]),
    ("rl_truncation.png", "truncated share", [("train", "truncation_rate", "train samples")]),
    ("rl_response_len.png", "tokens", [("train", "response_len", "mean response length")]),
    ("rl_entropy.png", "nats / token", [("train", "entropy", "mean -log p of sampled tokens")]),
    ("rl_log_ratio.png", "log pi_theta - log pi_old", [("train", "log_ratio", "mean per sequence")]),
    ("rl_tokens_per_s.png", "tokens / s", [("train", "rollout_tokens_per_s", "rollout"),
                                            ("train", "trainer_tokens_per_s", "trainer")]),
]


def plot_rl(run_dir: str | Path) -> list[Path]:
    """Draw the RL figures for the run in ``run_dir``; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    written: list[Path] = []
    for name, ylabel, curves in FIGURES:
        series = [(scalar_series(records, kind, key), label, kind) for kind, key, label in curves]
        if not any(values for (_, values), _, _ in series):
            continue
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for (steps, values), label, kind in series:
            if values:
                ax.plot(steps, values, "o-" if kind == "eval" else "-", lw=1, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=110)
        plt.close(fig)
        written.append(run_dir / name)
    return written
