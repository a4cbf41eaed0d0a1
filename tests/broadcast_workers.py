"""Rollout-worker processes for tests/test_broadcast.py (spawned, so they live in a module).

Every worker builds its own model (zeros of the right shapes), subscribes, and reports what it
received through a multiprocessing queue.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping

import torch


def weights(version: int) -> dict[str, torch.Tensor]:
    """The trainer's tensors at ``version``: several dtypes, a 0-d tensor, a stacked expert
    tensor, sizes that are not multiples of anything."""
    g = torch.Generator().manual_seed(1000 + version)
    return {
        "embed.weight": torch.randn(37, 24, generator=g),
        "layers.0.attn.q_proj.weight": torch.randn(48, 24, generator=g).to(torch.bfloat16),
        "layers.0.mlp.experts.gate_proj": torch.randn(8, 16, 24, generator=g).to(torch.bfloat16),
        "layers.0.mlp.gate.e_score_correction_bias": torch.randn(8, generator=g),
        "norm.weight": torch.randn(24, generator=g).half(),
        "step": torch.tensor(version, dtype=torch.int64),
        "mask": torch.rand(13, generator=g) > 0.5,
    }


SLICES = {
    "layers.0.attn.q_proj.weight": slice(16, 40),  # a tensor-parallel row range
    "layers.0.mlp.experts.gate_proj": [5, 1, 2],  # a subset of experts, in this order
}


def sliced(tensors: Mapping[str, torch.Tensor], slices: Mapping) -> dict[str, torch.Tensor]:
    """``tensors`` with ``slices`` applied by plain torch indexing (the test's reference)."""
    return {k: (v[slices[k]] if k in slices else v).clone() for k, v in tensors.items()}


def portable(model: Mapping[str, torch.Tensor]) -> dict:
    """A model as plain bytes, to cross a queue (torch would share tensors by file descriptor,
    which dies with the worker)."""
    return {k: (v.dtype, tuple(v.shape), v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            for k, v in model.items()}


def restored(model: Mapping) -> dict[str, torch.Tensor]:
    """Inverse of :func:`portable`."""
    return {k: torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
            for k, (dtype, shape, data) in model.items()}


def empty_model(slices: Mapping | None) -> dict[str, torch.Tensor]:
    """A worker's model: zeros shaped like (its slices of) the published tensors."""
    return {k: torch.zeros_like(v) for k, v in sliced(weights(0), slices or {}).items()}


def receive_versions(name: str, worker: str, slices: Mapping | None, versions: int,
                     verify: bool, out, swap: bool = False, in_place: bool | None = None) -> None:
    """Apply ``versions`` updates; after each, report ``(worker, version, model copy, whether
    it applied in place)``."""
    from k2.broadcast import WeightSubscriber

    torch.set_num_threads(1)
    model = empty_model(slices)
    with WeightSubscriber(model, worker=worker, name=name, slices=slices, timeout=30.0,
                          verify=verify, swap=swap, in_place=in_place) as sub:
        for _ in range(versions):
            version = sub.update(timeout=30.0)
            out.put((worker, version, portable(model), sub.applies_in_place))


def fingerprint_model(count: int) -> dict[str, torch.Tensor]:
    """``count`` float tensors of assorted sizes; the publisher fills all of them with the
    version number, so every read can check that it saw a single version."""
    return {f"t{i:03d}": torch.zeros(64 + 97 * i) for i in range(count)}


def read_while_updating(name: str, worker: str, count: int, last_version: int, out,
                        in_place: bool | None = None) -> None:
    """Apply versions until ``last_version`` while a reader thread reads the whole model
    under the subscriber's lock; report ``(reads, torn_reads, versions_seen)``."""
    from k2.broadcast import WeightSubscriber

    torch.set_num_threads(1)
    model = fingerprint_model(count)
    sub = WeightSubscriber(model, worker=worker, name=name, timeout=30.0, in_place=in_place)
    done = threading.Event()
    reads, torn, seen = 0, 0, set()

    def reader() -> None:
        nonlocal reads, torn
        while not done.is_set():
            with sub.lock:
                values = torch.cat([t for t in model.values()]).unique()
            reads += 1
            if values.numel() != 1:
                torn += 1
            seen.add(float(values[0]))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        while sub.version < last_version:
            sub.update(timeout=30.0)
    finally:
        done.set()
        thread.join()
        sub.close()
    out.put((reads, torn, sorted(seen)))


def stall_holding_a_bucket(name: str, worker: str, holding) -> None:
    """Join, take the first bucket of the next version, signal ``holding``, and hang."""
    from k2.broadcast import WeightSubscriber

    sub = WeightSubscriber(empty_model(None), worker=worker, name=name, timeout=30.0)
    for bucket in sub.buckets(timeout=30.0):
        holding.set()
        time.sleep(600)  # killed by the test
        del bucket


def distributed_member(rank: int, world: int, store: str, versions: int, slices, out) -> None:
    """One rank of a gloo group: rank 0 publishes ``versions`` versions of :func:`weights`,
    the others receive them (with ``slices`` if given) and report each."""
    import torch.distributed as dist

    from k2.broadcast import DistributedWeightPublisher, DistributedWeightSubscriber
    from k2.errors import BroadcastError

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        if rank == 0:
            source = weights(1)
            # pieces of 300 bytes or more go alone, smaller ones packed: both kinds travel
            publisher = DistributedWeightPublisher(source, bucket_bytes=1024, direct_bytes=300)
            for v in range(1, versions + 1):
                for k, t in weights(v).items():
                    source[k].copy_(t)
                out.put(("publisher", publisher.publish(), {}))
        else:
            model = empty_model(slices)
            sub = DistributedWeightSubscriber(model, src=0, worker=f"rank-{rank}", slices=slices)
            for _ in range(versions):
                version = sub.update()
                out.put((f"rank-{rank}", version, portable(model)))
        # A second pair on the same group, where the last rank's model is wrong: every rank
        # must refuse, listing that rank's differences, before any bucket moves.
        try:
            if rank == 0:
                DistributedWeightPublisher(weights(1), bucket_bytes=1024)
            else:
                model = empty_model(None)
                if rank == world - 1:
                    model["norm.weight"] = torch.zeros(25, dtype=torch.float16)
                DistributedWeightSubscriber(model, src=0, worker=f"rank-{rank}")
            out.put(("mismatch", rank, "accepted"))
        except BroadcastError as err:
            out.put(("mismatch", rank, str(err)))
    finally:
        dist.destroy_process_group()


def distributed_member_that_loses_a_rank(rank: int, world: int, store: str, out) -> None:
    """A gloo group whose last rank dies (exits at once) after the publisher and subscribers are
    built: report what ``publish()`` / ``update()`` did on the others, and how long it took."""
    import datetime
    import time

    import torch.distributed as dist

    from k2.broadcast import DistributedWeightPublisher, DistributedWeightSubscriber
    from k2.errors import BroadcastError

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=10))
    if rank == 0:
        member = DistributedWeightPublisher(weights(1), bucket_bytes=1024)
    else:
        member = DistributedWeightSubscriber(empty_model(None), src=0, worker=f"rank-{rank}")
    if rank == world - 1:
        os._exit(0)  # dies without a word, mid-group
    time.sleep(0.5)  # let it die first
    start = time.monotonic()
    try:
        outcome = ("ok", member.publish() if rank == 0 else member.update())
    except BroadcastError as err:
        outcome = ("error", str(err))
    out.put((rank, *outcome, time.monotonic() - start))
