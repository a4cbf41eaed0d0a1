"""QK-Clip against runaway attention logits, at an aggressive learning rate (issue 10).

    python bench/qk_clip_study.py [--budget short|toy] [--toy] [--out DIR] [--lr LR] [--tau T]
                                  [--steps N] [--seq-len N] [--batch-size N] [--seeds S ...]

Two runs per seed of the tiny preset, identical but for QK-Clip: Muon without it
(``qk_clip_tau = 0``) and MuonClip with a low τ (30 by default; K2 used 100 at its scale), both at
a Muon rate well above the ``k2 train`` default. K2's claim: without the clip the max logit runs
away; with it, the max logit stays at or below τ (clipping active early, then silent), and the
loss does not suffer.

Logged every step, per layer: the largest pre-softmax attention logit of the step's forward
(measured before that step's clip, so with QK-Clip it can sit slightly above τ: the growth of one
step) and the heads clipped. Every run has its own directory under ``--out``; finished runs are
skipped. Writes ``summary.json``, ``qk_max_logit.png``, ``qk_clipped_heads.png`` and
``qk_loss.png`` into ``--out``; prints a header, a table and one final JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from study import WHOLE_SPLIT, Finished, RunSpec, ensure_run, print_header, save_figure, write_json


@dataclass(frozen=True)
class Budget:
    """Run length, batch shape, the aggressive rate, τ and the seeds."""

    steps: int
    seq_len: int
    batch_size: int
    warmup_steps: int
    eval_every: int
    eval_batches: int
    lr: float
    tau: float
    seeds: tuple[int, ...]


BUDGETS = {
    "short": Budget(steps=200, seq_len=128, batch_size=8, warmup_steps=20, eval_every=50,
                    eval_batches=WHOLE_SPLIT, lr=3e-2, tau=30.0, seeds=(0,)),
    "toy": Budget(steps=4, seq_len=64, batch_size=4, warmup_steps=1, eval_every=2, eval_batches=1,
                  lr=3e-2, tau=30.0, seeds=(0,)),
}


def specs(budget: Budget, data_dir: str) -> list[tuple[str, int, RunSpec]]:
    """(variant, seed, run) for every run: ``no-clip`` and ``clip`` per seed."""
    common = {"preset": "tiny", "data_dir": data_dir, "steps": budget.steps, "seq_len": budget.seq_len,
              "batch_size": budget.batch_size, "warmup_steps": budget.warmup_steps,
              "eval_every": budget.eval_every, "eval_batches": budget.eval_batches, "log_every": 1,
              "save_every": max(budget.eval_every, budget.steps // 4), "keep_last": 1,
              "num_samples": 0, "optimizer": "muonclip", "lr": budget.lr}
    runs = []
    for seed in budget.seeds:
        for variant, tau in (("no-clip", 0.0), ("clip", budget.tau)):
            name = f"muon-lr{budget.lr:g}-tau{tau:g}-s{seed}"
            runs.append((variant, seed, RunSpec(name, {**common, "qk_clip_tau": tau, "seed": seed})))
    return runs


def describe(run: Finished, tau: float) -> dict:
    """One run's numbers: losses, max-logit peak and end per layer, when clipping was active."""
    heads = _total_heads(run)
    clipped_share = [sum(c) / heads for c in run.clipped_heads]  # share of all heads, per step
    n = len(clipped_share)
    quarters = [clipped_share[i * n // 4: (i + 1) * n // 4] for i in range(4)]
    peak = [max((v for v in layer if math.isfinite(v)), default=math.nan) for layer in zip(*run.max_logit)]
    tail = run.train_losses[-max(1, n // 10):]
    return {
        "qk_clip_tau": run.config["qk_clip_tau"], "final_val_loss": run.final_val_loss,
        "final_train_loss_mean_last_10pct": statistics.fmean(tail),
        "max_logit_peak_by_layer": peak, "max_logit_final_by_layer": run.max_logit[-1],
        "max_logit_peak": max((v for v in peak if math.isfinite(v)), default=math.nan), "steps_over_tau": sum(max(m) > tau for m in run.max_logit),
        "steps_with_clipping": sum(s > 0 for s in clipped_share),
        "nonfinite_loss_steps": sum(not math.isfinite(v) for v in run.train_losses),
        "clipped_share_by_quarter": [statistics.fmean(q) if q else 0.0 for q in quarters],
        "last_clipped_step": max((s for s, c in zip(run.train_steps, clipped_share) if c > 0), default=None),
        "step_seconds": run.step_seconds,
    }


def _total_heads(run: Finished) -> int:
    """All attention heads of the model (layers x heads)."""
    from k2.model import K2Config

    config = K2Config.from_preset(run.config["preset"])
    return config.num_hidden_layers * config.num_attention_heads


def plot(runs: list[tuple[str, int, Finished]], budget: Budget, out: Path) -> list[Path]:
    """Max logit per layer against step (one panel per variant), share of heads clipped against
    step, and training loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    seed0 = budget.seeds[0]
    shown = [(variant, run) for variant, seed, run in runs if seed == seed0]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4), sharey=True, squeeze=False)
    for ax, (variant, run) in zip(axes[0], shown):
        for layer, values in enumerate(zip(*run.max_logit)):
            ax.plot(run.train_steps, values, lw=1, label=f"layer {layer}")
        ax.axhline(budget.tau, ls="--", color="gray", lw=1, label=f"τ = {budget.tau:g}")
        ax.set_title(f"{variant} (qk_clip_tau {run.config['qk_clip_tau']:g}), seed {seed0}")
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("max attention logit")
    written.append(save_figure(fig, out / "qk_max_logit.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for variant, seed, run in runs:
        if variant == "clip":
            heads = _total_heads(run)
            share = [sum(c) / heads for c in run.clipped_heads]
            line, = ax.plot(run.train_steps, share, lw=0.6, alpha=0.4)
            ax.plot(run.train_steps, _smooth(share), lw=1.5, color=line.get_color(),
                    label=f"seed {seed} (10-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("share of heads clipped")
    ax.set_title(f"QK-Clip at τ = {budget.tau:g}")
    ax.legend()
    written.append(save_figure(fig, out / "qk_clipped_heads.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"no-clip": "tab:red", "clip": "tab:blue"}
    for variant, seed, run in runs:
        ax.plot(run.train_steps, _smooth(run.train_losses), lw=1, color=colors[variant],
                label=f"{variant}, seed {seed} (val {run.final_val_loss:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.legend()
    written.append(save_figure(fig, out / "qk_loss.png"))
    return written


def _smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing mean over ``window`` values."""
    return [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="short",
                        help="run length, batch, rate, τ and seeds (default: short)")
    parser.add_argument("--toy", "--quick", action="store_true", help="the toy budget: a few steps, for tests")
    parser.add_argument("--out", default="runs/qk_clip_study", help="the study's directory")
    parser.add_argument("--data-dir", default="data", help="prepared tokens (prepared there when missing)")
    parser.add_argument("--lr", type=float, help="override the budget's Muon rate")
    parser.add_argument("--tau", type=float, help="override the budget's τ")
    parser.add_argument("--steps", type=int, help="override the budget's steps")
    parser.add_argument("--seq-len", type=int, help="override the budget's sequence length")
    parser.add_argument("--batch-size", type=int, help="override the budget's batch size")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints")
    args = parser.parse_args(argv)

    budget = BUDGETS["toy" if args.toy else args.budget]
    overrides = {"lr": args.lr, "tau": args.tau, "steps": args.steps, "seq_len": args.seq_len,
                 "batch_size": args.batch_size, "seeds": args.seeds and tuple(args.seeds)}
    budget = replace(budget, **{k: v for k, v in overrides.items() if v})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print_header(f"qk_clip_study: Muon without QK-Clip vs MuonClip at τ = {budget.tau:g}, lr {budget.lr:g}, "
                 f"tiny preset, {budget.steps} steps of {budget.batch_size} x {budget.seq_len} tokens")
    print(f"# budget: {json.dumps(asdict(budget))}; out: {out}", flush=True)

    def log(line: str) -> None:
        print(line, flush=True)

    runs = []
    try:
        for variant, seed, run_spec in specs(budget, args.data_dir):
            runs.append((variant, seed, ensure_run(run_spec, out, log, args.keep_checkpoints)))
    except KeyboardInterrupt as err:
        print(f"interrupted ({err}); run the same command again to continue", file=sys.stderr)
        return 130

    summary = {"budget": asdict(budget),
               "runs": {run.name: {"variant": variant, "seed": seed, **describe(run, budget.tau)}
                        for variant, seed, run in runs}}
    write_json(out / "summary.json", summary)
    print(f"\n{'run':<28}{'val loss':>10}{'peak logit':>12}{'final logit':>12}{'steps>τ':>9}"
          f"{'clip steps':>11}  share of heads clipped by quarter")
    for name, r in summary["runs"].items():
        quarters = " ".join(f"{q:.2f}" for q in r["clipped_share_by_quarter"])
        print(f"{name:<28}{r['final_val_loss']:>10.4f}{r['max_logit_peak']:>12.1f}"
              f"{max(r['max_logit_final_by_layer']):>12.1f}{r['steps_over_tau']:>9}"
              f"{r['steps_with_clipping']:>11}  {quarters}")
    plots = plot(runs, budget, out)
    print(f"\nwrote {out / 'summary.json'}, " + ", ".join(str(p) for p in plots))

    def mean(variant: str, key: str) -> float:
        return statistics.fmean(r[key] for r in summary["runs"].values() if r["variant"] == variant)

    print(json.dumps({"benchmark": "qk_clip_study", "tau": budget.tau, "lr": budget.lr,
                      "max_logit_peak_no_clip": mean("no-clip", "max_logit_peak"),
                      "max_logit_peak_clip": mean("clip", "max_logit_peak"),
                      "val_loss_no_clip": mean("no-clip", "final_val_loss"),
                      "val_loss_clip": mean("clip", "final_val_loss")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
