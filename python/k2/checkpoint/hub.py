"""Hub interoperability: export a k2 checkpoint for ``transformers``, import a Hub checkpoint.

- :func:`export_hf` writes a directory ``transformers.AutoModelForCausalLM.from_pretrained``
  loads: ``config.json`` (``model_type: deepseek_v3``), sharded safetensors with
  ``model.safetensors.index.json``, and the tokenizer files when the run has them.
- :func:`import_hf` turns a Hub-layout DeepSeek-V3 or Kimi-K2 checkpoint into a k2 checkpoint
  directory. The official releases store most weights as FP8 (e4m3) with one
  ``weight_scale_inv`` per 128x128 block; they are dequantized (``w * scale_inv`` per block) to
  bf16 by default. Multi-token-prediction layers (index >= ``num_hidden_layers``) are skipped
  with a warning. The real checkpoints are about a terabyte, so the conversion streams: the
  source is memory-mapped and read one output shard at a time, FP8 weights are dequantized 128
  rows at a time, and the output shard size is chosen so the buffers stay under a memory cap.
  Memory and disk needs are printed before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from k2 import _native
from k2.checkpoint.reader import CheckpointReader, resolve
from k2.checkpoint.store import TOKENIZER_FILES
from k2.checkpoint.tensors import DTYPE_NAMES, TORCH_DTYPES, entry
from k2.errors import CheckpointError, ConfigError

FP8_BLOCK = 128  # rows and columns per scale in the official FP8 releases (k2.model.hub_names.FP8_BLOCK)
HUB_MODEL_TYPES = ("deepseek_v3", "kimi_k2")
HUB_SHARD_BYTES = 4 << 30  # largest shard of an exported or imported Hub-layout checkpoint
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SCALE_SUFFIX = "_scale_inv"
GiB = 1 << 30
WRITER_GATHER_BYTES = 1 << 20  # rust/src/checkpoint/writer.rs GATHER_BYTES


def export_hf(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = HUB_SHARD_BYTES,
    log: Callable[[str], None] = print,
) -> Path:
    """Write a k2 checkpoint's model as a Hub directory that ``transformers`` loads.

    Args:
        checkpoint: a k2 checkpoint directory or root (its ``latest``).
        out: the directory to create (must not exist); written atomically.
        dtype: cast floating-point weights to this dtype (default: as stored).
        tokenizer_dir: where to take ``tokenizer.json`` and ``tokenizer_config.json`` from when
            the checkpoint does not carry them.
        max_shard_bytes: shard size limit of the export.
        log: receives progress lines.

    Returns:
        ``out``.

    Raises:
        CheckpointError: if the checkpoint has no ``config.json`` or does not use Hub names (it was
            saved from a model other than k2's), or fails verification.
    """
    reader = CheckpointReader(resolve(checkpoint))
    meta = reader.read_json("checkpoint.json") if reader.has_file("checkpoint.json") else {}
    if meta.get("model_naming") != "hf" or not reader.has_file("config.json"):
        raise CheckpointError(
            f"{reader.path} was not saved from a k2 model (no Hub tensor names or no config.json); "
            "only k2 model checkpoints can be exported"
        )
    names = reader.names("model")
    sizes = [_out_bytes(reader.info(n)[0], reader.info(n)[1], dtype) for n in names]
    plan = _native.plan_shards(sizes, max_shard_bytes)
    log(f"export-hf: {len(names)} tensors, {sum(sizes) / GiB:.2f} GiB in {len(plan)} shard(s) -> {out}")

    writer = _native.CheckpointWriter(Path(out))
    for index, shard in enumerate(plan):
        tensors = {names[i]: _cast(reader.tensor(names[i]), dtype) for i in shard}
        writer.write_shard(
            _native.shard_file_name("model", index, len(plan)),
            "model",
            [entry(n, t) for n, t in tensors.items()],
        )
    writer.write_file("config.json", reader.read_bytes("config.json"))
    for name in TOKENIZER_FILES:
        if reader.has_file(name):
            writer.write_file(name, reader.read_bytes(name))
        elif tokenizer_dir is not None and (Path(tokenizer_dir) / name).is_file():
            writer.write_file(name, (Path(tokenizer_dir) / name).read_bytes())
    writer.commit(publish_latest=False)
    return Path(out)


@dataclass
class ImportPlan:
    """What :func:`import_hf` will do, known before it writes anything.

    Attributes:
        tensors: output tensor names, in source order.
        out_bytes: bytes of tensor data to write (also the disk space needed).
        shards: output shards (tensor indices).
        peak_bytes: the most memory the conversion buffers hold at once (one output shard, the
            dequantization scratch of one 128-row block, and the writer threads' gather buffers).
        skipped_layers: multi-token-prediction layers left out.
    """

    tensors: list[str]
    out_bytes: int
    shards: list[list[int]]
    peak_bytes: int
    skipped_layers: list[int]


def import_hf(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.bfloat16,
    memory_cap_bytes: int = 8 * GiB,
    max_shard_bytes: int = HUB_SHARD_BYTES,
    log: Callable[[str], None] = print,
) -> ImportPlan:
    """Convert a Hub DeepSeek-V3 / Kimi-K2 checkpoint into a k2 checkpoint directory.

    Args:
        src: the Hub directory (``config.json`` + ``*.safetensors``).
        out: the k2 checkpoint directory to create; ``k2.checkpoint.load(out, model)`` reads it.
        dtype: dtype of the floating-point output weights (FP8 weights are dequantized to it).
        memory_cap_bytes: upper bound on the conversion buffers; sets the output shard size.
        max_shard_bytes: output shard size limit.
        log: receives the plan summary (memory and disk needs) and progress.

    Returns:
        The :class:`ImportPlan` that was carried out.

    Raises:
        ConfigError: on an unsupported ``model_type`` or a memory cap below what one tensor needs.
        CheckpointError: on a malformed source (see :func:`check_import_source`), an existing
            ``out``, or not enough free disk space at ``out``. Nothing is written then.
    """
    src, out = Path(src), Path(out)
    config = check_import_source(src)
    if out.exists():
        raise CheckpointError(f"{out} already exists; import-hf writes a new directory")
    reader = CheckpointReader(src)
    plan = plan_import(reader, config["num_hidden_layers"], dtype, memory_cap_bytes, max_shard_bytes)
    if plan.skipped_layers:
        warnings.warn(
            f"import-hf: skipping multi-token-prediction layer(s) {plan.skipped_layers} "
            "(k2 does not implement MTP)",
            stacklevel=2,
        )
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    log(
        f"import-hf: {len(plan.tensors)} tensors -> {plan.out_bytes / GiB:.2f} GiB of {DTYPE_NAMES[dtype]} "
        f"in {len(plan.shards)} shard(s); needs {plan.peak_bytes / GiB:.2f} GiB of memory "
        f"(cap {memory_cap_bytes / GiB:.2f}) and {plan.out_bytes / GiB:.2f} GiB of disk "
        f"({free / GiB:.1f} GiB free)"
    )
    if free < plan.out_bytes:
        raise CheckpointError(f"not enough disk space for {out}: {plan.out_bytes} bytes needed, {free} free")

    writer = _native.CheckpointWriter(out)
    for index, shard in enumerate(plan.shards):
        tensors = {}
        for i in shard:
            name = plan.tensors[i]
            tensors[name] = _convert(reader, name, dtype)
        writer.write_shard(
            _native.shard_file_name("model", index, len(plan.shards)),
            "model",
            [entry(n, t) for n, t in tensors.items()],
        )
        del tensors
        log(f"import-hf: shard {index + 1}/{len(plan.shards)} written")
    config.pop("quantization_config", None)
    if "num_nextn_predict_layers" in config:
        config["num_nextn_predict_layers"] = 0
    # transformers 5 writes "dtype", the published checkpoints "torch_dtype": keep the dialect.
    config["dtype" if "dtype" in config else "torch_dtype"] = str(dtype).removeprefix("torch.")
    writer.write_file("config.json", json.dumps(config, indent=1).encode())
    writer.write_file(
        "checkpoint.json", json.dumps({"format": "k2-checkpoint", "model_naming": "hf", "imported_from": str(src)}).encode()
    )
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            writer.write_file(name, (src / name).read_bytes())
    writer.commit(publish_latest=False)
    return plan


K2_CHECKPOINT_FILES = ("latest", "checkpoint.json", "optimizer.json", "train_state.json")
"""Files only a k2 checkpoint (root or directory) has; a Hub directory, k2's exports included,
has none of them."""


def check_import_source(src: Path) -> dict:
    """The ``config.json`` of a Hub checkpoint directory, after checking it is one.

    Raises:
        CheckpointError: ``src`` is missing, not a directory, a k2 checkpoint (whose optimizer
            and training-state tensors would otherwise pass for model tensors), without a
            readable JSON-object ``config.json`` or without ``.safetensors`` weights.
        ConfigError: an unsupported ``model_type``, or no integer ``num_hidden_layers``.
    """
    if not src.exists():
        raise CheckpointError(f"import-hf: {src} does not exist")
    if not src.is_dir():
        raise CheckpointError(f"import-hf: {src} is not a directory (give the Hub checkpoint "
                              "directory: config.json and *.safetensors)")
    k2_files = [name for name in K2_CHECKPOINT_FILES if (src / name).is_file()]
    if k2_files:
        raise CheckpointError(
            f"import-hf: {src} is a k2 checkpoint (it has {', '.join(k2_files)}), not a Hub "
            "checkpoint: it needs no import (k2.checkpoint.load reads it as is; `k2 ckpt "
            "export-hf` writes a Hub directory from it)")
    path = src / "config.json"
    try:
        config = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"import-hf: {path} does not exist; a Hub checkpoint directory "
                              "holds config.json beside its *.safetensors") from None
    except OSError as err:
        raise CheckpointError(f"import-hf: {path} cannot be read: {err.strerror}") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"import-hf: {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"import-hf: {path} must hold a JSON object, got {type(config).__name__}")
    if config.get("model_type") not in HUB_MODEL_TYPES:
        raise ConfigError(
            f"{path}: model_type {config.get('model_type')!r} is not one of {HUB_MODEL_TYPES}"
        )
    if "num_hidden_layers" not in config:
        raise ConfigError(f"{path} lacks num_hidden_layers")
    layers = config["num_hidden_layers"]
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        raise ConfigError(f"{path}: num_hidden_layers must be a non-negative integer, got {layers!r}")
    if not any(src.glob("*.safetensors")):
        present = sorted(p.name for p in src.iterdir())
        raise CheckpointError(
            f"import-hf: {src} holds no .safetensors weights (it has {', '.join(present)}); "
            "download the weight files too")
    return config


def plan_import(
    reader: CheckpointReader,
    num_layers: int,
    dtype: torch.dtype,
    memory_cap_bytes: int,
    max_shard_bytes: int,
) -> ImportPlan:
    """Decide which tensors to write, in which shards, and how much memory that takes."""
    names, sizes, skipped = [], [], set()
    scratch = 0
    for name in reader.names():
        if name.endswith(_SCALE_SUFFIX):
            if name.removesuffix(_SCALE_SUFFIX) not in reader:
                raise CheckpointError(f"{reader.path}: {name} has no weight {name.removesuffix(_SCALE_SUFFIX)}")
            continue
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= num_layers:
            skipped.add(int(layer.group(1)))
            continue
        src_dtype, shape, _ = reader.info(name)
        names.append(name)
        sizes.append(_out_bytes(src_dtype, shape, dtype))
        if _scale_of(reader, name) is not None:
            # One block of rows: the fp32 weights, the expanded scales, their product, its cast.
            scratch = max(scratch, FP8_BLOCK * shape[1] * (4 + 4 + 4 + dtype.itemsize))
    # Each writer thread may gather small tensors into one buffer.
    scratch += (os.cpu_count() or 1) * WRITER_GATHER_BYTES
    largest = max(sizes, default=0)
    budget = memory_cap_bytes - scratch
    if budget < largest:
        big = names[sizes.index(largest)]
        raise ConfigError(
            f"memory cap {memory_cap_bytes} bytes is too small: tensor {big!r} alone needs "
            f"{largest + scratch} bytes; raise --memory-cap"
        )
    shards = _native.plan_shards(sizes, min(max_shard_bytes, budget))
    peak = max((sum(sizes[i] for i in shard) for shard in shards), default=0) + scratch
    return ImportPlan(names, sum(sizes), shards, peak, sorted(skipped))


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize a block-quantized FP8 weight into ``dtype``, 128 rows at a time.

    The formula has one home, :func:`k2.model.hub_names.dequantize_fp8`
    (``w[i, j] * scale_inv[i // 128, j // 128]`` in fp32); this applies it one block of rows at a
    time so that only that block is ever held in fp32.

    Args:
        weight: [m, n] ``float8_e4m3fn``.
        scale_inv: [ceil(m / 128), ceil(n / 128)] per-block scales (fp32 or bf16).
        dtype: the output dtype.

    Returns:
        [m, n] tensor of ``dtype``.
    """
    from k2.model.hub_names import dequantize_fp8

    rows, cols = weight.shape
    expected = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a [{rows}, {cols}] weight needs {expected}"
        )
    out = torch.empty(rows, cols, dtype=dtype)
    for block, start in enumerate(range(0, rows, FP8_BLOCK)):
        stop = min(start + FP8_BLOCK, rows)
        out[start:stop] = dequantize_fp8(weight[start:stop], scale_inv[block : block + 1]).to(dtype)  # [<=128, n]
    return out


def _scale_of(reader: CheckpointReader, name: str) -> str | None:
    scale = name + _SCALE_SUFFIX
    return scale if name.endswith(".weight") and scale in reader else None


def _convert(reader: CheckpointReader, name: str, dtype: torch.dtype) -> torch.Tensor:
    source = reader.tensor(name, verify=reader.has_manifest)
    scale = _scale_of(reader, name)
    if scale is not None:
        return dequantize_fp8_blocks(source, reader.tensor(scale, verify=reader.has_manifest), dtype)
    return _cast(source, dtype)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype`` if it is floating point (no copy when it already is)."""
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _out_bytes(src_dtype: str, shape: list[int], dtype: torch.dtype | None) -> int:
    torch_dtype = TORCH_DTYPES[src_dtype]
    if dtype is not None and torch_dtype.is_floating_point:
        torch_dtype = dtype
    numel = 1
    for d in shape:
        numel *= d
    return numel * torch_dtype.itemsize
