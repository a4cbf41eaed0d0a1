"""Type stub for ``k2._native``, k2's Rust extension (built by maturin from ``rust/``).

Every function here releases the GIL for its heavy work, turns a Rust panic into
:class:`k2.errors.K2Error`, and lets Ctrl-C interrupt it.
"""

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import final

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer, Self

__all__ = [
    "__version__",
    "xxh3_64",
    "xxh3_64_file",
    "ShardWriter",
    "TokenLoader",
    "TokenBatch",
    "BatchBuffer",
    "inspect_shard",
    "copy_ranges",
    "BucketPlan",
    "BucketLease",
    "ShmPublisher",
    "ShmSubscriber",
    "TensorSpec",
    "Chunk",
    "ByteRange",
    "Target",
    "Piece",
    "ReceivePlan",
    "RoundInfo",
    "WorkerStatus",
    "WorkerFailure",
    "CheckpointWriter",
    "CheckpointReader",
    "FsEvent",
    "StoredTensor",
    "plan_shards",
    "shard_file_name",
    "read_latest",
    "list_checkpoints",
    "CHECKPOINT_FAULT_PHASES",
]

__version__: str
"""The crate's version; equals ``k2.__version__``."""

def xxh3_64(data: Buffer) -> int:
    """XXH3-64 (seed 0) of a C-contiguous bytes-like object.

    This is the checksum that checkpoint manifests and token shards record.

    Raises:
        ValueError: if the buffer is not C-contiguous.
    """

def xxh3_64_file(path: str | PathLike[str]) -> int:
    """XXH3-64 (seed 0) of a file's contents, read in 1 MiB blocks.

    Raises:
        k2.errors.K2IOError: naming the file, if it cannot be opened or read.
    """

# --- token pipeline (rust/src/data/, rust/src/py/data.rs) ----------------------------------


@final
class ShardWriter:
    """Writes one token shard (docs/token-shards.md), document by document.

    The bytes go to ``PATH.partial``; ``finish()`` writes the header, syncs and renames, so a
    shard under its real name is always complete.

    Raises:
        k2.errors.K2IOError: the file cannot be created.
        k2.errors.DataError: ``vocab_size`` is 0.
    """

    def __new__(cls, path: str | PathLike[str], vocab_size: int, loss_mask: bool = False) -> Self: ...
    def add_documents(
        self,
        tokens: npt.NDArray[np.uint32],
        lengths: npt.NDArray[np.int64],
        loss_mask: npt.NDArray[np.uint8] | None = None,
    ) -> None:
        """Append documents: ``tokens`` back to back, ``lengths[i]`` tokens each, and with a
        ``loss_mask`` writer one 0/1 ``loss_mask`` value per token. Runs without the GIL.

        Raises:
            k2.errors.DataError: the lengths do not add up, or a token is outside the vocabulary
                (the message gives the document and position).
        """
    def finish(self) -> dict[str, int]:
        """Complete the shard; returns ``{"tokens", "documents", "checksum"}``."""

def inspect_shard(path: str | PathLike[str]) -> dict[str, int]:
    """Validate a shard fully (checksum included) and return its header:
    ``{"version", "vocab_size", "token_bytes", "tokens", "documents", "checksum", "loss_mask"}``
    (``loss_mask``: a bool, whether the shard carries one).

    Raises:
        k2.errors.K2IOError: the file cannot be opened.
        k2.errors.DataError: the file is not a valid shard (the message names it and says why).
    """

@final
class BatchBuffer:
    """The memory behind one batch array (the array's ``base``): a buffer from the loader's
    pool, returned to the pool when the last array using it is freed. Not created from Python."""

@final
class TokenBatch:
    """One batch of ``TokenLoader.next_batch()``: int64 ``[batch_size, seq_len]`` arrays, the
    ``epoch`` and ``step`` it belongs to, and the targets' 0/1 ``loss_mask`` (None when no shard
    carries a mask)."""

    @property
    def inputs(self) -> npt.NDArray[np.int64]: ...
    @property
    def targets(self) -> npt.NDArray[np.int64]: ...
    @property
    def positions(self) -> npt.NDArray[np.int64]: ...
    @property
    def epoch(self) -> int: ...
    @property
    def step(self) -> int: ...
    @property
    def loss_mask(self) -> npt.NDArray[np.int64] | None: ...

@final
class TokenLoader:
    """The native loader behind ``k2.data.TokenLoader`` (use that one)."""

    def __new__(
        cls,
        paths: list[str],
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 4,
        threads: int = 2,
        verify: bool = True,
    ) -> Self: ...
    @property
    def steps_per_epoch(self) -> int: ...
    @property
    def num_samples(self) -> int: ...
    @property
    def token_count(self) -> int: ...
    @property
    def has_loss_mask(self) -> bool: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def buffered(self) -> int:
        """Batches produced ahead and waiting."""
    def next_batch(self) -> TokenBatch:
        """The next batch; waits without the GIL."""
    def state(self) -> dict[str, int]:
        """``{"epoch", "step", "seed", "seq_len", "global_batch", "num_samples", "fingerprint"}``."""
    def load_state(self, state: dict[str, int]) -> None:
        """Resume from ``state()``; raises ``k2.errors.DataError`` if it does not match."""

# --------------------------------------------------------------------------------------------
# Weight broadcast (k2.broadcast): the bucket plan and the shared-memory protocol. Use them
# through k2.broadcast.WeightPublisher / WeightSubscriber; these are the native pieces.

@final
class TensorSpec:
    """One tensor of a bucket plan: its name, dtype name (torch's, e.g. ``"bfloat16"``), shape
    and element size in bytes. Compares by value, prints readably, pickles."""

    def __new__(cls, name: str, dtype: str, shape: list[int], itemsize: int) -> Self: ...
    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def itemsize(self) -> int: ...
    def __getnewargs__(self) -> tuple[str, str, list[int], int]: ...

@final
class Chunk:
    """A piece of plan tensor ``tensor`` (its index) held in a bucket: ``nbytes`` bytes from
    byte ``tensor_offset`` of the tensor, at byte ``bucket_offset`` of the bucket."""

    def __new__(cls, tensor: int, tensor_offset: int, bucket_offset: int, nbytes: int) -> Self: ...
    @property
    def tensor(self) -> int: ...
    @property
    def tensor_offset(self) -> int: ...
    @property
    def bucket_offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def __getnewargs__(self) -> tuple[int, int, int, int]: ...

@final
class ByteRange:
    """A window of bytes ``start..end``."""

    def __new__(cls, start: int, end: int) -> Self: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    def __getnewargs__(self) -> tuple[int, int]: ...

@final
class Target:
    """Where a subscriber's wanted bytes of plan tensor ``tensor`` land: ``nbytes`` bytes at
    ``landing_offset`` of its landing layout."""

    def __new__(cls, tensor: int, landing_offset: int, nbytes: int) -> Self: ...
    @property
    def tensor(self) -> int: ...
    @property
    def landing_offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def __getnewargs__(self) -> tuple[int, int, int]: ...

@final
class Piece:
    """One copy of a receive plan: ``nbytes`` bytes from ``bucket_offset`` of a bucket to
    ``landing_offset`` of the landing layout."""

    def __new__(cls, bucket_offset: int, landing_offset: int, nbytes: int) -> Self: ...
    @property
    def bucket_offset(self) -> int: ...
    @property
    def landing_offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def __getnewargs__(self) -> tuple[int, int, int]: ...

@final
class ReceivePlan:
    """A subscriber's copies: the landing layout's size, where each wanted tensor lands (in
    landing order), and per bucket the pieces to copy."""

    def __new__(cls, landing_bytes: int, targets: list[Target], pieces: list[list[Piece]]) -> Self: ...
    @property
    def landing_bytes(self) -> int: ...
    @property
    def targets(self) -> list[Target]: ...
    @property
    def pieces(self) -> list[list[Piece]]: ...
    def __getnewargs__(self) -> tuple[int, list[Target], list[list[Piece]]]: ...

@final
class RoundInfo:
    """A round that includes this worker: its id and the weight version it carries."""

    def __new__(cls, round: int, version: int) -> Self: ...
    @property
    def round(self) -> int: ...
    @property
    def version(self) -> int: ...
    def __getnewargs__(self) -> tuple[int, int]: ...

@final
class WorkerStatus:
    """A joined worker as the publisher sees it: ``state`` is ``"current"``,
    ``"catching-up"`` or ``"evicted"``; ``applied`` the version it last applied."""

    def __new__(cls, worker: str, pid: int, state: str, applied: int, alive: bool) -> Self: ...
    @property
    def worker(self) -> str: ...
    @property
    def pid(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def applied(self) -> int: ...
    @property
    def alive(self) -> bool: ...
    def __getnewargs__(self) -> tuple[str, int, str, int, bool]: ...

@final
class WorkerFailure:
    """A worker the publisher gave up on during a round, and why."""

    def __new__(cls, worker: str, pid: int, reason: str) -> Self: ...
    @property
    def worker(self) -> str: ...
    @property
    def pid(self) -> int: ...
    @property
    def reason(self) -> str: ...
    def __getnewargs__(self) -> tuple[str, int, str]: ...

@final
class BucketPlan:
    """Tensors packed 256-byte aligned into fixed-size buckets.

    Tensors lie in one flat arena in the given order, each at a 256-byte aligned offset; a
    tensor that fits in a bucket never straddles two, a larger one runs through several.

    Args:
        tensors: a ``TensorSpec`` (or ``(name, dtype, shape, itemsize)`` tuple) per tensor, in
            packing order.
        bucket_bytes: bucket size, a positive multiple of 256.

    Raises:
        k2.errors.BroadcastError: for a bad bucket size, a repeated or malformed name.
    """

    def __new__(cls, tensors: Sequence[TensorSpec | tuple[str, str, list[int], int]], bucket_bytes: int) -> Self: ...
    @property
    def bucket_bytes(self) -> int: ...
    @property
    def num_buckets(self) -> int: ...
    @property
    def arena_bytes(self) -> int:
        """Bytes from the arena's start to the end of the last tensor."""
    def tensors(self) -> list[TensorSpec]:
        """Every tensor, in plan order."""
    def offsets(self) -> list[int]:
        """Arena offset of every tensor, in plan order."""
    def bucket_range(self, bucket: int) -> ByteRange:
        """The arena window of a bucket (the last may be short)."""
    def chunks(self, bucket: int) -> list[Chunk]:
        """Every tensor piece in a bucket, in bucket order."""
    def receive_plan(self, wants: Sequence[tuple[int, Sequence[tuple[int, int]] | None]]) -> ReceivePlan:
        """One subscriber's copies.

        Args:
            wants: ``(tensor index, row ranges or None for all of it)`` per wanted tensor; row
                ranges are ``(start, stop)`` along dim 0, laid out in the order given.

        Raises:
            k2.errors.BroadcastError: a row range outside its tensor.
        """

@final
class BucketLease:
    """A bucket slot lent out as a buffer over the shared memory itself.

    ``memoryview(lease)`` / ``torch.frombuffer(memoryview(lease), dtype=torch.uint8)`` are
    zero-copy views, valid until the lease is released (subscriber) or committed (publisher):
    both are refused while a view is alive, and a released lease refuses new views (raising
    ``k2.errors.BroadcastError``). Subscribers must treat the bytes as read-only.
    """

    @property
    def bucket(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def released(self) -> bool: ...
    @property
    def views(self) -> int:
        """Buffer views of the lease currently alive."""
    def __buffer__(self, flags: int, /) -> memoryview: ...

def copy_ranges(jobs: list[tuple[int, int, int]]) -> None:
    """Internal: ``(src, dst, nbytes)`` copies between raw addresses, every core, no GIL,
    streaming stores for long ones; the caller keeps the ranges alive, disjoint and untouched."""

@final
class ShmPublisher:
    """The publishing end of a shared-memory segment (a file, normally in /dev/shm).

    Args:
        path: the segment's file; replaced if a dead or closed publisher left one.
        plan: the bucket plan.
        checksums: record an XXH3-64 checksum with every bucket.
        timeout: seconds to wait for a worker before evicting it.
        retain: one slot per bucket, so the newest version stays whole in shared memory
            (else a ring of two slots).

    Raises:
        k2.errors.BroadcastError: a live publisher already serves ``path``.
        k2.errors.K2IOError: the file cannot be created or mapped.
    """

    def __new__(cls, path: str | PathLike[str], plan: BucketPlan, checksums: bool, timeout: float,
                 retain: bool) -> Self: ...
    @property
    def retains(self) -> bool:
        """Whether every bucket has a slot of its own."""
    @property
    def published_version(self) -> int:
        """The newest version delivered in full (0 before the first)."""
    def workers(self) -> list[WorkerStatus]:
        """Every joined worker."""
    def catch_up_pending(self) -> bool:
        """Whether a live worker waits to be sent the published version."""
    def begin_round(self, version: int, catch_up: bool) -> int:
        """Start a round carrying ``version`` (or, with ``catch_up``, the published version to
        the workers that asked for it); returns the number of workers in it. On a retained
        segment a publish round first waits (bounded, no GIL) for workers still copying the
        previous version into their models."""
    def stage_all(self, sources: list[int]) -> None:
        """Internal: stage and commit every bucket from CPU memory (no GIL, every core);
        ``sources[t]`` is the address of plan tensor ``t``'s contiguous bytes, kept alive and
        unmodified by the caller during the call."""
    def resend_all(self) -> None:
        """Re-announce every bucket of a retained segment in a catch-up round (no copy)."""
    def acquire_slot(self, bucket: int) -> BucketLease:
        """Wait (bounded, no GIL) until the bucket's slot is free; lend it out, writable."""
    def commit(self, lease: BucketLease) -> None:
        """Publish the filled slot (refused while a view of the lease is alive)."""
    def finish_round(self) -> list[WorkerFailure]:
        """Wait (bounded, no GIL) for the last acknowledgements; returns every worker that
        failed during the round."""
    def close(self) -> None:
        """Close: waiting workers fail at once, the file is removed."""

@final
class ShmSubscriber:
    """A worker's end of a shared-memory segment.

    Args:
        path: the segment's file.
        worker: this worker's name (1-64 bytes, unique among live workers).
        timeout: seconds to wait for a live publisher, and for every later wait.
        verify: check each bucket's checksum (when the publisher records them).

    Raises:
        k2.errors.BroadcastError: no live publisher within the timeout (at once if the
            segment's publisher exited without closing it), or the name is taken.
    """

    def __new__(cls, path: str | PathLike[str], worker: str, timeout: float, verify: bool) -> Self: ...
    @staticmethod
    def announced_plan(path: str | PathLike[str], worker: str, timeout: float) -> BucketPlan:
        """The plan announced at ``path``, read without joining; ``worker`` names the caller
        in errors. A segment whose publisher exited without closing it fails at once."""
    @property
    def plan(self) -> BucketPlan: ...
    @property
    def published_version(self) -> int: ...
    def next_round(self, timeout: float) -> RoundInfo | None:
        """Wait up to ``timeout`` seconds (no GIL) for a round that includes this worker, or
        return None. Raises ``BroadcastError`` if the publisher is gone or
        evicted this worker."""
    def acquire(self, bucket: int) -> BucketLease:
        """Wait (bounded, no GIL) for a bucket of the current round and lend it out; raises
        ``BroadcastError`` naming the worker and bucket on timeout or checksum mismatch."""
    def release(self, lease: BucketLease) -> None:
        """Acknowledge the bucket (refused while a view of it is alive); raises
        ``BroadcastError`` if it was overwritten while read (the worker was evicted)."""
    @property
    def retains(self) -> bool:
        """Whether the publisher keeps the whole version in shared memory."""
    def wait_whole(self) -> None:
        """Retained segments: wait (bounded, no GIL) until every bucket of the current round
        has landed, verifying checksums if asked."""
    def copy_in_place(self, copies: list[list[tuple[int, int, int]]]) -> None:
        """Internal: after :meth:`wait_whole`, perform ``copies[b]`` = ``(bucket_offset,
        address, nbytes)`` for every bucket (no GIL, every core), acknowledging each bucket;
        the destinations must be memory the caller owns and lets nothing else touch."""
    def applied(self, version: int) -> None:
        """Record that ``version`` is in the model."""
    def rejoin(self) -> None:
        """After an eviction, ask to be sent the current version again."""
    def close(self) -> None:
        """Leave the segment."""

# --- checkpoints (rust/src/checkpoint/, bindings in rust/src/py/checkpoint.rs) ---------------

CHECKPOINT_FAULT_PHASES: list[str]
"""The save's fault-injection points, in order. With ``K2_CKPT_FAULT=<phase>`` in the
environment, a save kills its process (SIGKILL) on reaching that phase."""

_TensorEntry = tuple[str, str, list[int], Buffer]
"""A tensor to write: ``(name, safetensors dtype, shape, C-contiguous bytes)``."""

_Piece = tuple[str, str, int, int]
"""One row piece of a tensor: ``(shard file, stored tensor name, first row, end row)``."""

@final
class CheckpointWriter:
    """Writes one checkpoint directory: shards in parallel into ``.k2-tmp-NAME`` beside it, then
    :meth:`commit` fsyncs, renames it into place and optionally moves the parent's ``latest``.

    Args:
        final_dir: the directory to create; it must not exist.
        chunk_bytes: checksum granularity (also the parallel write unit).
        durable: fsync files and directories (off only to measure page-cache writes).
        join: write into the staging directory another writer of ``final_dir`` created (the
            other ranks of a sharded save); such a writer hands its :meth:`part` to that one
            (:meth:`merge_part`) instead of committing.

    Raises:
        k2.errors.CheckpointError: if ``final_dir`` exists.
    """

    def __new__(cls, final_dir: str | PathLike[str], *, chunk_bytes: int = ..., durable: bool = True,
                join: bool = False) -> Self: ...
    def write_groups(self, groups: list[tuple[str, list[_TensorEntry]]], max_shard_bytes: int) -> list[str]:
        """Write each group as ``GROUP-0000i-of-0000N.safetensors`` shards (at most
        ``max_shard_bytes``, at least one per writer thread when large), all in parallel.
        Returns the shard file names."""
    def write_shard(self, file_name: str, group: str, tensors: list[_TensorEntry]) -> None:
        """Write one shard file listed under ``group`` (for streaming conversions)."""
    def write_shards(self, shards: list[tuple[str, str, list[_TensorEntry]]]) -> None:
        """Write shard files ``(file_name, group, tensors)`` all in parallel, each listed under
        its group in that group's index."""
    def part(self) -> bytes:
        """A joined writer's hand-over (JSON bytes) for the committing writer's
        :meth:`merge_part`; the writer is finished afterwards."""
    def merge_part(self, part: bytes) -> None:
        """Take over the shards a joined writer wrote (its :meth:`part` bytes)."""
    def add_pieces(self, name: str, dtype: str, shape: list[int], pieces: list[_Piece]) -> None:
        """Record a tensor stored in row pieces (checked against the shards at commit)."""
    def write_file(self, file_name: str, data: bytes) -> None:
        """Write a small non-tensor file (JSON, tokenizer files)."""
    def commit(self, *, publish_latest: bool, keep_last: int | None = None) -> list[FsEvent]:
        """Write the group indexes and manifest, fsync, rename into place; with
        ``publish_latest`` move the parent's ``latest`` and keep the newest ``keep_last``.
        Returns the recorded file-system operations, in order."""

@final
class FsEvent:
    """One recorded file-system operation of a commit: ``op`` is one of ``write``, ``fsync``,
    ``rename``, ``dir_fsync``, ``remove``; ``target`` is the new path of a rename. Compares by
    value, prints readably, pickles."""

    def __new__(cls, op: str, path: str, target: str | None) -> Self: ...
    @property
    def op(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def target(self) -> str | None: ...
    def __getnewargs__(self) -> tuple[str, str, str | None]: ...

@final
class StoredTensor:
    """One stored tensor: its name, dtype name (safetensors', e.g. ``"BF16"``), shape and the
    shard file that holds it. Compares by value, prints readably, pickles."""

    def __new__(cls, name: str, dtype: str, shape: list[int], file: str) -> Self: ...
    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def file(self) -> str: ...
    def __getnewargs__(self) -> tuple[str, str, list[int], str]: ...

@final
class CheckpointReader:
    """A checkpoint directory, memory-mapped, its headers checked against the manifest.

    A Hub directory of ``.safetensors`` files (no manifest) opens too but cannot be verified.

    Raises:
        k2.errors.CheckpointError: naming the file, for a truncated shard, an absurd header
            length, or a header that disagrees with the manifest.
    """

    def __new__(cls, dir: str | PathLike[str]) -> Self: ...
    @property
    def dir(self) -> Path: ...
    @property
    def has_manifest(self) -> bool: ...
    @property
    def bytes_read(self) -> int:
        """Bytes hashed or copied so far (unverified zero-copy arrays are not counted)."""
    def tensors(self) -> list[StoredTensor]:
        """Every tensor, in file order."""
    def pieces(self) -> list[tuple[str, str, list[int], list[_Piece]]]:
        """The tensors stored in row pieces: ``(name, dtype, whole shape, pieces in row order)``."""
    def verify(self) -> None:
        """Check every chunk and file against the manifest, in parallel.

        Raises:
            k2.errors.CheckpointError: naming the shard, tensor and chunk of a mismatch.
        """
    def array(self, name: str, *, verify: bool = True) -> npt.NDArray[np.uint8]:
        """A tensor's bytes as a ``uint8`` array over the (private, copy-on-write) map."""
    def rows(self, name: str, start: int, stop: int, *, verify: bool = True) -> npt.NDArray[np.uint8]:
        """Rows ``start:stop`` (first dimension) of a tensor, reading only the chunks they overlap."""
    def read_file(self, name: str, *, verify: bool = True) -> bytes:
        """A non-tensor file of the checkpoint, checked against the manifest when ``verify``."""

def plan_shards(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
    """Cut tensors of these byte sizes, in order, into shards of at most ``max_shard_bytes``."""

def shard_file_name(group: str, index: int, count: int) -> str:
    """``GROUP-0000{index+1}-of-0000{count}.safetensors``."""

def read_latest(root: str | PathLike[str]) -> str | None:
    """The checkpoint name ``ROOT/latest`` holds, or None."""

def list_checkpoints(root: str | PathLike[str]) -> list[str]:
    """The complete checkpoints (directories with a manifest) in ``root``, sorted by name."""
