"""Benchmark k2's TokenLoader against the usual ways of feeding a language model.

    python bench/loader.py [--quick]

Every contender delivers shuffled int64 batches of 32 x 1024 tokens (inputs and targets shifted
by one) drawn from the same synthetic u16 token stream, memory-mapped from disk:

* k2          — ``k2.data.TokenLoader`` over a k2 shard: Rust prefetch threads (GIL released),
                three fresh int64 arrays per batch (inputs, targets, position ids);
* numpy       — baseline (a): an in-process numpy fancy-index gather of random windows from a
                ``np.memmap`` of the same tokens, delivering what k2 delivers: contiguous int64
                inputs, targets and position ids (gathered from a precomputed u32 position
                stream, memory-mapped too);
* numpy lean  — for reference, the least a numpy gather can do: one int64 [32, 1025] array,
                inputs and targets as views of it, no position ids;
* torch       — baseline (b): ``torch.utils.data.DataLoader`` with 2 worker processes over the
                same memmap (a map-style dataset of windows, shuffled, default collate);
* memcpy      — ``np.copyto`` between two 256 MiB arrays: this machine's copy bandwidth, the
                ceiling for bytes delivered.

Bytes delivered count the int64 arrays handed to the caller (k2 and numpy: 3 x 32 x 1024 x 8
per batch; numpy lean and torch: 32 x 1025 x 8). Prints a header, a table and one JSON line with
the ratios (goals: k2 >= 1.5x numpy in tokens/s, k2 >= 30% of memcpy in bytes/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ_LEN = 1024
BATCH = 32
VOCAB = 8192


def make_stream(tokens: int, directory: Path) -> tuple[Path, Path, Path]:
    """Write the same pseudo-random documents as a k2 shard, as a raw u16 token file and as a
    raw u32 file of each token's position in its document."""
    from k2 import _native

    rng = np.random.default_rng(0)
    lengths = rng.integers(200, 4200, size=tokens // 2200 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), tokens) + 1]
    ids = rng.integers(0, VOCAB, size=int(lengths.sum()), dtype=np.uint16)
    shard, raw = directory / "bench.k2tok", directory / "bench.u16"
    writer = _native.ShardWriter(shard, VOCAB)
    writer.add_documents(ids.astype(np.uint32), lengths.astype(np.int64))
    writer.finish()
    ids.tofile(raw)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = directory / "bench.pos.u32"
    (np.arange(len(ids)) - starts).astype(np.uint32).tofile(positions)
    return shard, raw, positions


def measure(next_batch, seconds: float, warmup: int = 3) -> float:
    """Batches per second of ``next_batch()`` over about ``seconds``."""
    for _ in range(warmup):
        next_batch()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        next_batch()
        n += 1
    return n / elapsed


def bench_k2(shard: Path, seconds: float) -> float:
    from k2.data import TokenLoader

    loader = TokenLoader(shard, SEQ_LEN, BATCH, seed=0, prefetch=8, threads=2)
    return measure(loader.next_batch, seconds)


def bench_numpy(raw: Path, positions_raw: Path, seconds: float) -> float:
    tokens = np.memmap(raw, dtype=np.uint16, mode="r")
    positions = np.memmap(positions_raw, dtype=np.uint32, mode="r")
    samples = (len(tokens) - 1) // SEQ_LEN
    rng = np.random.default_rng(0)
    window = np.arange(SEQ_LEN + 1)

    def next_batch():
        starts = rng.integers(0, samples, size=BATCH) * SEQ_LEN
        index = starts[:, None] + window  # [B, T+1]
        x = tokens[index].astype(np.int64)
        inputs, targets = np.ascontiguousarray(x[:, :-1]), np.ascontiguousarray(x[:, 1:])
        return inputs, targets, positions[index[:, :-1]].astype(np.int64)

    return measure(next_batch, seconds)


def bench_numpy_lean(raw: Path, seconds: float) -> float:
    tokens = np.memmap(raw, dtype=np.uint16, mode="r")
    samples = (len(tokens) - 1) // SEQ_LEN
    rng = np.random.default_rng(0)
    window = np.arange(SEQ_LEN + 1)

    def next_batch():
        starts = rng.integers(0, samples, size=BATCH) * SEQ_LEN
        x = tokens[starts[:, None] + window].astype(np.int64)  # [B, T+1]
        return x[:, :-1], x[:, 1:]

    return measure(next_batch, seconds)


class _Windows:
    """Map-style dataset: sample i is tokens [i*T, (i+1)*T] as int64."""

    def __init__(self, raw: Path) -> None:
        self.raw = raw
        self.tokens = None
        self.samples = (raw.stat().st_size // 2 - 1) // SEQ_LEN

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, i: int):
        import torch

        if self.tokens is None:  # open the memmap in the worker process
            self.tokens = np.memmap(self.raw, dtype=np.uint16, mode="r")
        return torch.from_numpy(self.tokens[i * SEQ_LEN : (i + 1) * SEQ_LEN + 1].astype(np.int64))


def bench_torch(raw: Path, seconds: float) -> float:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _Windows(raw),
        batch_size=BATCH,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )
    state = {"it": iter(loader)}

    def next_batch():
        try:
            x = next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            x = next(state["it"])
        return x[:, :-1], x[:, 1:]

    return measure(next_batch, seconds)


def bench_memcpy(seconds: float) -> float:
    """Bytes per second of a 256 MiB ``np.copyto``."""
    src = np.ones(256 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    calls = measure(lambda: np.copyto(dst, src), seconds, warmup=1)
    return calls * src.nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (smoke test)")
    args = parser.parse_args()
    seconds = 0.3 if args.quick else 3.0
    tokens = 1 << 22 if args.quick else 1 << 26

    import torch

    import k2

    print(
        f"k2 loader bench: batches of {BATCH} x {SEQ_LEN}, {tokens:,}-token u16 stream, "
        f"quick={args.quick}"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"torch {torch.__version__}, k2 {k2.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="k2-loader-bench-") as tmp:
        shard, raw, positions = make_stream(tokens, Path(tmp))
        rates = {
            "k2": bench_k2(shard, seconds),
            "numpy": bench_numpy(raw, positions, seconds),
            "numpy_lean": bench_numpy_lean(raw, seconds),
            "torch": bench_torch(raw, seconds),
        }
    memcpy = bench_memcpy(seconds)
    batch_tokens = BATCH * SEQ_LEN
    lean_bytes = BATCH * (SEQ_LEN + 1) * 8
    out_bytes = {
        "k2": 3 * batch_tokens * 8,
        "numpy": 3 * batch_tokens * 8,
        "numpy_lean": lean_bytes,
        "torch": lean_bytes,
    }
    print()
    print(f"{'loader':<34} {'batches/s':>10} {'Mtokens/s':>10} {'GB/s out':>9}")
    names = {
        "k2": "k2 TokenLoader (2 threads)",
        "numpy": "numpy memmap gather (baseline a)",
        "numpy_lean": "numpy gather, lean (reference)",
        "torch": "torch DataLoader, 2 workers (b)",
    }
    for key, rate in rates.items():
        tokens_per_s, bytes_per_s = rate * batch_tokens, rate * out_bytes[key]
        print(
            f"{names[key]:<34} {rate:>10.0f} {tokens_per_s / 1e6:>10.1f} {bytes_per_s / 1e9:>9.2f}"
        )
    print(f"{'memcpy 256 MiB':<34} {'':>10} {'':>10} {memcpy / 1e9:>9.2f}")
    result = {
        "bench": "loader",
        "quick": args.quick,
        "k2_tokens_per_s": round(rates["k2"] * batch_tokens),
        "k2_vs_numpy": round(rates["k2"] / rates["numpy"], 3),
        "k2_vs_numpy_lean": round(rates["k2"] / rates["numpy_lean"], 3),
        "k2_vs_torch": round(rates["k2"] / rates["torch"], 3),
        "k2_bytes_vs_memcpy": round(rates["k2"] * out_bytes["k2"] / memcpy, 3),
        "memcpy_bytes_per_s": round(memcpy),
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
