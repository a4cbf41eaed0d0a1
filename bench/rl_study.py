"""Does ``k2 rl`` learn? Held-out accuracy before and after RL from a warm-started policy, over
seeds, for the K2 objective and GRPO, against continued supervised training for the same time.

Every arm starts from the same warm-start run (``--init``: a ``k2 rl --warm-start-steps N
--steps 0`` run, or any k2 run) and is one ``k2 rl`` run in its own directory under ``--out``:

* ``k2-sS`` / ``grpo-sS``: ``--steps`` RL steps with that objective and seed;
* ``sft-sS``: the continued-SFT baseline, ``--sft-steps`` more supervised steps on the task's gold
  answers (``--warm-start-steps M --steps 0``). Pick M so that it trains about as long as an RL
  arm (``--sft-steps 0``: M is the RL arms' mean training seconds — rollouts and updates, not
  start-up or evaluation — over the baseline's step time measured by a short probe). The baseline
  is evaluated as often as an RL arm (its ``--eval-every`` scaled to its steps), so evaluations
  cost both the same, which matters when they are whole agentic episodes;

Runs are subprocesses (``python -m k2 rl ...``), ``--jobs`` at a time with ``--threads`` torch
threads each; a finished run (its ``result.json``) is reused, so an interrupted study resumes.
Output: a table of held-out greedy accuracy (first and last evaluation, the gain, mean ± std over
seeds) and wall times, ``rl_study.json`` and ``rl_study.png`` (accuracy against wall-clock time,
one line per run) in ``--out``.

Example (docs/results.md, "RL on arithmetic")::

    python bench/rl_study.py --init runs/ws --task arithmetic --task-level 2 --out runs/rl_study \\
        --steps 150 --seeds 0 1 2 --jobs 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from study import print_header, save_figure, write_json

RESULT = "result.json"


@dataclass
class Arm:
    """One run of the study: its name, its extra ``k2 rl`` flags and (once run) its curve."""

    name: str
    kind: str
    seed: int
    flags: list[str]
    evals: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    step_wall: dict[int, float] = field(default_factory=dict)  # optimizer step -> seconds into the run


def read_records(run_dir: Path) -> list[dict]:
    """Every record of a run's ``metrics.jsonl`` (none if it has not started)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def read_evals(run_dir: Path) -> list[dict]:
    """The ``eval`` records of a run's ``metrics.jsonl`` (step, accuracy, reward, wall_s)."""
    return [r for r in read_records(run_dir) if r.get("kind") == "eval" and "accuracy" in r]


def run_arm(arm: Arm, common: list[str], out: Path, threads: int, log) -> Arm:  # noqa: ANN001
    """Run one arm (or reuse its finished result) and read its curve back."""
    run_dir = out / arm.name
    done = run_dir / RESULT
    if not done.exists():
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)  # a run cut short restarts: its timing must be whole
        cmd = [sys.executable, "-m", "k2", "rl", *common, *arm.flags, "--seed", str(arm.seed),
               "--run-dir", str(run_dir), "--no-progress"]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        log(f"start {arm.name}: {' '.join(cmd[2:])}")
        t0 = time.perf_counter()
        with open(out / f"{arm.name}.log", "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{arm.name} failed (exit {proc.returncode}); see {out / (arm.name + '.log')}")
        write_json(done, {"wall_s": wall})
        log(f"done  {arm.name} in {wall:.0f} s")
    arm.wall_s = json.loads(done.read_text())["wall_s"]
    arm.evals = read_evals(run_dir)
    arm.step_wall = {r["step"]: r["wall_s"] for r in read_records(run_dir)
                     if r.get("kind") == "train" and "wall_s" in r}
    return arm


def training_seconds(run_dir: Path) -> float:
    """An RL run's seconds of rollouts, weight syncs and updates (its wall time without start-up
    and evaluations)."""
    return sum(r.get("rollout_s", 0.0) + r.get("train_s", 0.0) + r.get("weight_sync_s", 0.0)
               for r in read_records(run_dir) if r.get("kind") == "train")


def summary(arms: list[Arm]) -> dict[str, dict]:
    """Per kind: first/last accuracy and the gain, mean and std over seeds, and wall time."""
    table: dict[str, dict] = {}
    for kind in dict.fromkeys(a.kind for a in arms):
        group = [a for a in arms if a.kind == kind and a.evals]
        first = [a.evals[0]["accuracy"] for a in group]
        last = [a.evals[-1]["accuracy"] for a in group]
        gain = [b - a for a, b in zip(first, last)]

        def ms(xs: list[float]) -> tuple[float, float]:
            return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)

        table[kind] = {
            "seeds": [a.seed for a in group],
            "first": ms(first), "last": ms(last), "gain": ms(gain),
            "best": ms([max(e["accuracy"] for e in a.evals) for a in group]),
            "wall_s": ms([a.wall_s for a in group]),
            "per_seed": {a.seed: {"first": f, "last": l, "wall_s": a.wall_s}
                         for a, f, l in zip(group, first, last)},
        }
    return table


def plot(arms: list[Arm], path: Path, title: str) -> None:
    """Held-out accuracy against wall-clock seconds, one line per run, one colour per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"k2": "tab:blue", "grpo": "tab:orange", "sft": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    seen = set()
    for arm in arms:
        if not arm.evals:
            continue
        # Evaluation records carry no clock: place each at its step's train record (step 0: 0).
        xs = [arm.step_wall.get(e["step"], 0.0) / 60 for e in arm.evals]
        ys = [100 * e["accuracy"] for e in arm.evals]
        label = {"k2": "RL, K2 objective", "grpo": "RL, GRPO", "sft": "continued SFT"}[arm.kind]
        ax.plot(xs, ys, color=colours[arm.kind], alpha=0.8, marker=".",
                label=None if arm.kind in seen else label)
        seen.add(arm.kind)
    ax.set_xlabel("minutes into the run (evaluations included)")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, help="the warm-started policy (a k2 run or checkpoint)")
    parser.add_argument("--out", required=True, type=Path, help="the study's directory")
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--task-level", type=int, default=0)
    parser.add_argument("--steps", type=int, default=150, help="RL steps per RL arm")
    parser.add_argument("--sft-steps", type=int, default=0,
                        help="supervised steps of the baseline (0: match the first RL arm's wall time)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=["k2", "grpo"], choices=["k2", "grpo"])
    parser.add_argument("--no-sft", action="store_true", help="skip the continued-SFT baseline")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: cpus / jobs)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--rl-args", default="", help="more k2 rl flags for the RL arms, one string")
    parser.add_argument("--sft-args", default="", help="more k2 rl flags for the SFT arm, one string")
    args = parser.parse_args(argv)

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)  # what the header reports; the runs get OMP_NUM_THREADS
    args.out.mkdir(parents=True, exist_ok=True)
    print_header(f"rl_study: {args.task} level {args.task_level} from {args.init}, {args.steps} RL steps, "
                 f"seeds {args.seeds}, {args.jobs} run(s) at a time x {threads} thread(s)")
    common = ["--init", args.init, "--task", args.task, "--task-level", str(args.task_level),
              "--eval-every", str(args.eval_every), "--eval-prompts", str(args.eval_prompts),
              "--save-every", "100000"]

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    rl_arms = [Arm(f"{obj}-s{seed}", obj, seed,
                   ["--objective", obj, "--steps", str(args.steps), *args.rl_args.split()])
               for seed in args.seeds for obj in args.objectives]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda a: run_arm(a, common, args.out, threads, log), rl_arms))
    arms = list(done)
    if not args.no_sft:
        sft_steps = args.sft_steps
        if sft_steps == 0:
            # Calibrate: a short probe of supervised steps gives the step time.
            probe = run_arm(Arm("sft-probe", "sft", args.seeds[0],
                                ["--warm-start-steps", "20", "--steps", "0", "--eval-every", "100000",
                                 "--eval-prompts", "1", *args.sft_args.split()]),
                            common, args.out, threads, log)
            walls = [r["wall_s"] for r in read_records(args.out / "sft-probe") if r.get("kind") == "train"]
            per_step = (walls[-1] - walls[0]) / max(len(walls) - 1, 1)
            target = statistics.fmean(training_seconds(args.out / a.name) for a in done)
            sft_steps = max(1, round(target / per_step))
            log(f"continued SFT: {sft_steps} steps to match the RL arms' mean {target:.0f} s of rollouts and "
                f"updates ({per_step:.2f} s a step)")
        sft_every = max(1, round(sft_steps * args.eval_every / args.steps))  # as many evaluations as RL
        sft_arms = [Arm(f"sft-s{seed}", "sft", seed,
                        ["--warm-start-steps", str(sft_steps), "--steps", "0", *args.sft_args.split(),
                         "--eval-every", str(sft_every)])
                    for seed in args.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            arms += list(pool.map(lambda a: run_arm(a, common, args.out, threads, log), sft_arms))

    table = summary(arms)
    print(f"\n| arm | seeds | accuracy before | accuracy after | gain (points) | best | wall time |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, row in table.items():
        f, l, g, b, w = row["first"], row["last"], row["gain"], row["best"], row["wall_s"]
        print(f"| {kind} | {len(row['seeds'])} | {100 * f[0]:.1f} ± {100 * f[1]:.1f} % | "
              f"{100 * l[0]:.1f} ± {100 * l[1]:.1f} % | {100 * g[0]:+.1f} ± {100 * g[1]:.1f} | "
              f"{100 * b[0]:.1f} ± {100 * b[1]:.1f} % | {w[0] / 60:.1f} ± {w[1] / 60:.1f} min |")
    write_json(args.out / "rl_study.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                            "threads": threads, "table": table,
                                            "curves": {a.name: a.evals for a in arms}})
    plot(arms, args.out / "rl_study.png",
         f"{args.task} level {args.task_level}: held-out accuracy, {len(args.seeds)} seeds")
    print(f"\nwrote {args.out / 'rl_study.json'} and {args.out / 'rl_study.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
