"""Type stub for ``k2._native``, k2's Rust extension (built by maturin from ``rust/``).

Every function here releases the GIL for its heavy work, turns a Rust panic into
:class:`k2.errors.K2Error`, and lets Ctrl-C interrupt it.
"""

from collections.abc import Buffer
from os import PathLike

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
