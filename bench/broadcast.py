"""Benchmark: publishing weights to rollout workers (k2's checkpoint engine) vs the obvious ways.

For each weight set (a ~1 GiB synthetic set, and the ``tiny`` and ``small`` model presets when
``k2.model`` is importable) and 1, 2 and 4 worker processes, one version is published and
applied in every worker, timed from the trainer's call until every worker reports its model
updated. Methods, all in the same run and the same worker processes:

* ``k2 shm``            — ``WeightPublisher`` / ``WeightSubscriber`` (shared memory, this host)
  with the defaults: a slot per bucket (the newest version stays whole in shared memory), each
  worker copies it straight into its model once it has landed;
* ``k2 shm swap``       — the same segment; workers land buckets in a private buffer as they
  arrive and apply a version by swapping storage;
* ``k2 shm ring``       — ``catch_up=False``: a ring of two slots; workers land buckets in a
  private buffer as they arrive and copy it into the model;
* ``k2 gloo``           — ``DistributedWeightPublisher`` / ``...Subscriber`` over gloo, and
  ``k2 gloo fast`` with versions applied by swap;
* ``gloo per tensor``   — baseline (a): one ``torch.distributed.broadcast`` per tensor, gloo;
* ``torch.save/load``   — baseline (b): ``torch.save`` to /dev/shm, ``torch.load`` in each worker;
* ``memcpy``            — libc memmove of the same bytes between two buffers, one thread.

The gloo process group gets two devices on the loopback interface (``GLOO_SOCKET_IFNAME=lo,lo``,
``--gloo-ifname`` to change): two connections between every pair of processes, as a host with two
NICs (or ``eth0,eth0``) would give. k2's gloo path keeps two buckets in flight and so uses both;
the per-tensor baseline, one blocking broadcast at a time, uses one. ``--gloo-ifname lo`` measures
a single connection (there k2's gloo path is 0.9x-1.1x the baseline).

Every process runs torch with one thread. Prints a header, a table, and one JSON line.

    python bench/broadcast.py            # full run (~1 GiB set; needs ~12 GiB of memory)
    python bench/broadcast.py --quick    # smoke run (16 MiB, 1 worker)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
import uuid

import torch
import torch.distributed as dist

Specs = list[tuple[str, tuple[int, ...], torch.dtype]]


def synthetic_specs(mib: int) -> Specs:
    """``mib`` MiB of bf16 matrices (8 MiB each) with an fp32 norm vector after each."""
    rows = 1024
    specs: Specs = []
    for i in range(max(1, mib // 8)):
        specs.append((f"layers.{i}.proj.weight", (rows * 4, rows), torch.bfloat16))
        specs.append((f"layers.{i}.norm.weight", (rows,), torch.float32))
    return specs


def preset_specs(preset: str) -> Specs:
    """The state-dict shapes of a model preset, built on the meta device (no memory)."""
    from k2.model import K2Config, K2ForCausalLM

    with torch.device("meta"):
        model = K2ForCausalLM(K2Config.from_preset(preset))
    return [(name, tuple(t.shape), t.dtype) for name, t in model.state_dict().items()]


def build(specs: Specs) -> dict[str, torch.Tensor]:
    """Real tensors of ``specs``, every page touched."""
    return {name: torch.empty(shape, dtype=dtype).fill_(1) for name, shape, dtype in specs}


def nbytes(specs: Specs) -> int:
    return sum(torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
               for _, shape, dtype in specs)


# --------------------------------------------------------------------------- worker processes
def worker_main(rank: int, world: int, store: str, commands, done) -> None:
    """A rollout worker: runs the commands the trainer sends, reports each finished update."""
    from k2.broadcast import DistributedWeightSubscriber, WeightSubscriber

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model: dict[str, torch.Tensor] = {}
    while True:
        cmd, *args = commands.get()
        if cmd == "quit":
            break
        if cmd == "model":
            model = {}
            model = build(args[0])
        elif cmd == "k2 shm":
            name, rounds, swap = args
            with WeightSubscriber(model, worker=f"worker-{rank}", name=name, timeout=600,
                                  swap=swap) as sub:
                done.put("joined")
                for _ in range(rounds):
                    sub.update(timeout=600)
                    done.put("applied")
        elif cmd == "k2 gloo":
            rounds, swap = args
            sub = DistributedWeightSubscriber(model, src=0, worker=f"worker-{rank}", swap=swap)
            for _ in range(rounds):
                sub.update()
                done.put("applied")
            del sub
        elif cmd == "gloo per tensor":
            for _ in range(args[0]):
                for name in sorted(model):
                    dist.broadcast(model[name], src=0)
                done.put("applied")
        elif cmd == "torch.save/load":
            path, rounds = args
            for _ in range(rounds):
                commands.get()  # "load": the file is written
                state = torch.load(path)
                for name, t in model.items():
                    t.copy_(state[name])
                del state
                done.put("applied")
    dist.destroy_process_group()


# --------------------------------------------------------------------------- the trainer's side
class Pool:
    """``n`` worker processes in a gloo group with this process as rank 0."""

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.store = os.path.join(tempfile.gettempdir(), f"k2-bench-{uuid.uuid4().hex}")
        self.commands = [ctx.Queue() for _ in range(n)]
        self.done = ctx.Queue()
        self.procs = [ctx.Process(target=worker_main, args=(r + 1, n + 1, self.store, q, self.done))
                      for r, q in enumerate(self.commands)]
        for p in self.procs:
            p.start()
        dist.init_process_group("gloo", init_method=f"file://{self.store}", rank=0, world_size=n + 1)

    def send(self, *cmd) -> None:
        for q in self.commands:
            q.put(cmd)

    def wait(self, what: str) -> None:
        for _ in self.procs:
            got = self.done.get(timeout=900)
            assert got == what, (got, what)

    def close(self) -> None:
        self.send("quit")
        for p in self.procs:
            p.join(120)
        dist.destroy_process_group()
        if os.path.exists(self.store):
            os.remove(self.store)


def timed_rounds(rounds: int, publish, pool: Pool) -> float:
    """Best time of ``publish()`` + every worker's report, over ``rounds`` after a warm-up."""
    times = []
    for r in range(rounds + 1):
        start = time.perf_counter()
        publish()
        pool.wait("applied")
        if r:
            times.append(time.perf_counter() - start)
    return min(times)


def run_methods(weights: dict[str, torch.Tensor], specs: Specs, pool: Pool, rounds: int,
                bucket_bytes: int) -> dict[str, float]:
    """Seconds per published version for every method, with ``pool``'s workers."""
    from k2.broadcast import DistributedWeightPublisher, WeightPublisher

    pool.send("model", specs)
    out = {}

    for method, catch_up, swap in (("k2 shm", True, False), ("k2 shm swap", True, True),
                                   ("k2 shm ring", False, False)):
        name = f"bench-{uuid.uuid4().hex[:8]}"
        with WeightPublisher(weights, name=name, bucket_bytes=bucket_bytes, timeout=600,
                             catch_up=catch_up) as pub:
            pool.send("k2 shm", name, rounds + 1, swap)
            pool.wait("joined")
            while len(pub.workers()) < len(pool.procs):
                time.sleep(0.01)
            out[method] = timed_rounds(rounds, pub.publish, pool)

    for method, fast in (("k2 gloo", False), ("k2 gloo fast", True)):
        pool.send("k2 gloo", rounds + 1, fast)
        gloo_pub = DistributedWeightPublisher(weights, bucket_bytes=bucket_bytes)
        out[method] = timed_rounds(rounds, gloo_pub.publish, pool)
        del gloo_pub

    pool.send("gloo per tensor", rounds + 1)

    def per_tensor() -> None:
        for tensor_name in sorted(weights):
            dist.broadcast(weights[tensor_name], src=0)

    out["gloo per tensor"] = timed_rounds(rounds, per_tensor, pool)

    shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(shm_dir, f"k2-bench-{uuid.uuid4().hex[:8]}.pt")
    pool.send("torch.save/load", path, rounds + 1)

    def save_load() -> None:
        torch.save(weights, path)
        pool.send("load")

    try:
        out["torch.save/load"] = timed_rounds(rounds, save_load, pool)
    finally:
        if os.path.exists(path):
            os.remove(path)
    return out


def memcpy_seconds(size: int, rounds: int) -> float:
    """Best time of libc memmove copying ``size`` bytes between two touched buffers (one
    thread), over at least 3 rounds after a warm-up."""
    src = torch.ones(size, dtype=torch.uint8)
    dst = torch.zeros(size, dtype=torch.uint8)
    times = []
    for _ in range(max(rounds, 3) + 1):
        start = time.perf_counter()
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), size)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def header() -> None:
    import k2

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print("# k2 bench/broadcast.py — weight broadcast to rollout workers")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, {platform.system()}")
    print(f"# versions: k2 {k2.__version__}, torch {torch.__version__}, python {platform.python_version()}")
    print("# torch threads: 1 per process; times are the best round after a warm-up; "
          f"GLOO_SOCKET_IFNAME={os.environ.get('GLOO_SOCKET_IFNAME')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 MiB, 1 worker, 1 round")
    parser.add_argument("--mib", type=int, default=1024, help="size of the synthetic set (MiB)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (after one warm-up)")
    parser.add_argument("--bucket-mib", type=int, default=64,
                        help="bucket size (MiB); default: the library default, 64")
    parser.add_argument("--gloo-ifname", default="lo,lo",
                        help="GLOO_SOCKET_IFNAME for the gloo group (default lo,lo: two connections)")
    args = parser.parse_args()
    if args.quick:
        args.mib, args.workers, args.rounds, args.bucket_mib = 16, [1], 1, 4
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = args.gloo_ifname  # every process is on this host
    header()

    sets = [(f"synthetic {args.mib} MiB", synthetic_specs(args.mib))]
    try:
        for preset in ("tiny",) if args.quick else ("tiny", "small"):
            sets.append((f"preset {preset}", preset_specs(preset)))
    except ImportError:
        print("# k2.model is not available yet: the tiny and small preset rows are skipped")

    print(f"{'weights':<22} {'MiB':>6} {'workers':>7} {'method':<16} {'time (s)':>9} "
          f"{'GB/s/worker':>11} {'vs (a)':>7} {'% memcpy':>8}")
    summary: dict[str, dict[str, float]] = {}
    for n in args.workers:
        pool = Pool(n)
        try:
            for label, specs in sets:
                size = nbytes(specs)
                weights = build(specs)
                memcpy = memcpy_seconds(size, args.rounds)
                times = run_methods(weights, specs, pool, args.rounds, args.bucket_mib << 20)
                times["memcpy"] = memcpy
                del weights
                baseline = times["gloo per tensor"]
                for method, seconds in times.items():
                    print(f"{label:<22} {size / 2**20:>6.0f} {n:>7} {method:<16} {seconds:>9.3f} "
                          f"{size / seconds / 1e9:>11.2f} {baseline / seconds:>7.2f} "
                          f"{100 * memcpy / seconds:>8.0f}")
                summary[f"{label}/{n}w"] = {
                    "shm_vs_gloo_per_tensor": round(baseline / times["k2 shm"], 3),
                    "shm_swap_vs_gloo_per_tensor": round(baseline / times["k2 shm swap"], 3),
                    "shm_ring_vs_gloo_per_tensor": round(baseline / times["k2 shm ring"], 3),
                    "k2_gloo_vs_gloo_per_tensor": round(baseline / times["k2 gloo"], 3),
                    "k2_gloo_fast_vs_gloo_per_tensor": round(baseline / times["k2 gloo fast"], 3),
                    "shm_vs_save_load": round(times["torch.save/load"] / times["k2 shm"], 3),
                    "shm_of_memcpy": round(memcpy / times["k2 shm"], 3),
                }
        finally:
            pool.close()
    print(json.dumps({"bench": "broadcast", "ratios": summary}))


if __name__ == "__main__":
    main()
