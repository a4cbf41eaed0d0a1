"""Reading checkpoint tensors: whole, by row range, or a subset of experts.

Tensors come back as torch tensors over the checkpoint's memory maps (no copy). Each read
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
from k2.checkpoint.tensors import to_torch
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
        self._tensors = {t.name: (t.dtype, t.shape, t.file) for t in self._native.tensors()}

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
        """The whole tensor, over the memory map (writes to it stay private to this process)."""
        dtype, shape, _ = self.info(name)
        return to_torch(self._native.array(name, verify=verify), dtype, shape)

    def rows(self, name: str, start: int, stop: int, *, verify: bool = True) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor's first dimension, reading only the chunks they overlap."""
        dtype, shape, _ = self.info(name)
        return to_torch(self._native.rows(name, start, stop, verify=verify), dtype, [stop - start, *shape[1:]])

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
