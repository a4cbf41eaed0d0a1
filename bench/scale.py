"""Bytes per rank, tokens/s and communication time as ranks are added, against ``k2 plan``
(issue 23), on the CPU.

For N = 1, 2, 4 (``--ranks``) the driver starts ``torchrun --standalone --nproc_per_node N`` of
this file in worker mode (gloo, one torch thread per rank) for each layout, built the way
``k2 train`` builds it (``k2.train.pretrain.PretrainJob``), with the optimizer ``k2 train`` would
pick (:func:`k2.train.optimizers.build_optimizer`: ``DistributedMuonClip`` when the parameters
are sharded, else MuonClip) and its gradient clipping:

* ``ddp``: ``k2 train`` on N ranks with no mesh option — every rank holds the whole model,
  ``DistributedDataParallel`` averages the gradients (:func:`k2.parallel.parallelize`), MuonClip,
  torch's clipping;
* ``fsdp``: ``--dp-shard N`` — FSDP2 over every decoder layer, the embeddings and the root
  (:func:`k2.parallel.fsdp.shard_model`), ``DistributedMuonClip``;
* ``ep``: ``--ep N`` — the routed experts split N ways, the rest replicated under DDP
  (:func:`k2.parallel.expert.parallelize_experts`), MuonClip, global-norm clipping;
* ``fsdp_ep``: ``--dp-shard D --ep E`` with ``E = --fsdp-ep-size`` (default 2) and ``D = N / E``
  — the 2-D mesh ``("dp_shard", "ep")`` of :func:`k2.parallel.fsdp_ep.parallelize`: experts split
  over ``ep`` and FSDP2-sharded over ``dp_shard``, everything else FSDP2-sharded over all N
  ranks, ``DistributedMuonClip``, :func:`k2.parallel.fsdp_ep.clip_grad_norm_`. N = 4 is 2 × 2.
  N = 2 is 1 × 2: ``k2 train --dp-shard 1 --ep 2`` would run the ``ep`` layout instead (and
  :func:`k2.parallel.mesh.build_mesh` drops dimensions of size 1), so the bench builds the
  1 × 2 mesh itself with ``init_device_mesh``; ``fsdp_ep.parallelize`` takes it — experts split
  in two, the dense parameters sharded over both ranks, so every rank holds half of everything.

N = 1 is one process with the whole model and MuonClip (what every layout reduces to), run once
and shared by the layouts. Each rank takes the same training steps ``k2 train`` takes (forward
with the fused loss, backward, gradient clipping, the optimizer step) on random tokens, its share
of a fixed global batch (``--batch`` sequences of ``--seq-len`` tokens).

Bytes: after the first step, with the gradients still held, each rank counts the parameter,
gradient and optimizer-state bytes it holds (:func:`k2.parallel.fsdp.bytes_per_rank`: local
shards only; DDP's gradient buckets, a further gradient-sized buffer under ``ddp`` and ``ep``,
are inside the reducer and not counted) and the routed experts' share of them.

Time: ``--steps`` steps in all, each between barriers; the step time is the median of the later
ones (the first is untimed), the slowest rank's; tokens/s is the global tokens of one step
(batch × seq-len) over that time, and "x 1 proc" its ratio to the one-process run of the same
invocation. Beside it the CPU seconds of the busiest rank's step (``time.process_time``: the
process's own work, gloo's threads included, which a machine busy with other jobs disturbs less
than the wall clock).

Communication, reported separately: ``--profile-steps`` more steps (default 2) run under
``torch.profiler.profile(activities=[CPU])``. ProcessGroupGloo records every collective as one
event named ``gloo:<collective>`` spanning its life on that rank, from the call that enqueues it
to its completion on a gloo thread (what appears: ``ddp`` gloo:all_reduce, gloo:broadcast — DDP's
buffer broadcast each forward; ``fsdp`` gloo:all_gather, gloo:all_reduce — FSDP2's reduce-scatter
included, gloo:all_to_all — the optimizer's; ``ep`` gloo:all_reduce, gloo:all_to_all,
gloo:broadcast; ``fsdp_ep`` gloo:all_gather, gloo:all_reduce, gloo:all_to_all). The
communication time of a step is the length of the union of those spans: wall time during which
at least one collective was in flight. It counts waiting for a slower rank and overlaps compute
where the layout overlaps them (DDP's bucketed all-reduce during backward, FSDP2's prefetch);
the ``c10d::*`` events that enqueue the same collectives on the main thread are left out (they
would count them twice). Per rank the median over the profiled steps; reported: the busiest
rank's seconds and its fraction of its profiled step. The profiler slows a step (it records
every operator); the step time and tokens/s come from the unprofiled steps, and the profiled /
unprofiled step ratio is kept in the JSON (``profiler_overhead``).

Prediction: :func:`k2.parallel.plan.make_plan`'s memory for the same configuration in fp32
(``ddp``: sharding ``ddp`` — replicated, what ``k2 plan --sharding ddp`` prints; ``fsdp``:
``dp_shard = N``; ``ep``: ``ep = N`` with the dense parameters replicated over the ep ranks, as
k2 runs it; ``fsdp_ep``: ``dp_shard = D``, ``ep = E``, dense parameters sharded over all
``D × E`` ranks — :func:`~k2.parallel.plan.predicted_bytes_per_rank`'s default). Printed per
layout and N: measured bytes (the largest rank), measured / predicted, and N × bytes(N) /
bytes(1): 1.0 when the state falls as 1/N (``fsdp`` and ``fsdp_ep``: the total; ``ep``: only the
routed experts are split, so the check is on their bytes, and the total is compared with
"dense + experts / N"); under ``ddp`` every rank holds the one-process bytes, so it is N, and the
check is that bytes(N) = bytes(1). Goal: within 10 % each. Writes ``--out`` (JSON).

Run:  python bench/scale.py                       (tiny preset, N = 1 2 4, all four layouts)
      python bench/scale.py --preset small --ranks 1 2 --layouts fsdp fsdp_ep
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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

LAYOUTS = ("ddp", "fsdp", "ep", "fsdp_ep")
SHARDED = ("fsdp", "fsdp_ep")  # layouts whose whole state falls as 1/N
KINDS = ("parameters", "gradients", "optimizer")
PLAN_KEYS = {"parameters": "parameters", "gradients": "gradients", "optimizer": "optimizer_states"}
COMM_PREFIX = "gloo:"  # ProcessGroupGloo's event for each collective, enqueue to completion


def fsdp_ep_shape(n: int, ep: int) -> tuple[int, int]:
    """(dp_shard, ep) of the ``fsdp_ep`` layout on ``n`` ranks."""
    if n % ep:
        raise SystemExit(f"fsdp_ep: --fsdp-ep-size {ep} does not divide {n} ranks")
    return n // ep, ep


def mesh_name(layout: str, n: int, ep: int) -> str:
    """The layout's mesh in words, as the table prints it."""
    if n == 1:
        return "1 process"
    if layout == "fsdp_ep":
        d, e = fsdp_ep_shape(n, ep)
        return f"dp_shard {d} x ep {e}"
    return {"ddp": f"ddp {n}", "fsdp": f"dp_shard {n}", "ep": f"ep {n}"}[layout]


# ---------------------------------------------------------------------------- one rank
def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration (under torchrun): build, step, count, time; write JSON."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

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
    wrapped: torch.nn.Module = model

    def clip() -> None:  # one process, DDP: torch's clipping; FSDP2: its norm is a DTensor
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if hasattr(norm, "full_tensor"):
            norm.full_tensor()

    if world > 1 and args.layout == "ddp":
        from k2.parallel import parallelize

        wrapped = parallelize(model, world)
    elif world > 1 and args.layout == "fsdp":
        from k2.parallel.fsdp import shard_model
        from k2.parallel.mesh import build_mesh

        mesh = build_mesh({"dp_shard": world}, world, torch.device("cpu"))
        shard_model(model, mesh, mixed_precision=False)
    elif world > 1 and args.layout == "ep":
        from k2.parallel.expert import clip_grad_norm_, expert_group, parallelize_experts

        group = expert_group(world)
        wrapped = parallelize_experts(model, group)

        def clip() -> None:  # the global norm counts every rank's experts
            clip_grad_norm_(model, 1.0, group)
    elif world > 1 and args.layout == "fsdp_ep":
        from torch.distributed.device_mesh import init_device_mesh

        from k2.parallel import fsdp_ep
        from k2.parallel.mesh import build_mesh

        d, e = fsdp_ep_shape(world, args.fsdp_ep_size)
        if d > 1 and e > 1:  # what k2 train --dp-shard D --ep E builds
            mesh = build_mesh({"dp_shard": d, "ep": e}, world, torch.device("cpu"))
        else:  # build_mesh would drop the dimension of size 1: keep both
            mesh = init_device_mesh("cpu", (d, e), mesh_dim_names=fsdp_ep.DIMS)
        fsdp_ep.parallelize(model, mesh, mixed_precision=False)

        def clip() -> None:  # every rank's local squares, each shard once
            fsdp_ep.clip_grad_norm_(model, 1.0)
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
        clip()
        optimizer.step()

    times, cpu, profiled, comm = [], [], [], []
    ops: dict[str, int] = {}
    held: dict[str, int] = {}
    experts: dict[str, int] = {}
    for index in range(args.steps + args.profile_steps):
        timed = index < args.steps
        barrier()
        # the profiler only around the step: the barriers are the bench's, not the layout's
        with (nullcontext() if timed else profile(activities=[ProfilerActivity.CPU])) as prof:
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
            spent, cpu_spent = time.perf_counter() - started, time.process_time() - cpu_started
        if timed:
            cpu.append(cpu_spent)  # this rank's own work (and gloo's)
            barrier()
            times.append(time.perf_counter() - started)
        else:
            profiled.append(spent)
            comm.append(_comm_seconds(prof.events(), ops))
    out = {"rank": rank, "world": world, "layout": args.layout, "bytes": held, "expert_bytes": experts,
           "step_s": times, "cpu_s": cpu, "profiled_step_s": profiled, "comm_s": comm, "comm_ops": ops,
           "optimizer": type(optimizer).__name__, "parameters": sum(p.numel() for p in model.parameters())}
    Path(args.worker_out, f"rank{rank}.json").write_text(json.dumps(out))
    if world > 1:
        dist.destroy_process_group()


def _comm_seconds(events, ops: dict[str, int]) -> float:  # noqa: ANN001
    """Seconds during which at least one collective was in flight: the union of the spans of the
    profiler's ``gloo:*`` events (counted by name into ``ops``)."""
    spans = []
    for event in events:
        if event.name.startswith(COMM_PREFIX):
            ops[event.name] = ops.get(event.name, 0) + 1
            spans.append((event.time_range.start, event.time_range.end))
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):  # microseconds
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e6


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
           "--steps", str(args.steps), "--profile-steps", str(args.profile_steps), "--seed", str(args.seed),
           "--layers", str(args.layers), "--fsdp-ep-size", str(args.fsdp_ep_size)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{layout} N={n} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def plan_bytes(config, layout: str, n: int, fsdp_ep_size: int) -> dict[str, int]:  # noqa: ANN001
    """What the plan says one rank of ``layout`` on ``n`` ranks holds, fp32 (bytes by kind)."""
    from k2.parallel.plan import Layout, Settings, make_plan

    if layout == "ddp":
        plan_layout = Layout.resolve(n, sharding="ddp")
    elif layout == "ep":  # the dense parameters replicated (DDP) over the ep ranks
        plan_layout = Layout.resolve(n, ep=n, dense_shard_over_ep=False)
    elif layout == "fsdp_ep":  # the dense parameters sharded over all dp_shard x ep ranks
        d, e = fsdp_ep_shape(n, fsdp_ep_size) if n > 1 else (1, 1)
        plan_layout = Layout.resolve(n, dp_shard=d, ep=e, dense_shard_over_ep=True)
    else:
        plan_layout = Layout.resolve(n)
    settings = Settings(seq_len=1, param_dtype="fp32", grad_dtype="fp32", optimizer_dtype="fp32")
    memory = make_plan(config, plan_layout, settings).memory
    held = {"parameters": memory.parameters, "gradients": memory.gradients,
            "optimizer_states": memory.optimizer_states}
    return {k: held[PLAN_KEYS[k]] for k in KINDS}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarize(args: argparse.Namespace, config, runs: dict[tuple[str, int], list[dict]]) -> list[dict]:  # noqa: ANN001
    """One row per (layout, N): measured bytes (largest rank), the plan's, the ratios, step time,
    tokens/s and communication time."""
    tokens = args.batch * args.seq_len
    rows = []
    for (layout, n), ranks in runs.items():
        measured = {k: max(r["bytes"][k] for r in ranks) for k in KINDS}
        experts = {k: max(r["expert_bytes"][k] for r in ranks) for k in KINDS}
        predicted = plan_bytes(config, layout, n, args.fsdp_ep_size)
        base_ranks = runs[(layout, 1)]
        base = {k: max(r["bytes"][k] for r in base_ranks) for k in KINDS}
        base_experts = {k: max(r["expert_bytes"][k] for r in base_ranks) for k in KINDS}
        total = sum(measured.values())
        steps = [_median(r["step_s"][1:] or r["step_s"]) for r in ranks]
        base_step = max(_median(r["step_s"][1:] or r["step_s"]) for r in base_ranks)
        cpus = [_median(r["cpu_s"][1:] or r["cpu_s"]) for r in ranks if r.get("cpu_s")]
        comm = [_median(r["comm_s"]) for r in ranks]
        profiled = [_median(r["profiled_step_s"]) for r in ranks]
        ops: dict[str, int] = {}
        for r in ranks:
            for name, count in r["comm_ops"].items():
                ops[name] = ops.get(name, 0) + count
        busiest = max(range(n), key=lambda i: comm[i])
        row: dict[str, Any] = {
            "layout": layout, "ranks": n, "mesh": mesh_name(layout, n, args.fsdp_ep_size),
            "optimizer": ranks[0]["optimizer"], "measured": measured, "predicted": predicted,
            "measured_total": total, "predicted_total": sum(predicted.values()),
            "plan_ratio": {k: round(measured[k] / predicted[k], 4) if predicted[k] else None for k in KINDS},
            "plan_ratio_total": round(total / sum(predicted.values()), 4),
            "expert_bytes": experts, "step_s": round(max(steps), 4),
            "step_s_per_rank": [round(s, 4) for s in steps],
            "cpu_s": round(max(cpus), 4) if cpus else None,
            "tokens_per_step": tokens, "tokens_per_s": round(tokens / max(steps), 1),
            "tokens_per_s_vs_one": round(base_step / max(steps), 4),
            "comm_s": round(comm[busiest], 4), "comm_s_per_rank": [round(c, 4) for c in comm],
            "comm_fraction": round(comm[busiest] / profiled[busiest], 4) if profiled[busiest] else 0.0,
            "profiled_step_s": round(max(profiled), 4),
            "profiler_overhead": round(max(profiled) / max(steps), 3) if profiled[busiest] else None,
            "comm_ops": ops,
        }
        row["n_times_bytes_over_one"] = round(n * total / sum(base.values()), 4)
        row["experts_one_over_n"] = round(n * sum(experts.values()) / sum(base_experts.values()), 4)
        if layout == "ep":  # only the experts are split: the 1/N check is on them
            row["one_over_n"] = row["experts_one_over_n"]
            dense = sum(base.values()) - sum(base_experts.values())
            row["dense_plus_experts_over_n"] = round(total / (dense + sum(base_experts.values()) / n), 4)
        elif layout in SHARDED:
            row["one_over_n"] = row["n_times_bytes_over_one"]  # 1.0 when bytes fall as 1/N
        else:  # ddp: replicated, every rank holds the one-process bytes (N x / 1 = N)
            row["one_over_n"] = None
            row["replicated"] = round(total / sum(base.values()), 4)
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
    parser.add_argument("--fsdp-ep-size", type=int, default=2,
                        help="the ep size of the fsdp_ep layout; dp_shard = N / it (default 2)")
    parser.add_argument("--batch", type=int, default=4, help="global batch in sequences (default 4)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (the first untimed)")
    parser.add_argument("--profile-steps", type=int, default=2,
                        help="further steps under the profiler, for the communication time (default 2)")
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
        args.ranks = [1, *args.ranks]  # the 1/N check and tokens/s compare with one process
    if "fsdp_ep" in args.layouts:
        for n in args.ranks:
            if n > 1:
                fsdp_ep_shape(n, args.fsdp_ep_size)  # fail before any run

    from k2.model import K2Config

    config = K2Config.from_preset(args.preset)
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    load = [os.getloadavg()[0]]
    print(f"# scale: {args.preset}{f' ({args.layers} layers)' if args.layers else ''}, global batch "
          f"{args.batch} x {args.seq_len} tokens, fp32, gloo on the CPU, 1 torch thread per rank, "
          f"{args.steps} timed steps per configuration (first untimed) + {args.profile_steps} profiled")
    print(f"# machine: {platform.machine()} cpus={os.cpu_count()}; load average {load[0]:.1f}")
    runs: dict[tuple[str, int], list[dict]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(set(args.ranks)):
            for layout in args.layouts:
                if n == 1 and runs:
                    runs[(layout, 1)] = next(iter(runs.values()))  # one process: the same run
                    continue
                runs[(layout, n)] = launch(args, layout, n, Path(tmp, f"{layout}{n}"))
                load.append(os.getloadavg()[0])
    rows = summarize(args, config, runs)
    mib = 1 << 20
    print(f"\n{'layout':<28} {'params MiB':>10} {'grads MiB':>9} {'optim MiB':>9} {'total MiB':>9} "
          f"{'meas/plan':>9} {'N x / 1':>7} {'step s':>7} {'tokens/s':>8} {'x 1 proc':>8} {'cpu s':>6} "
          f"{'comm s':>7} {'comm %':>6}")
    for row in rows:
        if row["ranks"] == 1 and row["layout"] != rows[0]["layout"]:
            continue  # one process: printed once
        m = row["measured"]
        name = "1 process" if row["ranks"] == 1 else f"{row['layout']} ({row['mesh']})"
        print(f"{name:<28} {m['parameters'] / mib:>10.2f} {m['gradients'] / mib:>9.2f} "
              f"{m['optimizer'] / mib:>9.2f} {row['measured_total'] / mib:>9.2f} {row['plan_ratio_total']:>9.4f} "
              f"{row['n_times_bytes_over_one'] if row['layout'] != 'ep' else row['one_over_n']:>7.4f} "
              f"{row['step_s']:>7.3f} {row['tokens_per_s']:>8.0f} {row['tokens_per_s_vs_one']:>8.3f} "
              f"{row['cpu_s'] or float('nan'):>6.3f} {row['comm_s']:>7.3f} {100 * row['comm_fraction']:>6.1f}")
    ok_plan = all(within(r["plan_ratio_total"]) and all(within(v) for v in r["plan_ratio"].values() if v)
                  for r in rows)
    ok_scale = all(within(r["one_over_n"]) for r in rows if r["one_over_n"] is not None)
    ok_replicated = all(within(r["replicated"]) for r in rows if "replicated" in r)
    multi = [r for r in rows if r["ranks"] > 1]
    overhead = ", ".join(f"{r['layout']} {r['ranks']}: {r['profiler_overhead']}" for r in multi)
    print("('N x / 1' = N x bytes(N) / bytes(1): 1 when the bytes fall as 1/N; ep: the routed experts' "
          "bytes, with dense + experts/N against the measured total: "
          f"{', '.join(str(r['dense_plus_experts_over_n']) for r in multi if r['layout'] == 'ep') or '-'}; "
          "ddp: N, every rank holds the whole state)")
    print("(step s: median unprofiled step, slowest rank; tokens/s: global tokens per step / step s; "
          "comm: time with a gloo collective in flight, busiest rank, median of the profiled steps; "
          "comm %: of its profiled step; profiled / unprofiled step: "
          f"{overhead or '-'})")
    print(f"plan within 10 % of measured: {'yes' if ok_plan else 'NO'}; bytes fall as 1/N within 10 % "
          f"(fsdp, fsdp_ep; ep: experts): {'yes' if ok_scale else 'NO'}"
          + (f"; ddp holds the one-process bytes on every rank: {'yes' if ok_replicated else 'NO'}"
             if any("replicated" in r for r in multi) else ""))
    result = {"bench": "scale", "preset": args.preset, "layers": config.num_hidden_layers, "batch": args.batch,
              "seq_len": args.seq_len, "steps": args.steps, "profile_steps": args.profile_steps,
              "fsdp_ep_size": args.fsdp_ep_size, "quick": args.quick, "cpus": os.cpu_count(),
              "load_average": [round(x, 2) for x in load], "wall_s": round(time.perf_counter() - started, 1),
              "plan_within_10pct": ok_plan, "one_over_n_within_10pct": ok_scale,
              "ddp_replicated_within_10pct": ok_replicated, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return result


if __name__ == "__main__":
    main()
