"""Same-host weight broadcast through Rust-owned shared memory.

The trainer's :class:`WeightPublisher` owns a segment (a file in ``/dev/shm``) of bucket slots;
it stages bucket ``i + 1`` while the workers' :class:`WeightSubscriber` read bucket ``i``
through zero-copy views. By default the segment has a slot per bucket, so the newest version
stays whole in shared memory: a late or restarted worker is served from it the moment it
joins (by a background thread, without copying anything), and a worker whose model is plain
CPU tensors copies each version straight from shared memory into its model. With
``catch_up=False`` the segment is a ring of two slots (memory for two buckets only) and
workers land buckets in a private buffer first. Every wait is bounded by ``timeout``: a worker
that dies or stalls is evicted and named (:class:`WorkersFailed`) while the others still get
the version.

Example (trainer)::

    with WeightPublisher(model, name="policy") as publisher:
        ...
        version = publisher.publish()    # after each optimizer step

Leaving the ``with`` block (or calling :meth:`WeightPublisher.close`) removes the segment; a
publisher still open when the interpreter exits is closed then.

Example (each rollout worker, its own process)::

    subscriber = WeightSubscriber(model, name="policy", worker="rollout-3")
    while True:
        subscriber.update(timeout=0.0)   # apply a new version if one is in flight
        with subscriber.lock:            # generation never sees a half-applied version
            generate(model, ...)
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from k2 import _native
from k2.broadcast.layout import (
    InPlace,
    Landing,
    Rows,
    TensorSource,
    check_model,
    make_plan,
    named_tensors,
    pack,
    source_bytes,
)
from k2.errors import BroadcastError

log = logging.getLogger("k2.broadcast")

DEFAULT_BUCKET_BYTES = 64 << 20
"""64 MiB buckets: large enough that per-bucket overhead vanishes, small enough to pipeline."""

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def segment_path(name: str) -> Path:
    """The shared-memory file of broadcast ``name`` (in ``/dev/shm`` where it exists)."""
    if not _NAME.fullmatch(name):
        raise BroadcastError(f"broadcast name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    directory = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    return directory / f"k2-broadcast-{name}"


class WorkersFailed(BroadcastError):
    """Some workers failed during a publish; every other worker got the version.

    Attributes:
        version: the version that was published.
        failures: worker name -> why the publisher gave up on it.
    """

    def __init__(self, version: int, failures: Mapping[str, str]) -> None:
        self.version = version
        self.failures = dict(failures)
        listing = "; ".join(f"worker {w}: {why}" for w, why in self.failures.items())
        super().__init__(f"version {version} was published without {len(self.failures)} worker(s): {listing}")


class Bucket:
    """One bucket of a version, lent to a worker as zero-copy views of shared memory.

    The views are valid until :meth:`release`; releasing while a view is alive is refused,
    and a released bucket refuses new views, so a view never shows reused memory. Treat
    views as read-only (other workers read the same bytes).
    """

    def __init__(self, core: _native.ShmSubscriber, lease: _native.BucketLease,
                 plan: _native.BucketPlan, version: int) -> None:
        self._core, self._lease, self._plan = core, lease, plan
        self.index = lease.bucket
        self.version = version

    @property
    def released(self) -> bool:
        return self._lease.released

    def view(self, name: str | None = None) -> torch.Tensor:
        """A zero-copy view of the bucket.

        Args:
            name: a tensor; None for the whole bucket as uint8.

        Returns:
            The whole bucket (uint8), or the piece of ``name`` held here as a 1-D tensor of its
            dtype (shaped like the tensor when the piece is all of it); see :meth:`offset`.
        """
        data = torch.frombuffer(memoryview(self._lease), dtype=torch.uint8)
        if name is None:
            return data
        chunk = self._chunk(name)
        spec = self._plan.tensors()[chunk.tensor]
        piece = data[chunk.bucket_offset:chunk.bucket_offset + chunk.nbytes].view(getattr(torch, spec.dtype))
        whole = chunk.nbytes == spec.itemsize * int(torch.Size(spec.shape).numel())
        return piece.view(spec.shape) if whole else piece

    def offset(self, name: str) -> int:
        """Element offset, within the flattened tensor ``name``, of its piece in this bucket."""
        chunk = self._chunk(name)
        return chunk.tensor_offset // self._plan.tensors()[chunk.tensor].itemsize

    def names(self) -> list[str]:
        """The tensors that have a piece in this bucket."""
        specs = self._plan.tensors()
        return [specs[c.tensor].name for c in self._plan.chunks(self.index)]

    def _chunk(self, name: str) -> _native.Chunk:
        specs = self._plan.tensors()
        for chunk in self._plan.chunks(self.index):
            if specs[chunk.tensor].name == name:
                return chunk
        raise BroadcastError(f"tensor {name} has no piece in bucket {self.index}")

    def release(self) -> None:
        """Hand the bucket back (acknowledge it). Every view must be dropped first."""
        self._core.release(self._lease)

    def __enter__(self) -> Bucket:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.released:
            self.release()


class WeightPublisher:
    """Publishes weight versions from the trainer to the rollout workers on this host.

    Args:
        tensors: the trainer's tensors (``name -> tensor``) or module (its state dict).
        name: the broadcast's name; workers subscribe by it.
        bucket_bytes: bucket size (a multiple of 256).
        timeout: seconds to wait for a worker before giving up on it.
        checksums: record an XXH3 checksum with every bucket (workers may verify it).
        catch_up: keep the newest version whole in shared memory (a slot per bucket: one copy
            of the weights) and send it to late or restarted workers as soon as they join; it
            also lets workers copy versions straight into their models. False: a ring of two
            slots, and late workers get the next published version.

    Close it (:meth:`close`, or use it as a context manager) to remove the shared-memory
    segment; one still open when the interpreter exits is closed then (an ``atexit`` hook),
    and one dropped unclosed is closed when it is collected: the catch-up thread holds only a
    weak reference to it.
    """

    def __init__(self, tensors: TensorSource, *, name: str = "k2",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout: float = 30.0,
                 checksums: bool = False, catch_up: bool = True) -> None:
        self._tensors = named_tensors(tensors)
        self.plan = make_plan(self._tensors(), bucket_bytes)
        self.path = segment_path(name)
        self._core = _native.ShmPublisher(self.path, self.plan, checksums, timeout, catch_up)
        self._lock = threading.Lock()
        self.version = 0
        self.failures: dict[str, str] = {}
        """Workers the last round (publish or catch-up) gave up on, with the reasons."""
        self._whole = True  # whether the retained slots hold self.version whole
        self._closed = threading.Event()
        self._server: threading.Thread | None = None
        self._pid = os.getpid()
        _open_publishers.add(self)
        if catch_up:
            self._server = threading.Thread(target=_serve_catch_ups, args=(weakref.ref(self), self._closed),
                                            name=f"k2-broadcast-{name}", daemon=True)
            self._server.start()

    def publish(self) -> int:
        """Send the tensors' current values to every joined worker as a new version.

        Returns:
            The new version number (1, 2, ...).

        Raises:
            WorkersFailed: if some workers died or stalled (named, with reasons); the version
                was still published to all the others.
            BroadcastError: if the tensors no longer match the plan (listing the differences).
        """
        with self._lock:
            sources = source_bytes(self._tensors(), self.plan)
            version = self.version + 1
            self._whole = False  # until the round completes
            self._core.begin_round(version, False)
            self._stage(sources)
            self.failures = {f.worker: f.reason for f in self._core.finish_round()}
            self._whole, self.version = True, version
            failures = dict(self.failures)
        if failures:
            raise WorkersFailed(version, failures)
        return version

    def _stage(self, sources: list[torch.Tensor]) -> None:
        """Stage and commit every bucket of the round from ``sources`` (see ``source_bytes``)."""
        if all(t.device.type == "cpu" for t in sources):
            # Rust copies every bucket with every core, the GIL released; ``sources`` keeps
            # the tensors alive meanwhile.
            self._core.stage_all([t.data_ptr() for t in sources])
            return
        self._stage_by_bucket(sources)

    def _stage_by_bucket(self, sources: list[torch.Tensor]) -> None:
        """The same, bucket by bucket through torch (device-to-host copies from a GPU)."""
        for b in range(self.plan.num_buckets):
            lease = self._core.acquire_slot(b)
            slot = torch.frombuffer(memoryview(lease), dtype=torch.uint8)
            pack(self.plan, b, sources, slot)
            del slot
            self._core.commit(lease)

    def _serve_catch_up(self) -> None:
        """Send the current version to workers that joined late, straight from the retained
        slots (called by the catch-up thread, :func:`_serve_catch_ups`)."""
        # Never wait for the lock: a publish holds it (and the native publisher's own lock)
        # while it waits for slow readers, and this thread would wait holding the GIL, which
        # those readers need to finish: they would stall until the publisher evicted them.
        # A skipped poll is retried 10 ms later.
        if not self._lock.acquire(blocking=False):
            return
        try:
            if not self._core.catch_up_pending() or not self._whole:
                return  # nobody waits, or a publish was interrupted: joiners get the next one
            self._core.begin_round(self.version, True)
            self._core.resend_all()
            self.failures = {f.worker: f.reason for f in self._core.finish_round()}
            if self.failures:
                log.warning("catch-up of version %d failed for: %s", self.version,
                            "; ".join(f"{w}: {why}" for w, why in self.failures.items()))
        except BroadcastError as err:
            if not self._closed.is_set():
                log.warning("catch-up server: %s", err)
        finally:
            self._lock.release()

    def workers(self) -> list[_native.WorkerStatus]:
        """Every joined worker: its name (``worker``), ``pid``, ``state`` (``"current"``,
        ``"catching-up"`` or ``"evicted"``), ``applied`` (the version it last applied) and
        whether it is ``alive``."""
        return self._core.workers()

    def close(self) -> None:
        """Stop serving: waiting workers fail at once and the shared-memory file is removed.
        Closing twice is harmless."""
        self._closed.set()
        if self._server is not None and self._server is not threading.current_thread():
            self._server.join()
        with self._lock:
            self._core.close()
        _open_publishers.discard(self)

    def __enter__(self) -> WeightPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_open_publishers: weakref.WeakSet[WeightPublisher] = weakref.WeakSet()
"""Publishers not yet closed, for the exit hook (weak: a dropped publisher closes itself)."""


def _serve_catch_ups(publisher_ref: weakref.ref[WeightPublisher], closed: threading.Event) -> None:
    """The catch-up thread of a publisher. It holds the publisher only weakly, between polls,
    so an unclosed publisher can still be collected (which removes its segment)."""
    while not closed.wait(0.01):
        publisher = publisher_ref()
        if publisher is None:
            return
        publisher._serve_catch_up()
        del publisher


@atexit.register
def _close_open_publishers() -> None:
    """At interpreter exit, close every publisher this process left open, so no segment stays
    behind (a forked child leaves its parent's publishers alone)."""
    for publisher in list(_open_publishers):
        if publisher._pid != os.getpid():
            continue
        try:
            publisher.close()
        except Exception as err:  # noqa: BLE001 - close the others regardless
            log.warning("closing broadcast %s at exit: %s", publisher.path, err)


class WeightSubscriber:
    """A rollout worker's end: receives weight versions into its own model.

    The model is checked against the published tensors before the worker joins; a mismatch
    raises :class:`BroadcastError` listing every difference, and no bytes move. A version is
    applied only after every bucket of it has landed, under :attr:`lock`, which readers
    (generation) take too, so they always see one whole version.

    Args:
        tensors: the worker's tensors or module; a sliced tensor has the slice's shape.
        worker: this worker's name (unique among live workers; errors name it).
        name: the broadcast's name (as given to the publisher).
        slices: rows (dim 0) wanted per tensor, e.g. ``{"w": slice(0, 64)}`` or a list of
            expert indices; other tensors are received whole.
        timeout: seconds to wait for the publisher (to appear, and per bucket).
        verify: check every bucket against the publisher's checksum (if it records them).
        strict: whether a published tensor missing from the model is an error.
        swap: land versions in a private buffer and apply them by pointing the model tensors
            at the landed bytes instead of copying them (readers barely wait; see
            ``k2.broadcast.layout.Landing`` for what that forbids).
        in_place: copy each version straight from shared memory into the model once all of
            it has landed: one copy and no landing buffer. Needs a publisher with ``catch_up``
            (the default) and a model of contiguous CPU tensors; None (default) uses it
            whenever it can, unless ``swap``. Readers wait for that one copy; and since the
            worker acknowledges the version only after copying it, ``publish()`` waits until
            each in-place worker's readers let go of :attr:`lock` (a worker whose readers
            hold it past ``timeout`` is evicted and catches up later). Otherwise buckets land
            in a private buffer as they arrive, which is copied (or swapped) in afterwards.
    """

    def __init__(self, tensors: TensorSource, *, worker: str, name: str = "k2",
                 slices: Mapping[str, Rows] | None = None, timeout: float = 30.0,
                 verify: bool = False, strict: bool = True, swap: bool = False,
                 in_place: bool | None = None) -> None:
        self.worker = worker
        self.timeout = timeout
        self.path = segment_path(name)
        model = named_tensors(tensors)()
        self._slices = dict(slices or {})
        announced = _native.ShmSubscriber.announced_plan(self.path, worker, timeout)
        check_model(announced.tensors(), model, self._slices, strict, who=f"worker {worker}")
        self._core = _native.ShmSubscriber(self.path, worker, timeout, verify)
        self.plan = self._core.plan
        if self.plan.tensors() != announced.tensors():  # a new publisher came in between
            self._core.close()
            check_model(self.plan.tensors(), model, self._slices, strict, who=f"worker {worker}")
            self._core = _native.ShmSubscriber(self.path, worker, timeout, verify)
            self.plan = self._core.plan
        unsuitable = ("swap is asked for" if swap else
                      None if self._core.retains else "the publisher keeps only a ring of slots (catch_up=False)")
        unsuitable = unsuitable or InPlace.unsuitable(model)
        if in_place and unsuitable:
            self._core.close()
            raise BroadcastError(f"worker {worker}: cannot apply versions in place: {unsuitable}")
        self._in_place = InPlace(self.plan, model, self._slices) if unsuitable is None and in_place is not False else None
        self._landing = Landing(self.plan, model, self._slices, swap=swap) if self._in_place is None else None
        self.lock = threading.RLock()
        """Held while a version is applied; readers take it to see one whole version."""
        self.version = 0

    def buckets(self, timeout: float | None = None) -> Iterator[Bucket]:
        """The buckets of the next version that includes this worker, as zero-copy leases.

        Waits up to ``timeout`` seconds (default: the subscriber's) for the version to begin;
        yields nothing if none does. Release each bucket (or use it as a context manager)
        before taking the next; one left unreleased is released when the next is requested.
        After the last, call :meth:`mark_applied` once the version is in the model.
        """
        started = self._core.next_round(self.timeout if timeout is None else timeout)
        if started is None:
            return
        for b in range(self.plan.num_buckets):
            bucket = Bucket(self._core, self._core.acquire(b), self.plan, started.version)
            yield bucket
            if not bucket.released:
                bucket.release()

    def update(self, timeout: float | None = None) -> int | None:
        """Receive the next version and apply it to the model.

        Args:
            timeout: seconds to wait for a version to begin (default: the subscriber's
                timeout; 0 polls).

        Returns:
            The applied version, or None if none began within ``timeout``.

        Raises:
            BroadcastError: the publisher vanished or stalled (named), this worker was evicted
                (call :meth:`rejoin`), or a bucket failed its checksum; the model keeps its
                previous version.
        """
        if self._in_place is not None:
            return self._update_in_place(timeout)
        version = None
        for bucket in self.buckets(timeout):
            version = bucket.version
            with bucket:
                self._landing.land(bucket.index, bucket.view())
        if version is None:
            return None
        with self.lock:
            self._landing.apply()
            self.mark_applied(version)
        return version

    @property
    def applies_in_place(self) -> bool:
        """Whether versions are copied straight from shared memory into the model."""
        return self._in_place is not None

    def _update_in_place(self, timeout: float | None) -> int | None:
        started = self._core.next_round(self.timeout if timeout is None else timeout)
        if started is None:
            return None
        self._core.wait_whole()
        with self.lock:
            self._core.copy_in_place(self._in_place.copies())
            self.mark_applied(started.version)
        return started.version

    def mark_applied(self, version: int) -> None:
        """Record that ``version`` is now in the model (for :meth:`buckets` users)."""
        self.version = version
        self._core.applied(version)

    def rejoin(self) -> None:
        """After an eviction: ask the publisher to send the current version again."""
        self._core.rejoin()

    @property
    def published_version(self) -> int:
        """The newest version the publisher delivered in full."""
        return self._core.published_version

    def close(self) -> None:
        """Leave the broadcast."""
        self._core.close()

    def __enter__(self) -> WeightSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
