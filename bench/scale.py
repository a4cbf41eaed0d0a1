"""Bytes per rank and step time as ranks are added, against ``k2 plan`` (issue 23), on the CPU.

For N = 1, 2, 4 (``--ranks``) the driver starts ``torchrun --standalone --nproc_per_node N`` of
this file in worker mode (gloo, one torch thread per rank) for each layout:

* ``fsdp``: ``--dp-shard N`` — FSDP2 over every decoder layer, the embeddings and the root
  (:func:`k2.parallel.fsdp.shard_model`), :class:`k2.optim.distributed.DistributedMuonClip`;
* ``ep``: ``--ep N`` — the routed experts split N ways, the rest replicated under DDP
  (:func:`k2.parallel.expert.parallelize_experts`), MuonClip, global-norm clipping.

N = 1 is one process with the whole model and MuonClip (what both layouts reduce to). Each rank
takes the same training steps ``k2 train`` takes (forward with the fused loss, backward, gradient
clipping, the optimizer step) on random tokens, its share of a fixed global batch
(``--batch`` sequences of ``--seq-len`` tokens). After the first step, with the gradients still
held, it counts the parameter, gradient and optimizer-state bytes it holds
(:func:`k2.parallel.fsdp.bytes_per_rank`: local shards only) and the routed experts' share of
them; step time is the median of the later steps (``--steps`` in all), each between barriers,
and beside it the CPU seconds of the busiest rank's step (``time.process_time``: its own work,
which a machine busy with other jobs disturbs less than the wall clock).

Prediction: :func:`k2.parallel.plan.predicted_bytes_per_rank` for the same configuration in fp32
(``fsdp``: ``dp_shard = N``; ``ep``: ``ep = N`` with the dense parameters replicated over the ep
ranks, as k2 runs it). Printed per layout and N: measured bytes (the largest rank), measured /
predicted, and the 1/N check — N × bytes(N) / bytes(1): 1.0 when the state falls as 1/N (under
``ep`` only the routed experts are split, so the check is on their bytes, and the total is
compared with "dense + experts / N"). Goal: within 10 % each. Writes ``--out`` (JSON).

Run:  python bench/scale.py                       (tiny preset, N = 1 2 4, both layouts)
      python bench/scale.py --preset small --ranks 1 2
      python bench/scale.py --quick               (N = 1 2, 2 steps, short sequences)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LAYOUTS = ("fsdp", "ep")
KINDS = ("parameters", "gradients", "optimizer")
PLAN_KEYS = {"parameters": "parameters", "gradients": "gradients", "optimizer": "optimizer_states"}


# ---------------------------------------------------------------------------- one rank
def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration (under torchrun): build, step, count, time; write JSON."""
    import torch
    import torch.distributed as dist

    from k2.model import K2Config, K2ForCausalLM
    from k2.parallel.expert import expert_parameters
    from k2.parallel.fsdp import bytes_per_rank
    from k2.train.config import TrainConfig
    from k2.train.optimizers import build_optimizer

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    config = K2Config.from_preset(args.preset)
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = K2ForCausalLM(config)
    group = None
    wrapped: torch.nn.Module = model
    if world > 1 and args.layout == "fsdp":
        from k2.parallel.fsdp import shard_model
        from k2.parallel.mesh import build_mesh

        mesh = build_mesh({"dp_shard": world}, world, torch.device("cpu"))
        shard_model(model, mesh, mixed_precision=False)
    elif world > 1 and args.layout == "ep":
        from k2.parallel.expert import expert_group, parallelize_experts

        group = expert_group(world)
        wrapped = parallelize_experts(model, group)
    optimizer = build_optimizer(TrainConfig(), wrapped)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not divide over {world} ranks")
    per_rank = args.batch // world
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    def step() -> None:
        ids = torch.randint(0, config.vocab_size, (per_rank, args.seq_len + 1), generator=generator)
        loss = wrapped(input_ids=ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        if group is not None:  # expert parallelism: the global norm counts every rank's experts
            from k2.parallel.expert import clip_grad_norm_

            clip_grad_norm_(model, 1.0, group)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if hasattr(norm, "full_tensor"):
                norm.full_tensor()
        optimizer.step()

    times, cpu = [], []
    held: dict[str, int] = {}
    experts: dict[str, int] = {}
    for index in range(args.steps):
        barrier()
        started, cpu_started = time.perf_counter(), time.process_time()
        step()
        if index == 0:  # after a real step, gradients still held
            held = bytes_per_rank(model, optimizer)
            ids = expert_parameters(model)
            routed = [p for p in model.parameters() if id(p) in ids]
            if not routed:  # not sharded by ep: find the expert stacks by name
                routed = [p for n, p in model.named_parameters() if ".mlp.experts." in n]
            experts = _expert_bytes(routed, optimizer)
        optimizer.zero_grad(set_to_none=True)
        cpu.append(time.process_time() - cpu_started)  # this rank's own work (and gloo's)
        barrier()
        times.append(time.perf_counter() - started)
    out = {"rank": rank, "world": world, "layout": args.layout, "bytes": held, "expert_bytes": experts,
           "step_s": times, "cpu_s": cpu, "parameters": sum(p.numel() for p in model.parameters())}
    Path(args.worker_out, f"rank{rank}.json").write_text(json.dumps(out))
    if world > 1:
        dist.destroy_process_group()


def _expert_bytes(params: list, optimizer) -> dict[str, int]:  # noqa: ANN001
    """The routed experts' parameter, gradient and optimizer-state bytes on this rank."""
    from k2.parallel.fsdp import local

    def nbytes(t) -> int:  # noqa: ANN001
        if t is None:
            return 0
        t = local(t)
        return t.numel() * t.element_size()

    state = sum(nbytes(v) for p in params for v in optimizer.state.get(p, {}).values()
                if hasattr(v, "numel"))
    return {"parameters": sum(nbytes(p) for p in params), "gradients": sum(nbytes(p.grad) for p in params),
            "optimizer": state}


# ---------------------------------------------------------------------------- the driver
def launch(args: argparse.Namespace, layout: str, n: int, out: Path) -> list[dict[str, Any]]:
    """Run one configuration under torchrun; every rank's record."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(Path(__file__).resolve()), "--worker", "--layout", layout, "--worker-out", str(out),
           "--preset", args.preset, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--steps", str(args.steps), "--seed", str(args.seed), "--layers", str(args.layers)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{layout} N={n} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def summarize(args: argparse.Namespace, config, runs: dict[tuple[str, int], list[dict]]) -> list[dict]:  # noqa: ANN001
    """One row per (layout, N): measured bytes (largest rank), the plan's, the ratios, step time."""
    from k2.parallel.plan import predicted_bytes_per_rank

    rows = []
    for (layout, n), ranks in runs.items():
        measured = {k: max(r["bytes"][k] for r in ranks) for k in KINDS}
        experts = {k: max(r["expert_bytes"][k] for r in ranks) for k in KINDS}
        if layout == "ep":
            plan = predicted_bytes_per_rank(config, n, ep=n, dense_shard_over_ep=False)
        else:
            plan = predicted_bytes_per_rank(config, n)
        predicted = {k: plan[PLAN_KEYS[k]] for k in KINDS}
        base_ranks = runs.get((layout, 1)) or runs[(LAYOUTS[0], 1)]
        base = {k: max(r["bytes"][k] for r in base_ranks) for k in KINDS}
        base_experts = {k: max(r["expert_bytes"][k] for r in base_ranks) for k in KINDS}
        total = sum(measured.values())
        steps = [statistics.median(r["step_s"][1:] or r["step_s"]) for r in ranks]
        cpus = [statistics.median(r["cpu_s"][1:] or r["cpu_s"]) for r in ranks if r.get("cpu_s")]
        row: dict[str, Any] = {
            "layout": layout, "ranks": n, "measured": measured, "predicted": predicted,
            "measured_total": total, "predicted_total": sum(predicted.values()),
            "plan_ratio": {k: round(measured[k] / predicted[k], 4) if predicted[k] else None for k in KINDS},
            "plan_ratio_total": round(total / sum(predicted.values()), 4),
            "expert_bytes": experts, "step_s": round(max(steps), 4),
            "step_s_per_rank": [round(s, 4) for s in steps],
            "cpu_s": round(max(cpus), 4) if cpus else None,
        }
        if layout == "fsdp":
            row["one_over_n"] = round(n * total / sum(base.values()), 4)  # 1.0 when bytes fall as 1/N
        else:
            row["one_over_n"] = round(n * sum(experts.values()) / sum(base_experts.values()), 4)
            dense = sum(base.values()) - sum(base_experts.values())
            row["dense_plus_experts_over_n"] = round(total / (dense + sum(base_experts.values()) / n), 4)
        rows.append(row)
    return rows


def within(value: float, goal: float = 1.0, tol: float = 0.1) -> bool:
    return abs(value - goal) <= tol * goal


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    parser.add_argument("--layers", type=int, default=0, help="override the preset's layer count (0: keep)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="N values (default 1 2 4)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--batch", type=int, default=4, help="global batch in sequences (default 4)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration (the first untimed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("scale.json"), help="the JSON written (default scale.json)")
    parser.add_argument("--quick", action="store_true", help="N = 1 2, at most 2 steps, 2 layers, 16-token sequences")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=LAYOUTS, default="fsdp", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.quick:
        args.ranks, args.steps, args.layers, args.seq_len = [1, 2], min(args.steps, 2), 2, 16
    if 1 not in args.ranks:
        args.ranks = [1, *args.ranks]  # the 1/N check divides by the one-process bytes

    from k2.model import K2Config

    config = K2Config.from_preset(args.preset)
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    load = [os.getloadavg()[0]]
    print(f"# scale: {args.preset}{f' ({args.layers} layers)' if args.layers else ''}, global batch "
          f"{args.batch} x {args.seq_len} tokens, fp32, gloo on the CPU, 1 torch thread per rank, "
          f"{args.steps} steps per configuration (first untimed)")
    print(f"# machine: {platform.machine()} cpus={os.cpu_count()}; load average {load[0]:.1f}")
    runs: dict[tuple[str, int], list[dict]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(set(args.ranks)):
            for layout in args.layouts:
                if n == 1 and runs.get((LAYOUTS[0], 1)):
                    runs[(layout, 1)] = runs[(LAYOUTS[0], 1)]  # one process: the same run
                    continue
                runs[(layout, n)] = launch(args, layout, n, Path(tmp, f"{layout}{n}"))
                load.append(os.getloadavg()[0])
    rows = summarize(args, config, runs)
    mib = 1 << 20
    print(f"\n{'layout':<6} {'N':>2} {'params MiB':>11} {'grads MiB':>10} {'optim MiB':>10} {'total MiB':>10} "
          f"{'meas/plan':>10} {'N x / 1':>8} {'step s':>8} {'cpu s':>7}")
    for row in rows:
        m = row["measured"]
        print(f"{row['layout']:<6} {row['ranks']:>2} {m['parameters'] / mib:>11.2f} {m['gradients'] / mib:>10.2f} "
              f"{m['optimizer'] / mib:>10.2f} {row['measured_total'] / mib:>10.2f} {row['plan_ratio_total']:>10.4f} "
              f"{row['one_over_n']:>8.4f} {row['step_s']:>8.3f} {row['cpu_s'] or float('nan'):>7.3f}")
    ok_plan = all(within(r["plan_ratio_total"]) and all(within(v) for v in r["plan_ratio"].values() if v)
                  for r in rows)
    ok_scale = all(within(r["one_over_n"]) for r in rows)
    print(f"(ep: 'N x / 1' is the routed experts' bytes; dense + experts/N against the measured total: "
          f"{', '.join(str(r['dense_plus_experts_over_n']) for r in rows if r['layout'] == 'ep' and r['ranks'] > 1)})")
    print(f"plan within 10 % of measured: {'yes' if ok_plan else 'NO'}; bytes fall as 1/N within 10 %: "
          f"{'yes' if ok_scale else 'NO'}")
    result = {"bench": "scale", "preset": args.preset, "layers": config.num_hidden_layers, "batch": args.batch,
              "seq_len": args.seq_len, "steps": args.steps, "quick": args.quick, "cpus": os.cpu_count(),
              "load_average": [round(x, 2) for x in load], "wall_s": round(time.perf_counter() - started, 1),
              "plan_within_10pct": ok_plan, "one_over_n_within_10pct": ok_scale, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return result


if __name__ == "__main__":
    main()
