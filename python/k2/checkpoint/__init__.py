"""Crash-safe, checksummed, sharded checkpoints (docs/checkpoints.md).

Save and resume a training run::

    from k2 import checkpoint
    checkpoint.save("runs/x/ckpt", model, optimizer, {"step": 100, "loader": loader.state_dict()},
                    keep_last=3)
    result = checkpoint.load("runs/x/ckpt", model, optimizer)   # the newest complete one
    step = result.train_state["step"]

Read a few tensors, rows or experts without reading the rest::

    reader = checkpoint.CheckpointReader("runs/x/ckpt")
    rows = reader.rows("model.embed_tokens.weight", 0, 1024)
    experts = reader.experts(layer=3, experts=[0, 5])

The bytes are moved by the Rust core (``rust/src/checkpoint/``): shards are written in parallel
without the GIL into a temporary directory, fsynced, renamed into place, and only then named by
``latest``; reads are memory-mapped and every chunk is verified against the manifest's XXH3
checksums. ``k2 ckpt inspect|verify|export-hf|import-hf`` work on the same directories.
"""

from k2._native import CHECKPOINT_FAULT_PHASES as FAULT_PHASES
from k2.checkpoint.hub import export_hf, import_hf
from k2.checkpoint.reader import CheckpointReader, resolve
from k2.checkpoint.store import LoadResult, load, save

__all__ = [
    "FAULT_PHASES",
    "CheckpointReader",
    "LoadResult",
    "export_hf",
    "import_hf",
    "load",
    "resolve",
    "save",
]
