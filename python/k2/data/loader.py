"""``TokenLoader``: deterministic, resumable, prefetching batches of token ids.

The heavy lifting is in Rust (``rust/src/data/``): the shards are memory-mapped; background
threads, which never take the GIL, cut samples from the packed token stream, widen them to
int64 and queue the batches in order; waiting for a batch releases the GIL too.

Sampling, in short (the details are in ``rust/src/data/sampler.rs``):

* the stream of ``T`` tokens holds ``N = (T - 1) // seq_len`` samples; sample ``i`` has inputs
  ``stream[i*seq_len : (i+1)*seq_len]`` and targets shifted by one;
* each epoch visits the samples in a new order, a permutation seeded by ``(seed, epoch)``;
* step ``s`` reads the global batch of ``world_size * batch_size`` samples at positions
  ``[s*G, (s+1)*G)`` of that order, and rank ``r`` takes the ``r``-th block of ``batch_size`` of
  them: the ranks step in lockstep, and their batches together are exactly the batch a single
  process with ``batch_size * world_size`` would read;
* every rank has ``len(loader) = N // G`` steps per epoch; the last ``N % G`` samples of each
  epoch's order are dropped (a different few each epoch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from k2 import _native
from k2.data.manifest import read_manifest
from k2.errors import ConfigError, DataError

STATE_VERSION = 1


class Batch(NamedTuple):
    """One rank's batch. The arrays are fresh int64 ``[batch_size, seq_len]`` arrays owned by
    Python; ``torch.from_numpy`` wraps them without copying."""

    inputs: np.ndarray
    targets: np.ndarray
    """``inputs`` shifted by one token: what each position should predict."""
    positions: np.ndarray
    """Each input token's position within its document (0 at every document start)."""
    epoch: int
    step: int
    loss_mask: np.ndarray
    """1 where ``targets`` is a training target, 0 where the loss skips it (SFT trains on
    assistant tokens only). For shards without a loss mask it is all ones: one read-only array
    shared by every batch of the loader, so pretraining pays nothing for it
    (docs/token-shards.md)."""


def shard_paths(
    path: str | PathLike[str] | Sequence[str | PathLike[str]], split: str
) -> list[Path]:
    """The shard files a loader reads.

    Args:
        path: a prepared data directory (its ``manifest.json`` lists the shards of ``split``),
            one ``.k2tok`` shard, or a list of shards.
        split: ``"train"`` or ``"validation"``; used for directories only.

    Raises:
        DataError: the manifest is missing or malformed, or lacks the split, or a listed
            shard's header disagrees with the manifest (it was replaced), naming the shard.
    """
    if isinstance(path, (list, tuple)):
        return [Path(p) for p in path]
    path = Path(path)
    if not path.is_dir():
        return [path]
    manifest = read_manifest(path)
    manifest.check_shards(split)
    return manifest.shard_paths(split)


def read_tokens(
    path: str | PathLike[str] | Sequence[str | PathLike[str]], split: str = "train"
) -> np.ndarray:
    """Every token of a split (or of the given shards), concatenated, as one int64 array.

    Each shard is validated in full (header, size, checksum, and against the manifest for a
    prepared directory) before its tokens are read, so a corrupt or replaced shard raises
    instead of returning garbage. Meant for whole-split statistics (the
    n-gram baselines); training reads through :class:`TokenLoader`.

    Raises:
        DataError: a shard is missing, corrupt or from a newer format.
    """
    arrays = []
    for shard in shard_paths(path, split):
        header = _native.inspect_shard(str(shard))
        dtype = np.uint16 if header["token_bytes"] == 2 else np.uint32
        arrays.append(np.fromfile(shard, dtype=dtype, count=header["tokens"], offset=64))
    return np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)


def read_loss_mask(
    path: str | PathLike[str] | Sequence[str | PathLike[str]], split: str = "train"
) -> np.ndarray:
    """The loss mask of every token of a split (or of the given shards), aligned with
    :func:`read_tokens`, as one uint8 array of 0/1: ones for shards without a mask.

    Raises:
        DataError: a shard is missing, corrupt or from a newer format.
    """
    arrays = []
    for shard in shard_paths(path, split):
        header = _native.inspect_shard(str(shard))
        count = header["tokens"]
        if not header["loss_mask"]:
            arrays.append(np.ones(count, np.uint8))
            continue
        index_at = -(-(64 + count * header["token_bytes"]) // 8) * 8
        mask_at = index_at + 8 * (header["documents"] + 1)
        arrays.append(np.fromfile(shard, dtype=np.uint8, count=count, offset=mask_at))
    return np.concatenate(arrays) if arrays else np.zeros(0, np.uint8)


class TokenLoader:
    """Batches of ``[batch_size, seq_len]`` token ids for one rank.

    Iterating yields the batches from the current position to the end of the current epoch
    (a full epoch when it starts at step 0); :meth:`next_batch` runs on forever, rolling over
    into the next epoch with a new order.

    Args:
        path: a prepared data directory, a shard file, or a list of shard files.
        seq_len: tokens per sample.
        batch_size: samples per batch on this rank.
        seed: the shuffle seed; the same seed gives the same order on every machine.
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks.
        split: which split of a prepared directory to read.
        prefetch: batches produced ahead of the consumer.
        threads: background threads producing them.
        verify: recompute the shards' checksums when opening them.

    Raises:
        ConfigError: an argument is out of range.
        DataError: a shard is missing, corrupt or from a newer format, or the data holds fewer
            samples than one global batch.
    """

    def __init__(
        self,
        path: str | PathLike[str] | Sequence[str | PathLike[str]],
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        split: str = "train",
        prefetch: int = 4,
        threads: int = 2,
        verify: bool = True,
    ) -> None:
        for name, value, low in (
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("rank", rank, 0),
            ("seed", seed, 0),
            ("prefetch", prefetch, 1),
            ("threads", threads, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"TokenLoader {name} must be an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise ConfigError(f"TokenLoader rank {rank} must be below world_size {world_size}")
        self.paths = shard_paths(path, split)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self._ones: np.ndarray | None = None
        self._native = _native.TokenLoader(
            [str(p) for p in self.paths],
            seq_len,
            batch_size,
            seed,
            rank,
            world_size,
            prefetch,
            threads,
            verify,
        )

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        return self._native.steps_per_epoch

    @property
    def num_samples(self) -> int:
        """Samples of ``seq_len + 1`` tokens in the stream (before each epoch's remainder is
        dropped)."""
        return self._native.num_samples

    @property
    def token_count(self) -> int:
        return self._native.token_count

    @property
    def vocab_size(self) -> int:
        return self._native.vocab_size

    @property
    def has_loss_mask(self) -> bool:
        """Whether any shard carries a loss mask (else :attr:`Batch.loss_mask` is all ones)."""
        return self._native.has_loss_mask

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._native.state()["epoch"]

    @property
    def step(self) -> int:
        """The step, within its epoch, of the next batch."""
        return self._native.state()["step"]

    @property
    def buffered(self) -> int:
        """Batches the background threads have produced ahead of the consumer."""
        return self._native.buffered

    def next_batch(self) -> Batch:
        """The next batch, rolling over into the next epoch after the last step."""
        native = self._native.next_batch()
        mask = native.loss_mask
        if mask is None:  # no shard has a mask: every target counts
            if self._ones is None:
                self._ones = np.ones((self.batch_size, self.seq_len), np.int64)
                self._ones.setflags(write=False)
            mask = self._ones
        return Batch(native.inputs, native.targets, native.positions, native.epoch, native.step, mask)

    def __iter__(self) -> Iterator[Batch]:
        state = self._native.state()
        for _ in range(len(self) - state["step"]):
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch the caller will get (batches the threads have read
        ahead do not count), and what a resuming loader must share: seed, seq_len, global batch
        size, sample count and a fingerprint of the data. Plain ints, so it fits JSON and
        ``torch.save``."""
        return {"version": STATE_VERSION, **self._native.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next batch is the one the saving loader would
        have returned next. Read-ahead batches are discarded.

        Raises:
            DataError: the state is malformed, or from different data, seed, ``seq_len`` or
                global batch size (``world_size * batch_size``).
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"not a TokenLoader state of version {STATE_VERSION}: {state!r}")
        self._native.load_state(state)
