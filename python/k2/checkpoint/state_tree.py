"""Nested Python state (optimizer state dicts, training state) as JSON plus named tensors.

:func:`encode` walks a structure of dicts, lists, tuples, numbers, strings, tensors and numpy
arrays; every tensor is moved out under a path-like name (``optimizer/state/0/exp_avg``) and
replaced by a reference, so the rest is plain JSON. :func:`decode` puts the tensors back. The
round trip is exact: tuples stay tuples, integer dict keys stay integers, floats are written
with ``repr`` precision, tensors keep their bytes, dtype and shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from k2.errors import CheckpointError

_TENSOR = "__tensor__"
_NDARRAY = "__ndarray__"
_TUPLE = "__tuple__"
_DICT = "__dict__"


def _plain_keys(obj: Mapping) -> bool:
    """Whether a dict can be written as a JSON object as is (string keys, none reserved)."""
    return all(isinstance(k, str) and not (k.startswith("__") and k.endswith("__")) for k in obj)


def encode(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-able data, with its tensors moved into ``tensors``.

    Args:
        obj: the structure to encode.
        prefix: the name of ``obj``; nested tensors are named ``prefix/key/...``.
        tensors: receives ``name -> tensor`` for every tensor and numpy array found.

    Returns:
        The JSON-able encoding.

    Raises:
        CheckpointError: for a value of another type, naming its path.
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {_TENSOR: prefix}
    if isinstance(obj, np.ndarray):
        array = np.ascontiguousarray(obj)
        tensors[prefix] = torch.from_numpy(array.reshape(-1).view(np.uint8))
        return {_NDARRAY: prefix, "dtype": array.dtype.str, "shape": list(array.shape)}
    if isinstance(obj, bool | int | float | str) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if _plain_keys(obj):
            return {k: encode(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        return {
            _DICT: [
                [encode(k, f"{prefix}/key{i}", tensors), encode(v, f"{prefix}/{k}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    raise CheckpointError(
        f"cannot save {prefix!r}: a {type(obj).__name__} is not a tensor, array, number, string, "
        "list, tuple or dict"
    )


def decode(data: Any, tensor: Callable[[str], torch.Tensor]) -> Any:
    """Invert :func:`encode`; ``tensor(name)`` returns the stored tensor of that name."""
    if isinstance(data, list):
        return [decode(v, tensor) for v in data]
    if not isinstance(data, dict):
        return data
    if _TENSOR in data:
        return tensor(data[_TENSOR])
    if _NDARRAY in data:
        raw = tensor(data[_NDARRAY]).numpy()
        return raw.view(np.dtype(data["dtype"])).reshape(data["shape"]).copy()
    if _TUPLE in data:
        return tuple(decode(v, tensor) for v in data[_TUPLE])
    if _DICT in data:
        return {_hashable(decode(k, tensor)): decode(v, tensor) for k, v in data[_DICT]}
    return {k: decode(v, tensor) for k, v in data.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list | tuple) else key
