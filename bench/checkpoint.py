"""Checkpoint I/O: k2's Rust writer/reader against torch.save/torch.load and the safetensors package.

    python bench/checkpoint.py            # ~1 GiB state (needs ~4 GiB free under --dir)
    python bench/checkpoint.py --quick    # 64 MiB smoke run

Three measurements, each run back to back in this process on the same state (fp32 and bf16
tensors of a few MiB, like a model's):

1. serialization into the page cache (no fsync): ``k2.checkpoint.save(durable=False)`` against
   ``torch.save`` and ``safetensors.torch.save_file``; goal: at least 2x the faster. Also timed:
   a plain write of the same bytes with one thread per core (nothing hashed), what this
   machine's page cache takes at best, reported as k2's fraction of it;
2. durable save (every file and directory fsynced): ``k2.checkpoint.save()`` against a plain
   multi-stream write + fsync of the same bytes (one file and one thread per core, what the
   hardware can do at best); goal: at most 10% slower;
3. full load from a warm page cache, every byte read: k2 (memory-mapped, every chunk's XXH3
   verified, tensors handed to torch without a copy) against ``safetensors.torch.load_file`` with
   every tensor read (an int64 sum over its bytes; it verifies nothing) and ``torch.load``;
   goal: at least 0.8x ``load_file``. Also reported as a fraction of single-thread memcpy
   bandwidth (``numpy.copyto``).

Every figure is the median of 5 runs. Dirty pages are flushed (``os.sync``) between runs and are
not timed. Disks on shared machines vary by about 30% from run to run: treat single figures
with care.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

import k2
from k2 import checkpoint

MiB = 1 << 20


class State(torch.nn.Module):
    """A module whose state dict is the benchmark's tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)


def make_state(total_bytes: int) -> dict[str, torch.Tensor]:
    """fp32 and bf16 matrices of 4-16 MiB plus small vectors, ``total_bytes`` in all."""
    g = torch.Generator().manual_seed(0)
    tensors, used, i = {}, 0, 0
    while used < total_bytes:
        rows = [1024, 2048, 4096][i % 3]
        dtype = torch.float32 if i % 2 == 0 else torch.bfloat16
        tensors[f"w{i}"] = torch.randn(rows, 1024, generator=g).to(dtype)
        tensors[f"norm{i}"] = torch.ones(1024, dtype=dtype)
        used += tensors[f"w{i}"].nbytes + tensors[f"norm{i}"].nbytes
        i += 1
    return tensors


def compare(cases: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Median wall time of each case ``name -> (fn, before)``, the cases run round-robin so
    that a noisy neighbour slows them alike; ``before()`` runs untimed, then dirty pages are
    flushed, then ``fn()`` is timed."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (fn, before) in cases.items():
            if before is not None:
                before()
            os.sync()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fresh(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def plain_parallel_write(directory: Path, tensors: list[torch.Tensor], streams: int, durable: bool = True) -> None:
    """The baseline write: ``streams`` files, one thread each, written (and fsynced when
    ``durable``); nothing hashed, nothing else written."""
    shares = [tensors[i::streams] for i in range(streams)]

    def write(index: int) -> None:
        fd = os.open(directory / f"part{index}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for tensor in shares[index]:
                view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                while view:
                    view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(write, range(streams)))


def read_every_byte(tensors: dict[str, torch.Tensor]) -> int:
    """Touch every byte of every tensor (an int64 sum over its bytes, vectorized)."""
    total = 0
    for t in tensors.values():
        flat = t.reshape(-1).view(torch.uint8)
        whole = flat.numel() // 8 * 8
        total += int(flat[:whole].view(torch.int64).sum()) + int(flat[whole:].sum())
    return total


def k2_load(root: Path) -> dict[str, torch.Tensor]:
    reader = checkpoint.CheckpointReader(root)
    reader.verify()  # every chunk of every file hashed and compared
    return {name: reader.tensor(name, verify=False) for name in reader.names("model")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 MiB state, one repeat (smoke run)")
    parser.add_argument("--gib", type=float, default=1.0, help="state size in GiB (default 1)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir); needs 4x the state free")
    args = parser.parse_args()
    total = 64 * MiB if args.quick else int(args.gib * 1024) * MiB
    repeats = 1 if args.quick else 5  # median of 5: these disks vary by ~30% run to run
    streams = os.cpu_count() or 1

    scratch = Path(tempfile.mkdtemp(prefix="k2-bench-ckpt-", dir=args.dir))
    try:
        tensors = make_state(total)
        nbytes = sum(t.nbytes for t in tensors.values())
        model = State(tensors)
        print(f"# checkpoint bench: {nbytes / MiB:.0f} MiB in {len(tensors)} tensors")
        print(f"# {platform.node()} {platform.machine()} {streams} cores | k2 {k2.__version__} torch {torch.__version__} "
              f"safetensors {safetensors.__version__} | scratch {scratch}")
        print("# preliminary figures if the machine is shared")

        # 1. Serialization into the page cache (with the bare parallel write of the same bytes as
        # a reference: what the page cache takes at best with one writer per core).
        k2_dir, ts_path, st_path = scratch / "k2", scratch / "torch.pt", scratch / "st.safetensors"
        plain_dir = scratch / "plain"
        floor_name = f"save, page cache: plain {streams}-stream write"
        t = compare(
            {
                "save, page cache: k2": (lambda: checkpoint.save(k2_dir, model, step=0, durable=False),
                                         lambda: fresh(k2_dir)),
                "save, page cache: torch.save": (lambda: torch.save(tensors, ts_path),
                                                 lambda: ts_path.unlink(missing_ok=True)),
                "save, page cache: safetensors save_file": (lambda: safetensors.torch.save_file(tensors, st_path),
                                                            lambda: st_path.unlink(missing_ok=True)),
                floor_name: (lambda: plain_parallel_write(plain_dir, list(tensors.values()), streams, durable=False),
                             lambda: fresh(plain_dir)),
            },
            repeats,
        )
        rows = list(t.items())
        t_save, t_floor = t["save, page cache: k2"], t[floor_name]
        save_speedup = min(t["save, page cache: torch.save"], t["save, page cache: safetensors save_file"]) / t[
            "save, page cache: k2"
        ]

        # 2. Durable save.
        plain_name = f"save, fsynced: plain {streams}-stream write+fsync"
        t = compare(
            {
                "save, fsynced: k2": (lambda: checkpoint.save(k2_dir, model, step=0), lambda: fresh(k2_dir)),
                plain_name: (lambda: plain_parallel_write(plain_dir, list(tensors.values()), streams),
                             lambda: fresh(plain_dir)),
            },
            repeats,
        )
        rows += list(t.items())
        durable_slowdown = t["save, fsynced: k2"] / t[plain_name] - 1

        # 3. Full load from a warm page cache.
        shutil.rmtree(plain_dir, ignore_errors=True)
        for warm in (k2_load(k2_dir), safetensors.torch.load_file(st_path), torch.load(ts_path)):
            read_every_byte(warm)  # pull every file into the page cache
        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        np.copyto(dst, src)  # fault the pages in before timing
        t = compare(
            {
                "load, verified: k2": (lambda: k2_load(k2_dir), None),
                "load: safetensors load_file + read": (lambda: read_every_byte(safetensors.torch.load_file(st_path)),
                                                       None),
                "load: torch.load": (lambda: torch.load(ts_path), None),
                "memcpy (numpy.copyto, 1 thread)": (lambda: np.copyto(dst, src), None),
            },
            repeats,
        )
        rows += list(t.items())
        t_load, t_load_file = t["load, verified: k2"], t["load: safetensors load_file + read"]
        t_torch_load, t_memcpy = t["load: torch.load"], t["memcpy (numpy.copyto, 1 thread)"]

        print(f"\n{'measurement':<44} {'seconds':>8} {'GiB/s':>7}")
        for name, seconds in rows:
            print(f"{name:<44} {seconds:8.3f} {nbytes / seconds / 2**30:7.2f}")
        result = {
            "bench": "checkpoint",
            "state_mib": round(nbytes / MiB),
            "save_page_cache_speedup_vs_faster_baseline": round(save_speedup, 2),
            "save_page_cache_fraction_of_plain_write": round(t_floor / t_save, 2),
            "durable_save_slowdown_vs_plain_write_fsync": round(durable_slowdown, 3),
            "load_speed_vs_load_file": round(t_load_file / t_load, 2),
            "load_speed_vs_torch_load": round(t_torch_load / t_load, 2),
            "load_fraction_of_memcpy": round(t_memcpy / t_load, 2),
        }
        print(f"\ngoals: save >= 2x faster baseline ({save_speedup:.2f}x), durable <= +10% "
              f"({durable_slowdown:+.1%}), load >= 0.8x load_file ({t_load_file / t_load:.2f}x)")
        print(json.dumps(result))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
