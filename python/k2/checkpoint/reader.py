"""Reading checkpoint tensors: whole, by row range, or a subset of experts.

Tensors come back as torch tensors over the checkpoint's memory maps (no copy), except tensors a
sharded run stored in row pieces (one per rank; the manifest's ``pieces``, see
docs/checkpoints.md), which a whole or a multi-piece read assembles into memory of its own. Each read
verifies the chunks it touches unless ``verify=False``; :attr:`CheckpointReader.bytes_read`
counts what the reader hashed or copied, so a slice read can be shown to touch only its rows.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from k2 import _native
from k2.checkpoint.tensors import TORCH_DTYPES, to_torch
from k2.errors import CheckpointError

MANIFEST = "manifest.json"
_SHARD = re.compile(r"^(?P<group>.+)-\d{5}-of-\d{5}\.safetensors$")


def group_of(file_name: str) -> str:
    """The group (``model``, ``optimizer``, ...) a shard file belongs to, from its name."""
    match = _SHARD.match(file_name)
    return match.group("group") if match else file_name.removesuffix(".safetensors")


def resolve(directory: str | os.PathLike[str]) -> Path:
    """The checkpoint directory that ``directory`` means.

    Args:
        directory: a checkpoint directory (it holds ``manifest.json``) or a checkpoint root
            (it holds ``latest``, naming its newest complete checkpoint).

    Raises:
        CheckpointError: if it is neither, naming the path.
    """
    path = Path(directory)
    if (path / MANIFEST).is_file():
        return path
    latest = _native.read_latest(path) if path.is_dir() else None
    if latest is None:
        found = _native.list_checkpoints(path) if path.is_dir() else []
        hint = f"; it holds {found}" if found else ""
        raise CheckpointError(f"{path} is not a checkpoint: no {MANIFEST} and no `latest`{hint}")
    return path / latest


class CheckpointReader:
    """An open checkpoint.

    Args:
        directory: a checkpoint directory or root (see :func:`resolve`); a directory of
            Hub ``.safetensors`` files opens too (``verify`` must then be off).
    """

    def __init__(self, directory: str | os.PathLike[str]):
        path = Path(directory)
        self.path = resolve(path) if (path / "latest").is_file() else path
        self._native = _native.CheckpointReader(self.path)
        stored = {t.name: (t.dtype, t.shape, t.file) for t in self._native.tensors()}
        # Tensors stored in row pieces: logical name -> [(stored name, start, stop)], row order.
        self._pieces: dict[str, list[tuple[str, int, int]]] = {}
        logical: dict[str, tuple[str, list[int], str]] = {}
        whole_of: dict[str, str] = {}  # stored piece -> the tensor it is part of
        for name, dtype, shape, pieces in self._native.pieces():
            self._pieces[name] = [(tensor, start, stop) for _, tensor, start, stop in pieces]
            logical[name] = (dtype, list(shape), pieces[0][0])  # a pieced tensor's file: its first piece's
            whole_of.update((tensor, name) for _, tensor, _, _ in pieces)
        self._tensors: dict[str, tuple[str, list[int], str]] = {}
        for name, info in stored.items():  # file order; a pieced tensor where a piece first comes
            whole = whole_of.get(name)
            if whole is None:
                self._tensors[name] = info
            elif whole not in self._tensors:
                self._tensors[whole] = logical[whole]

    @property
    def bytes_read(self) -> int:
        """Bytes hashed or copied by this reader so far."""
        return self._native.bytes_read

    @property
    def has_manifest(self) -> bool:
        """Whether the checkpoint carries checksums (k2 checkpoints do, Hub directories do not)."""
        return self._native.has_manifest

    def names(self, group: str | None = None) -> list[str]:
        """Tensor names in file order, optionally only those of one group (``model``, ...)."""
        return [n for n, (_, _, f) in self._tensors.items() if group is None or group_of(f) == group]

    def info(self, name: str) -> tuple[str, list[int], str]:
        """``(dtype, shape, file_name)`` of a tensor."""
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"no tensor {name!r} in checkpoint {self.path}") from None

    def verify(self) -> None:
        """Check every chunk of every tensor and every JSON file against the manifest."""
        self._native.verify()

    def tensor(self, name: str, *, verify: bool = True) -> torch.Tensor:
        """The whole tensor, over the memory map (writes to it stay private to this process); a
        tensor stored in row pieces is assembled into memory of its own."""
        dtype, shape, _ = self.info(name)
        if name in self._pieces:
            return self.rows(name, 0, shape[0], verify=verify)
        return to_torch(self._native.array(name, verify=verify), dtype, shape)

    def rows(self, name: str, start: int, stop: int, *, verify: bool = True) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor's first dimension, reading only the chunks they overlap
        (of a tensor stored in row pieces: only the pieces they overlap; rows from one piece stay
        over the memory map, rows from several are copied together)."""
        dtype, shape, _ = self.info(name)
        if name not in self._pieces:
            return to_torch(self._native.rows(name, start, stop, verify=verify), dtype, [stop - start, *shape[1:]])
        if not (0 <= start <= stop <= (shape[0] if shape else 0)):
            raise CheckpointError(f"rows {start}..{stop} are out of range for tensor {name!r} with "
                                  f"{shape[0] if shape else 0} rows in {self.path}")
        parts = []
        for stored, lo, hi in self._pieces[name]:
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                raw = self._native.rows(stored, a - lo, b - lo, verify=verify)
                parts.append(to_torch(raw, dtype, [b - a, *shape[1:]]))
        if not parts:  # no rows asked for
            return torch.empty([0, *shape[1:]], dtype=TORCH_DTYPES[dtype])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def shard_files(self) -> list[str]:
        """The safetensors files of the checkpoint, in name order."""
        return sorted({t.file for t in self._native.tensors()})

    def pieces(self, name: str) -> list[tuple[str, int, int]]:
        """How a tensor is stored: ``[(stored name, first row, end row), ...]`` in row order (one
        entry covering every row for a tensor stored whole)."""
        dtype, shape, _ = self.info(name)
        return self._pieces.get(name, [(name, 0, shape[0] if shape else 0)])

    def experts(self, layer: int, experts: Iterable[int], *, verify: bool = True) -> dict[str, torch.Tensor]:
        """The weights of some routed experts of one MoE layer (Hub naming), nothing else read.

        Returns:
            ``{hub_name: tensor}`` for every tensor of ``model.layers.{layer}.mlp.experts.{e}.*``.
        """
        wanted = set(experts)
        pattern = re.compile(rf"^model\.layers\.{layer}\.mlp\.experts\.(\d+)\.")
        names = [n for n in self._tensors if (m := pattern.match(n)) and int(m.group(1)) in wanted]
        if not names:
            raise CheckpointError(f"no tensors of layer {layer} experts {sorted(wanted)} in {self.path}")
        return {n: self.tensor(n, verify=verify) for n in names}

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def read_bytes(self, file_name: str, *, verify: bool = True) -> bytes:
        """A non-tensor file of the checkpoint, checked against the manifest when ``verify``."""
        return self._native.read_file(file_name, verify=verify)

    def read_json(self, file_name: str, *, verify: bool = True) -> Any:
        """A JSON file of the checkpoint, checked against the manifest when ``verify``."""
        return json.loads(self.read_bytes(file_name, verify=verify))

    def has_file(self, file_name: str) -> bool:
        """Whether the checkpoint directory holds ``file_name``."""
        return (self.path / file_name).is_file()
