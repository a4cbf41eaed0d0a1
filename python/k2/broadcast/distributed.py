"""Across hosts: the same buckets broadcast with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Every process of a fixed process group takes part: the publisher (usually rank 0) creates a
:class:`DistributedWeightPublisher`, every other rank a :class:`DistributedWeightSubscriber`;
the constructors are collective. Buckets travel double-buffered: the publisher prepares bucket
``i + 1`` while bucket ``i`` is on the wire (large pieces go straight out of its tensors, small
ones packed together), and a subscriber handles bucket ``i`` while bucket ``i + 1`` arrives
(straight into its landing buffer when it takes every tensor whole). As on the shared-memory path, a version is applied only after every bucket
has landed, under the subscriber's lock.

Failure semantics (different from shared memory): a collective needs every member, so a worker
that dies or stalls breaks the whole group. The publisher's ``publish()`` then fails after the
process group's own timeout (``init_process_group(timeout=...)``) with a :class:`BroadcastError`
that names the version, the bucket and the group's workers; which member failed is known only
when its peer connection reports it. The group cannot be repaired: destroy it
(``dist.destroy_process_group()``), build a new one with the surviving (or restarted) workers,
and create new publisher/subscribers on it; the first ``publish()`` on the new group brings
every worker to the current weights.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend as _RawBackend

from k2 import _native
from k2.broadcast.layout import (
    Landing,
    Rows,
    TensorSource,
    check_model,
    named_tensors,
    source_bytes,
    tensor_specs,
)
from k2.broadcast.shm import DEFAULT_BUCKET_BYTES
from k2.errors import BroadcastError


def _is_raw(group) -> bool:
    """Whether ``group`` is a process-group backend built directly (``dist.ProcessGroupGloo(store,
    rank, size, ...)``), outside ``init_process_group``'s registry: a process that trains alone
    (whose default group must stay uninitialized) can still be a member of a broadcast group."""
    return isinstance(group, _RawBackend)


def _device(group) -> torch.device:
    """Where buffers live: the current CUDA device for NCCL, the CPU otherwise."""
    if _is_raw(group):
        return torch.device("cuda", torch.cuda.current_device()) if group.name().lower() == "nccl" else torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


DIRECT_BYTES = 1 << 20
"""Pieces of at least this many bytes travel alone, straight out of the trainer's tensor."""


class _Member:
    """What both ends share: the group, the plan, the message layout, the roster of workers.

    Each bucket travels as a few messages: every piece of at least ``direct_bytes`` alone
    (the publisher sends it straight from its tensor, no packing copy), then the smaller pieces
    packed together in bucket order. Two sets of buffers alternate between even and odd
    buckets, so bucket ``b + 1`` is in flight while bucket ``b`` is handled.
    """

    def __init__(self, group, src: int, worker: str) -> None:
        self.group = group
        self.src = src
        self.device = _device(group)
        self.worker = worker

    def _broadcast_object(self, announced: list) -> None:
        """``dist.broadcast_object_list`` from ``src``, also on a raw backend (pickled bytes)."""
        if not _is_raw(self.group):
            dist.broadcast_object_list(announced, src=self.src, group=self.group)
            return
        data = torch.frombuffer(bytearray(pickle.dumps(announced)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        self._broadcast([size])[0].wait()
        buffer = data if self.group.rank() == self.src else torch.empty(int(size), dtype=torch.uint8)
        self._broadcast([buffer])[0].wait()
        announced[:] = pickle.loads(buffer.numpy().tobytes())

    def _gather_objects(self, value) -> list:
        """``dist.all_gather_object``, also on a raw backend (padded pickled bytes)."""
        if not _is_raw(self.group):
            reports: list = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(reports, value, group=self.group)
            return reports
        world = self.group.size()
        data = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
        sizes = [[torch.zeros(1, dtype=torch.int64) for _ in range(world)]]
        self.group.allgather(sizes, [torch.tensor([data.numel()], dtype=torch.int64)]).wait()
        width = max(int(t) for t in sizes[0])
        padded = torch.zeros(width, dtype=torch.uint8)
        padded[: data.numel()] = data
        out = [[torch.empty(width, dtype=torch.uint8) for _ in range(world)]]
        self.group.allgather(out, [padded]).wait()
        return [pickle.loads(t[: int(n)].numpy().tobytes()) for t, n in zip(out[0], sizes[0])]

    def _join(self, announced: list, check) -> None:
        """Collective: share the publisher's announcement ``[specs, bucket_bytes,
        direct_bytes]``, run
        ``check(specs)`` (a model check returning a problem or None) everywhere, gather the
        results, and raise on every rank if any member's model does not fit."""
        self._broadcast_object(announced)
        specs, bucket_bytes, direct_bytes = announced
        problem = check(specs)
        reports = self._gather_objects((self.worker, problem))
        self.roster = [w for w, _ in reports]
        problems = [p for _, p in reports if p]
        if problems:
            raise BroadcastError("the group's models do not match the published weights:\n" + "\n".join(problems))
        self.plan = _native.BucketPlan(specs, bucket_bytes)
        # Per bucket: the pieces (``_native.Chunk``) sent alone, and those packed together.
        self.layout: list[tuple[list[_native.Chunk], list[_native.Chunk]]] = []
        for b in range(self.plan.num_buckets):
            chunks = self.plan.chunks(b)
            self.layout.append(([c for c in chunks if c.nbytes >= direct_bytes],
                                [c for c in chunks if c.nbytes < direct_bytes]))
        packed_max = max((sum(c.nbytes for c in small) for _, small in self.layout), default=0)
        self.packed = [torch.empty(packed_max, dtype=torch.uint8, device=self.device) for _ in range(2)]

    def _failed(self, version: int, bucket: int | str, err: Exception) -> BroadcastError:
        return BroadcastError(
            f"{self.worker}: torch.distributed broadcast of version {version} failed at bucket {bucket}"
            f" ({type(err).__name__}: {err}); a member of the group {self.roster} died or stalled, and the"
            " process group is now broken: destroy it, build a new one with the workers that are left,"
            " and create new publisher/subscribers on it")

    def _broadcast(self, tensors: list[torch.Tensor]) -> list:
        if _is_raw(self.group):
            options = dist.BroadcastOptions()
            options.rootRank = self.src
            return [self.group.broadcast([t], options) for t in tensors]
        return [dist.broadcast(t, src=self.src, group=self.group, async_op=True) for t in tensors]


class DistributedWeightPublisher(_Member):
    """The publishing rank of a ``torch.distributed`` weight broadcast (collective constructor).

    Args:
        tensors: the trainer's tensors or module.
        group: the process group (default: the world), or a backend built directly
            (``dist.ProcessGroupGloo(store, rank, size, ...)``; ranks are then the group's own).
        bucket_bytes: bucket size (a multiple of 256).
        direct_bytes: pieces of at least this size are sent straight from the tensors (no
            packing copy); smaller ones are packed together per bucket.
    """

    def __init__(self, tensors: TensorSource, *, group=None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 direct_bytes: int = DIRECT_BYTES) -> None:
        super().__init__(group, group.rank() if _is_raw(group) else dist.get_rank(), worker="publisher")
        self._tensors = named_tensors(tensors)
        self._join([tensor_specs(self._tensors()), bucket_bytes, direct_bytes],
                   check=lambda specs: None)
        self.version = 0

    def publish(self) -> int:
        """Broadcast the tensors' current values to the group as a new version.

        Returns:
            The new version number.

        Raises:
            BroadcastError: a member failed (the group is broken; see the module docs), or the
                tensors no longer match the plan.
        """
        sources = source_bytes(self._tensors(), self.plan)
        version = self.version + 1
        header = torch.tensor([version], dtype=torch.int64, device=self.device)
        in_flight: list[list] = [[], []]
        b: int | str = "header"
        try:
            self._broadcast([header])[0].wait()
            for b in range(self.plan.num_buckets):
                for work in in_flight[b % 2]:  # bucket b - 2 used these buffers
                    work.wait()
                alone, small = self.layout[b]
                messages = [sources[c.tensor][c.tensor_offset:c.tensor_offset + c.nbytes] for c in alone]
                if small:
                    packed, cursor = self.packed[b % 2], 0
                    with torch.no_grad():
                        for c in small:
                            n = c.nbytes
                            packed[cursor:cursor + n].copy_(sources[c.tensor][c.tensor_offset:c.tensor_offset + n])
                            cursor += n
                    messages.append(packed[:cursor])
                in_flight[b % 2] = self._broadcast(messages)
            for work in in_flight[0] + in_flight[1]:
                work.wait()
        except (RuntimeError, dist.DistError) as err:
            raise self._failed(version, b, err) from err
        self.version = version
        return version


class DistributedWeightSubscriber(_Member):
    """A receiving rank of a ``torch.distributed`` weight broadcast (collective constructor).

    Args:
        tensors: the worker's tensors or module; a sliced tensor has the slice's shape.
        src: the publisher's global rank.
        worker: this worker's name (default ``rank-N``).
        group: the process group (default: the world), or a backend built directly (see
            :class:`DistributedWeightPublisher`; ``src`` is then a rank of that group).
        slices: rows (dim 0) wanted per tensor, as for ``WeightSubscriber``.
        strict: whether a published tensor missing from the model is an error.
        swap: apply by swapping storage instead of copying (as for ``WeightSubscriber``).
    """

    def __init__(self, tensors: TensorSource, *, src: int = 0, worker: str | None = None,
                 group=None, slices: Mapping[str, Rows] | None = None, strict: bool = True,
                 swap: bool = False) -> None:
        rank = group.rank() if _is_raw(group) else dist.get_rank()
        super().__init__(group, src, worker=worker or f"rank-{rank}")
        model = named_tensors(tensors)()
        slices = dict(slices or {})

        def check(specs) -> str | None:
            try:
                check_model(specs, model, slices, strict, who=f"worker {self.worker}")
            except BroadcastError as err:
                return str(err)
            return None

        self._join([None, None, None], check)
        self._landing = Landing(self.plan, model, slices, swap=swap)
        self.images = [torch.empty(self.plan.bucket_bytes, dtype=torch.uint8, device=self.device)
                       for _ in range(2)]
        self.lock = threading.RLock()
        """Held while a version is applied; readers take it to see one whole version."""
        self.version = 0

    def _post(self, b: int):
        """Post the receives of bucket ``b``; return them and the function that finishes it.

        The bucket is rebuilt in its image: a window of the landing buffer where that mirrors
        the arena (then nothing is copied at all), else bucket buffer ``b % 2``, landed after.
        """
        window = self.plan.bucket_range(b)
        start, end = window.start, window.end
        direct = self._landing.direct(b, (start, end))
        image = self.images[b % 2][: end - start] if direct is None else direct
        alone, small = self.layout[b]
        targets = [image[c.bucket_offset:c.bucket_offset + c.nbytes] for c in alone]
        packed = self.packed[b % 2][: sum(c.nbytes for c in small)]
        if small:
            targets.append(packed)

        def finish() -> None:
            cursor = 0
            for c in small:
                off, n = c.bucket_offset, c.nbytes
                image[off:off + n].copy_(packed[cursor:cursor + n])
                cursor += n
            if direct is None:
                self._landing.land(b, image)

        return self._broadcast(targets), finish

    def update(self) -> int:
        """Receive the next published version and apply it (blocks until the publisher
        publishes, bounded by the process group's timeout).

        Returns:
            The applied version.

        Raises:
            BroadcastError: a member failed; the group is broken (see the module docs). The
                model keeps its previous version.
        """
        header = torch.zeros(1, dtype=torch.int64, device=self.device)
        n = self.plan.num_buckets
        b: int | str = "header"
        version = self.version + 1
        try:
            self._broadcast([header])[0].wait()
            version = int(header.item())
            posted = {0: self._post(0)} if n else {}
            for b in range(n):
                if b + 1 < n:
                    posted[b + 1] = self._post(b + 1)  # in flight while bucket b is handled
                works, finish = posted.pop(b)
                for work in works:
                    work.wait()
                finish()
        except (RuntimeError, dist.DistError) as err:
            raise self._failed(version, b, err) from err
        with self.lock:
            self._landing.apply()
            self.version = version
        return version
