"""Synthesis throughput: trajectories per second of ``k2 synth`` in one process (docs/synthesis.md).

Runs the whole pipeline — drawing a task from a template, drawing an agent's tool variants,
playing the expert against the programmatic user and the stochastic domain through AgentEnv,
grading, the rubric and rendering for the length check — for ``--n`` kept trajectories with the
default options, in this process, and writes the output folder (JSONL, tasks, variants, card) to a
temporary directory, so the cost of writing counts too. The variant pool (2,760 specs) is built
once before the clock starts and reported separately.

Run:  python bench/synth.py            (2,000 trajectories)
      python bench/synth.py --quick    (200: a smoke test)

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

from k2.agentic.synth.output import synthesize
from k2.agentic.synth.pipeline import Synthesizer, SynthOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="kept trajectories (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="200 trajectories")
    args = parser.parse_args()
    n = 200 if args.quick else args.n
    options = SynthOptions(n=n, seed=args.seed)
    start = time.perf_counter()
    synth = Synthesizer(options)
    setup = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        cpu = time.process_time()
        card = synthesize(options, out, synthesizer=synth)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
    result = {
        "bench": "synth",
        "kept": card["kept"],
        "attempted": card["attempted"],
        "kept_share": card["kept_share"],
        "trajectories_per_s": round(card["kept"] / wall, 1),
        "episodes_per_s": round(card["attempted"] / wall, 1),
        "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
        "setup_s": round(setup, 2),
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}",
    }
    print(f"{'kept trajectories':<28}{card['kept']:>10}")
    print(f"{'episodes attempted':<28}{card['attempted']:>10}")
    print(f"{'kept trajectories/s':<28}{result['trajectories_per_s']:>10}")
    print(f"{'episodes/s':<28}{result['episodes_per_s']:>10}")
    print(f"{'wall s (cpu s)':<28}{wall:>10.2f} ({cpu:.2f})")
    print(f"{'variant pool setup s':<28}{setup:>10.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
