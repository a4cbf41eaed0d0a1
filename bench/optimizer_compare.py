"""MuonClip against AdamW on the tiny preset, at equal tokens (issue 10).

    python bench/optimizer_compare.py [--budget short|full|toy] [--toy] [--out DIR]
                                      [--steps N] [--seq-len N] [--batch-size N]
                                      [--muon-lrs LR ...] [--adamw-lrs LR ...] [--seeds S ...]

The protocol:

1. **Sweep**: every rate of each optimizer, with the first seed. MuonClip's rate is Muon's ``lr``
   (its AdamW part, for embeddings, head and norms, runs at half of it, the ratio of the ``k2
   train`` defaults); AdamW is ``torch.optim.AdamW`` on every parameter at ``adamw_lr``, betas
   (0.9, 0.95), as MuonClip's AdamW part. Both: the same WSD schedule, weight decay 0.1, gradient
   clipping at 1.0, the router-bias update, QK-Clip at the default τ = 100 for MuonClip.
2. **Seeds**: the best rate of each (lowest final validation loss) again with the other seeds
   (init, data order).
3. **Report**: final validation loss (every evaluation reads the whole validation split) per optimizer, mean and spread over
   seeds; the tokens MuonClip needs to reach AdamW's mean final loss (interpolated on its
   validation curves, averaged over seeds), as a ratio of AdamW's tokens; the same in wall-clock
   time (tokens needed x MuonClip's median step time against AdamW's whole run). If MuonClip does
   not get there, the reverse: the tokens AdamW needs to reach MuonClip's final loss (a ratio
   below 1).

Every run has its own directory under ``--out`` (a full ``k2 train`` run directory); finished runs
are skipped, so an interrupted study continues where it stopped. Writes ``summary.json``,
``optimizer_sweep.png`` and ``optimizer_curves.png`` into ``--out``; prints a header, the tables and
one final JSON line.

The loss curve's intermediate points are measured before the schedule's final decay, so a
run's tokens-to-a-loss read off them is pessimistic for the faster optimizer (a shorter run with
its own decay would get there sooner); read the ratio as a lower bound on the speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from study import (WHOLE_SPLIT, Finished, RunSpec, ensure_run, loss_or_inf, print_header, save_figure,
                   tokens_to_reach, write_json)

OPTIMIZERS = ("muonclip", "adamw")


@dataclass(frozen=True)
class Budget:
    """How much the study trains: run length, batch shape, the rates swept and the seeds."""

    steps: int
    seq_len: int
    batch_size: int
    warmup_steps: int
    eval_every: int
    eval_batches: int
    muon_lrs: tuple[float, ...]
    adamw_lrs: tuple[float, ...]
    seeds: tuple[int, ...]


BUDGETS = {
    # 10 runs of about 75 s on the project's 2-core CI machine (~13 minutes)
    "short": Budget(steps=200, seq_len=128, batch_size=8, warmup_steps=20, eval_every=25,
                    eval_batches=WHOLE_SPLIT, muon_lrs=(3e-3, 6e-3, 1.2e-2), adamw_lrs=(1.5e-3, 3e-3, 6e-3),
                    seeds=(0, 1, 2)),
    # the default `k2 train` run length and batch (about 5 minutes a run there)
    "full": Budget(steps=600, seq_len=256, batch_size=8, warmup_steps=30, eval_every=50,
                   eval_batches=WHOLE_SPLIT, muon_lrs=(3e-3, 6e-3, 1.2e-2), adamw_lrs=(1.5e-3, 3e-3, 6e-3),
                   seeds=(0, 1, 2)),
    # a few steps: the driver end to end, for tests
    "toy": Budget(steps=4, seq_len=64, batch_size=4, warmup_steps=1, eval_every=2, eval_batches=1,
                  muon_lrs=(6e-3, 1.2e-2), adamw_lrs=(3e-3,), seeds=(0, 1)),
}


def run_settings(budget: Budget, data_dir: str) -> dict:
    """The :class:`TrainConfig` settings every run of the study shares."""
    return {"preset": "tiny", "data_dir": data_dir, "steps": budget.steps, "seq_len": budget.seq_len,
            "batch_size": budget.batch_size, "warmup_steps": budget.warmup_steps,
            "eval_every": budget.eval_every, "eval_batches": budget.eval_batches, "log_every": 1,
            "save_every": max(budget.eval_every, budget.steps // 4), "keep_last": 1,
            "num_samples": 0}


def spec(optimizer: str, lr: float, seed: int, common: dict) -> RunSpec:
    """The run of ``optimizer`` at rate ``lr`` with ``seed``."""
    rates = {"lr": lr, "adamw_lr": lr / 2} if optimizer == "muonclip" else {"adamw_lr": lr}
    return RunSpec(f"{optimizer}-lr{lr:g}-s{seed}",
                   {**common, **rates, "optimizer": optimizer, "seed": seed})


def best_rate(by_lr: dict[float, dict[int, Finished]], seed: int) -> float:
    """The rate whose ``seed`` run ended with the lowest validation loss."""
    return min(by_lr, key=lambda lr: loss_or_inf(by_lr[lr][seed]))


def summarize(runs: dict[str, dict[float, dict[int, Finished]]], budget: Budget) -> dict:
    """The study's numbers: sweep, best rates, seeds, tokens and time to AdamW's final loss."""
    best = {opt: best_rate(by_lr, budget.seeds[0]) for opt, by_lr in runs.items()}
    summary: dict = {"budget": asdict(budget), "sweep": {}, "best": {}}
    for opt, by_lr in runs.items():
        summary["sweep"][opt] = {f"{lr:g}": by_lr[lr][budget.seeds[0]].final_val_loss for lr in sorted(by_lr)}
        finals = [by_lr[best[opt]][s].final_val_loss for s in budget.seeds]
        seconds = [by_lr[best[opt]][s].step_seconds for s in budget.seeds]
        summary["best"][opt] = {
            "lr": best[opt], "val_loss_by_seed": dict(zip(map(str, budget.seeds), finals)),
            "val_loss_mean": statistics.fmean(finals),
            "val_loss_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "step_seconds_median": statistics.median(seconds),
        }
    total_tokens = budget.steps * budget.seq_len * budget.batch_size
    for fast, slow in (("muonclip", "adamw"), ("adamw", "muonclip")):
        target = summary["best"][slow]["val_loss_mean"]
        reached = {s: tokens_to_reach(runs[fast][best[fast]][s], target) for s in budget.seeds}
        needed = (statistics.fmean(reached.values())
                  if math.isfinite(target) and None not in reached.values() else None)
        summary[f"to_{slow}_loss"] = {
            "target_val_loss": target, f"{slow}_tokens": total_tokens,
            f"{fast}_tokens_by_seed": {str(s): t for s, t in reached.items()},
            f"{fast}_tokens_mean": needed,
            f"{slow}_seconds": budget.steps * summary["best"][slow]["step_seconds_median"],
            f"{fast}_seconds": needed / (budget.seq_len * budget.batch_size)
            * summary["best"][fast]["step_seconds_median"] if needed is not None else None,
        }
    summary["efficiency"] = efficiency(summary)
    return summary


def efficiency(summary: dict) -> dict:
    """MuonClip's token and step-time efficiency against AdamW (above 1: MuonClip needs less).

    If MuonClip reaches AdamW's final loss: AdamW's tokens (time) over the tokens (time) MuonClip
    needed for it. Otherwise, if AdamW reaches MuonClip's final loss: the tokens (time) AdamW
    needed over MuonClip's (below 1). Otherwise None.
    """
    a, b = summary["to_adamw_loss"], summary["to_muonclip_loss"]
    if a["muonclip_tokens_mean"]:
        return {"token_ratio": a["adamw_tokens"] / a["muonclip_tokens_mean"],
                "time_ratio": a["adamw_seconds"] / a["muonclip_seconds"],
                "reading": "MuonClip reached AdamW's final loss"}
    if b["adamw_tokens_mean"]:
        return {"token_ratio": b["adamw_tokens_mean"] / b["muonclip_tokens"],
                "time_ratio": b["adamw_seconds"] / b["muonclip_seconds"],
                "reading": "MuonClip did not reach AdamW's final loss; AdamW reached MuonClip's"}
    return {"token_ratio": None, "time_ratio": None, "reading": "neither reached the other's final loss"}


def print_tables(summary: dict) -> None:
    print("\nsweep (first seed): final validation loss, nats/token")
    print(f"{'optimizer':<10}{'lr':>10}{'val loss':>11}")
    for opt, by_lr in summary["sweep"].items():
        for lr, loss in by_lr.items():
            mark = "  <- best" if float(lr) == summary["best"][opt]["lr"] else ""
            print(f"{opt:<10}{lr:>10}{loss:>11.4f}{mark}")
    print("\nbest rate, all seeds")
    print(f"{'optimizer':<10}{'lr':>10}{'mean':>9}{'std':>8}{'s/step':>9}  per seed")
    for opt, b in summary["best"].items():
        seeds = " ".join(f"{v:.4f}" for v in b["val_loss_by_seed"].values())
        print(f"{opt:<10}{b['lr']:>10g}{b['val_loss_mean']:>9.4f}{b['val_loss_std']:>8.4f}"
              f"{b['step_seconds_median']:>9.3f}  {seeds}")
    for fast, slow in (("muonclip", "adamw"), ("adamw", "muonclip")):
        t = summary[f"to_{slow}_loss"]
        print(f"\n{fast} to reach {slow}'s final loss {t['target_val_loss']:.4f} ({slow}: "
              f"{t[f'{slow}_tokens']:,} tokens, {t[f'{slow}_seconds']:.1f} s of steps): ", end="")
        if t[f"{fast}_tokens_mean"] is None:
            print("not reached on every seed")
        else:
            print(f"{t[f'{fast}_tokens_mean']:,.0f} tokens, {t[f'{fast}_seconds']:.1f} s")
    e = summary["efficiency"]
    if e["token_ratio"] is not None:
        print(f"MuonClip efficiency against AdamW: {e['token_ratio']:.2f}x in tokens, "
              f"{e['time_ratio']:.2f}x in step time ({e['reading']})")
    else:
        print(f"MuonClip efficiency against AdamW: not measurable ({e['reading']})")


def plot(runs: dict[str, dict[float, dict[int, Finished]]], summary: dict, out: Path) -> list[Path]:
    """``optimizer_sweep.png`` (loss against rate) and ``optimizer_curves.png`` (validation loss
    against tokens and against step time, best rate, every seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"muonclip": "tab:blue", "adamw": "tab:orange"}
    seed0 = summary["budget"]["seeds"][0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for opt, by_lr in runs.items():
        lrs = sorted(by_lr)
        ax.plot(lrs, [by_lr[lr][seed0].final_val_loss for lr in lrs], "o-", color=colors[opt], label=opt)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (MuonClip: Muon lr; AdamW: lr)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(f"learning-rate sweep, seed {seed0}")
    ax.legend()
    written = [save_figure(fig, out / "optimizer_sweep.png")]

    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for opt, by_lr in runs.items():
        best = summary["best"][opt]["lr"]
        for i, seed in enumerate(summary["budget"]["seeds"]):
            run = by_lr[best][seed]
            label = f"{opt} lr {best:g}" if i == 0 else None
            tokens = [s * run.tokens_per_step for s in run.eval_steps]
            seconds = [s * summary["best"][opt]["step_seconds_median"] for s in run.eval_steps]
            by_tokens.plot(tokens, run.eval_losses, "o-", ms=3, color=colors[opt], alpha=0.8, label=label)
            by_time.plot(seconds, run.eval_losses, "o-", ms=3, color=colors[opt], alpha=0.8, label=label)
    for ax, xlabel in ((by_tokens, "training tokens"),
                       (by_time, "step time (s): steps x the optimizer's median step time")):
        for opt in runs:
            ax.axhline(summary["best"][opt]["val_loss_mean"], ls="--", color=colors[opt], lw=0.8,
                       label=f"{opt} final (mean)")
        ax.set_xlabel(xlabel)
        ax.legend()
    by_tokens.set_ylabel("validation loss (nats/token)")
    fig.suptitle("validation loss, best rate of each optimizer, every seed")
    written.append(save_figure(fig, out / "optimizer_curves.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="short",
                        help="run length, batch, rates and seeds (default: short)")
    parser.add_argument("--toy", "--quick", action="store_true", help="the toy budget: a few steps, for tests")
    parser.add_argument("--out", default="runs/optimizer_compare", help="the study's directory")
    parser.add_argument("--data-dir", default="data", help="prepared tokens (prepared there when missing)")
    parser.add_argument("--steps", type=int, help="override the budget's steps")
    parser.add_argument("--seq-len", type=int, help="override the budget's sequence length")
    parser.add_argument("--batch-size", type=int, help="override the budget's batch size")
    parser.add_argument("--muon-lrs", type=float, nargs="+", help="override MuonClip's rates")
    parser.add_argument("--adamw-lrs", type=float, nargs="+", help="override AdamW's rates")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds (the first one sweeps)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints")
    args = parser.parse_args(argv)

    budget = BUDGETS["toy" if args.toy else args.budget]
    overrides = {"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size,
                 "muon_lrs": args.muon_lrs and tuple(args.muon_lrs),
                 "adamw_lrs": args.adamw_lrs and tuple(args.adamw_lrs), "seeds": args.seeds and tuple(args.seeds)}
    budget = replace(budget, **{k: v for k, v in overrides.items() if v})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = run_settings(budget, args.data_dir)
    print_header(f"optimizer_compare: MuonClip vs AdamW, tiny preset, {budget.steps} steps of "
                 f"{budget.batch_size} x {budget.seq_len} tokens")
    print(f"# budget: {json.dumps(asdict(budget))}; out: {out}", flush=True)

    def log(line: str) -> None:
        print(line, flush=True)

    rates = {"muonclip": budget.muon_lrs, "adamw": budget.adamw_lrs}
    runs: dict[str, dict[float, dict[int, Finished]]] = {opt: {} for opt in OPTIMIZERS}
    try:
        for opt in OPTIMIZERS:  # 1. the sweep, first seed
            for lr in rates[opt]:
                runs[opt][lr] = {budget.seeds[0]: ensure_run(spec(opt, lr, budget.seeds[0], common), out, log,
                                                             args.keep_checkpoints)}
        for opt in OPTIMIZERS:  # 2. the other seeds at the best rate
            best = best_rate(runs[opt], budget.seeds[0])
            for seed in budget.seeds[1:]:
                runs[opt][best][seed] = ensure_run(spec(opt, best, seed, common), out, log, args.keep_checkpoints)
    except KeyboardInterrupt as err:
        print(f"interrupted ({err}); run the same command again to continue", file=sys.stderr)
        return 130

    summary = summarize(runs, budget)
    write_json(out / "summary.json", summary)
    print_tables(summary)
    plots = plot(runs, summary, out)
    print(f"\nwrote {out / 'summary.json'}, " + ", ".join(str(p) for p in plots))
    print(json.dumps({"benchmark": "optimizer_compare",
                      "muonclip_val_loss": summary["best"]["muonclip"]["val_loss_mean"],
                      "adamw_val_loss": summary["best"]["adamw"]["val_loss_mean"],
                      "token_ratio": summary["efficiency"]["token_ratio"],
                      "time_ratio": summary["efficiency"]["time_ratio"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
