"""Type stub for ``k2._native``, k2's Rust extension (built by maturin from ``rust/``).

Every function here releases the GIL for its heavy work, turns a Rust panic into
:class:`k2.errors.K2Error`, and lets Ctrl-C interrupt it.
"""

from collections.abc import Buffer
from os import PathLike

import numpy as np
import numpy.typing as npt

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


class ShardWriter:
    """Writes one token shard (docs/token-shards.md), document by document.

    The bytes go to ``PATH.partial``; ``finish()`` writes the header, syncs and renames, so a
    shard under its real name is always complete.

    Raises:
        k2.errors.K2IOError: the file cannot be created.
        k2.errors.DataError: ``vocab_size`` is 0.
    """

    def __init__(self, path: str | PathLike[str], vocab_size: int) -> None: ...
    def add_documents(self, tokens: npt.NDArray[np.uint32], lengths: npt.NDArray[np.int64]) -> None:
        """Append documents: ``tokens`` back to back, ``lengths[i]`` tokens each. Runs without
        the GIL.

        Raises:
            k2.errors.DataError: the lengths do not add up, or a token is outside the vocabulary
                (the message gives the document and position).
        """
    def finish(self) -> dict[str, int]:
        """Complete the shard; returns ``{"tokens", "documents", "checksum"}``."""

def inspect_shard(path: str | PathLike[str]) -> dict[str, int]:
    """Validate a shard fully (checksum included) and return its header:
    ``{"version", "vocab_size", "token_bytes", "tokens", "documents", "checksum"}``.

    Raises:
        k2.errors.K2IOError: the file cannot be opened.
        k2.errors.DataError: the file is not a valid shard (the message names it and says why).
    """

class BatchBuffer:
    """The memory behind one batch array (the array's ``base``): a buffer from the loader's
    pool, returned to the pool when the last array using it is freed. Not created from Python."""

class TokenLoader:
    """The native loader behind ``k2.data.TokenLoader`` (use that one)."""

    def __init__(
        self,
        paths: list[str],
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 4,
        threads: int = 2,
        verify: bool = True,
    ) -> None: ...
    @property
    def steps_per_epoch(self) -> int: ...
    @property
    def num_samples(self) -> int: ...
    @property
    def token_count(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def buffered(self) -> int:
        """Batches produced ahead and waiting."""
    def next_batch(
        self,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], int, int]:
        """``(inputs, targets, positions, epoch, step)``; waits without the GIL."""
    def state(self) -> dict[str, int]:
        """``{"epoch", "step", "seed", "seq_len", "global_batch", "num_samples", "fingerprint"}``."""
    def load_state(self, state: dict[str, int]) -> None:
        """Resume from ``state()``; raises ``k2.errors.DataError`` if it does not match."""
