"""Saving and loading a training run: model, optimizer and training state.

A checkpoint root holds one directory per save (``step-00000100/``) and a ``latest`` file naming
the newest complete one. A checkpoint directory holds:

- ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``: the model's tensors,
  in Hub naming when the model has ``to_hf_state_dict()`` (k2's models), else ``state_dict``
  names; ``config.json`` when the model has a ``config.to_hf_dict()``;
- ``optimizer-*.safetensors`` + ``optimizer.json``: the optimizer's ``state_dict()``, its tensors
  in the shards and the rest (hyper-parameters, structure) as JSON;
- ``train_state-*.safetensors`` + ``train_state.json``: the caller's training state (step, loader
  state, config, ...) and the RNG states of torch, CUDA, numpy and Python's ``random``;
- ``checkpoint.json`` (what saved it and how the model is named) and ``manifest.json``.

All bytes go through the native writer (parallel, fsynced, atomically published, pruned to the
last K); see ``rust/src/checkpoint/writer.rs`` for the order of operations.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from k2 import _native
from k2.checkpoint.reader import CheckpointReader, resolve
from k2.checkpoint.state_tree import decode, encode
from k2.checkpoint.tensors import Entry, entry
from k2.errors import CheckpointError

CHECKPOINT_SHARD_BYTES = 1 << 30  # largest shard of a k2 checkpoint (not the Hub layout: HUB_SHARD_BYTES)
DEFAULT_CHUNK_BYTES = 4 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class LoadResult:
    """What :func:`load` found.

    Attributes:
        path: the checkpoint directory that was read.
        train_state: the training state given to :func:`save` (None if none was saved).
        missing: model tensors the checkpoint lacks.
        unexpected: checkpoint tensors the model does not have.
        mismatched: ``name -> (checkpoint shape, model shape)`` for tensors of the wrong shape.
        bytes_read: bytes the reader hashed or copied.
    """

    path: Path
    train_state: Any
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    bytes_read: int = 0


def model_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors to save for ``model`` and their naming (``"hf"`` or ``"state_dict"``)."""
    if hasattr(model, "to_hf_state_dict"):
        return dict(model.to_hf_state_dict()), "hf"
    return dict(model.state_dict()), "state_dict"


def rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU and every CUDA device), numpy and Python's ``random``."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _next_name(root: Path, step: int | None) -> str:
    if step is not None:
        return f"step-{int(step):08d}"
    taken = [n for n in (_native.list_checkpoints(root) if root.is_dir() else []) if n.startswith("step-")]
    last = max((int(n[5:]) for n in taken if n[5:].isdigit()), default=-1)
    return f"step-{last + 1:08d}"


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1).encode()


def save(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict[str, Any] | None = None,
    *,
    keep_last: int | None = None,
    step: int | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = CHECKPOINT_SHARD_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    durable: bool = True,
    events: list[_native.FsEvent] | None = None,
) -> Path:
    """Save a checkpoint into the root ``directory`` and point ``latest`` at it.

    Args:
        directory: the checkpoint root (created if needed).
        model: any ``nn.Module``.
        optimizer: any torch optimizer; its full ``state_dict()`` is saved.
        train_state: JSON-like training state (numbers, strings, lists, tuples, dicts, tensors,
            numpy arrays): step, loader state, config, ...
        keep_last: keep only this many newest checkpoints in ``directory`` (None: keep all).
        step: names the checkpoint ``step-{step:08d}``; default ``train_state["step"]``, else one
            past the newest ``step-*`` in the root.
        tokenizer_dir: copy its tokenizer files into the checkpoint (``k2 ckpt export-hf`` ships
            them).
        max_shard_bytes: shard size limit; shards are written in parallel whatever their count.
        chunk_bytes: checksum granularity (a slice read hashes whole chunks).
        durable: fsync files and directories; turn off only for benchmarks.
        events: if given, receives the recorded file-system operations (``FsEvent``: ``op``,
            ``path``, ``target``).

    Returns:
        The new checkpoint directory.

    Raises:
        CheckpointError: if a value cannot be saved or the checkpoint exists already.
    """
    root = Path(directory)
    if step is None and isinstance(train_state, dict) and isinstance(train_state.get("step"), int):
        step = train_state["step"]
    final = root / _next_name(root, step)

    tensors, naming = model_state(model)
    groups: list[tuple[str, list[Entry]]] = [("model", [entry(n, t) for n, t in tensors.items()])]
    files: dict[str, bytes] = {}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_hf_dict"):
        files["config.json"] = _json_bytes(config.to_hf_dict())
    if optimizer is not None:
        opt_tensors: dict[str, torch.Tensor] = {}
        structure = encode(optimizer.state_dict(), "optimizer", opt_tensors)
        groups.append(("optimizer", [entry(n, t) for n, t in opt_tensors.items()]))
        files["optimizer.json"] = _json_bytes({"class": type(optimizer).__qualname__, "state_dict": structure})
    state_tensors: dict[str, torch.Tensor] = {}
    structure = encode({"user": train_state, "rng": rng_state()}, "train_state", state_tensors)
    groups.append(("train_state", [entry(n, t) for n, t in state_tensors.items()]))
    files["train_state.json"] = _json_bytes(structure)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                files[name] = (Path(tokenizer_dir) / name).read_bytes()
    files["checkpoint.json"] = _json_bytes(
        {
            "format": "k2-checkpoint",
            "model_naming": naming,
            "model_class": type(model).__qualname__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": torch.__version__,
        }
    )

    writer = _native.CheckpointWriter(final, chunk_bytes=chunk_bytes, durable=durable)
    writer.write_groups(groups, max_shard_bytes)
    for name, data in files.items():
        writer.write_file(name, data)
    recorded = writer.commit(publish_latest=True, keep_last=keep_last)
    if events is not None:
        events.extend(recorded)
    return final


def load(
    directory: str | os.PathLike[str],
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    strict: bool = True,
    verify: bool = True,
    restore_rng: bool = True,
) -> LoadResult:
    """Load a checkpoint into ``model`` and ``optimizer`` (in place).

    Args:
        directory: a checkpoint root (its ``latest`` is loaded) or a checkpoint directory.
        model: the module to load into (None: skip the model).
        optimizer: the optimizer to load into (None: skip it).
        strict: raise if tensors are missing, unexpected or of the wrong shape, or the optimizer
            state is absent; otherwise load what matches and report the rest in the result.
        verify: check every byte against the manifest's checksums first.
        restore_rng: restore the RNG states saved with the checkpoint.

    Returns:
        A :class:`LoadResult` with the training state and what did not match.

    Raises:
        CheckpointError: on a checksum mismatch (naming shard and tensor), a malformed file, or
            (strict) a mismatch between checkpoint and model, listing the tensors by name.
    """
    reader = CheckpointReader(resolve(directory))
    if verify:
        reader.verify()
    result = LoadResult(path=reader.path, train_state=None)

    def stored(name: str) -> torch.Tensor:
        # The optimizer adopts the tensors it is given (the model copies into its parameters):
        # give it memory of its own, or it would pin the checkpoint's files (and their disk
        # space, after pruning) for the rest of the run.
        return reader.tensor(name, verify=False).clone()

    if model is not None:
        _load_model(reader, model, strict, result)
    if optimizer is not None:
        if reader.has_file("optimizer.json"):
            structure = reader.read_json("optimizer.json", verify=verify)["state_dict"]
            try:
                optimizer.load_state_dict(decode(structure, stored))
            except (ValueError, KeyError) as err:
                raise CheckpointError(
                    f"the optimizer state in {reader.path} does not fit {type(optimizer).__name__}: {err}"
                ) from err
        elif strict:
            raise CheckpointError(f"checkpoint {reader.path} holds no optimizer state")
    if reader.has_file("train_state.json"):
        state = decode(reader.read_json("train_state.json", verify=verify), stored)
        result.train_state = state["user"]
        if restore_rng and "rng" in state:
            set_rng_state(state["rng"])
    result.bytes_read = reader.bytes_read
    return result


def _load_model(reader: CheckpointReader, model: torch.nn.Module, strict: bool, result: LoadResult) -> None:
    expected, naming = model_state(model)
    meta = reader.read_json("checkpoint.json", verify=False) if reader.has_file("checkpoint.json") else {}
    if meta.get("model_naming", naming) != naming:
        raise CheckpointError(
            f"checkpoint {reader.path} names model tensors by {meta['model_naming']}, "
            f"but {type(model).__name__} uses {naming} names"
        )
    stored_names = set(reader.names("model"))
    result.missing = [n for n in expected if n not in stored_names]
    result.unexpected = sorted(stored_names - expected.keys())
    for name in stored_names & expected.keys():
        shape = reader.info(name)[1]
        if list(expected[name].shape) != shape:
            result.mismatched[name] = (shape, list(expected[name].shape))
    if strict and (result.missing or result.unexpected or result.mismatched):
        raise CheckpointError(f"checkpoint {reader.path} does not match the model: " + _describe(result))
    loadable = [n for n in expected if n in stored_names and n not in result.mismatched]
    state = {n: reader.tensor(n, verify=False) for n in loadable}
    with torch.no_grad():
        if naming == "hf":
            model.load_hf_state_dict(state, strict=strict)
        else:
            model.load_state_dict(state, strict=strict)


def _describe(result: LoadResult, limit: int = 20) -> str:
    parts = []
    for label, names in (("missing", result.missing), ("unexpected", result.unexpected)):
        if names:
            shown = ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
            parts.append(f"{len(names)} {label}: {shown}")
    if result.mismatched:
        shown = ", ".join(f"{n} {c} vs {m}" for n, (c, m) in list(result.mismatched.items())[:limit])
        parts.append(f"{len(result.mismatched)} of the wrong shape (checkpoint vs model): {shown}")
    return "; ".join(parts)

