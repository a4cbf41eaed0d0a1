"""k2 — an open implementation of the Kimi K2 training system.

The package is laid out as the system is (``docs/architecture.md`` draws the layers):

* ``k2.model``      — the K2 architecture: MLA + ultra-sparse MoE, in plain PyTorch;
* ``k2.optim``      — MuonClip, and the contract between model and optimizers;
* ``k2.parallel``   — how a model is spread over ranks, and what the ranks agree on;
* ``k2.data``       — corpus, tokenizer, chat format, token shards and the loader;
* ``k2.checkpoint`` — crash-safe sharded checkpoints, Hub import and export;
* ``k2.broadcast``  — the weight broadcast that feeds rollout workers;
* ``k2.kernels``    — the CUDA kernels, each beside its PyTorch reference;
* ``k2.train``      — the run harness and pretraining (``k2 train``);
* ``k2.errors``     — the exceptions every part raises; ``k2.optional`` — optional extras;
* ``k2.cli``        — the ``k2`` command (also ``python -m k2``);
* ``k2._native``    — the Rust extension that moves bytes (checkpoints, weight broadcast, tokens).

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
