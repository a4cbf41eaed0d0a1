"""k2 — an open implementation of the Kimi K2 training system.

The package is laid out as the system is:

* ``k2.errors``  — the exceptions every part raises;
* ``k2.cli``     — the ``k2`` command (also ``python -m k2``);
* ``k2._native`` — the Rust extension that moves bytes (checkpoints, weight broadcast, tokens).

Note: the PyPI name ``k2`` belongs to an unrelated project (k2-fsa). This one is distributed as
``k2-train`` and imports as ``k2``.
"""

from __future__ import annotations

from k2 import _native
from k2.errors import (
    BroadcastError,
    CheckpointError,
    ConfigError,
    DataError,
    K2Error,
    K2IOError,
    KernelError,
)

__version__: str = _native.__version__

__all__ = [
    "__version__",
    "K2Error",
    "K2IOError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "BroadcastError",
    "KernelError",
]
