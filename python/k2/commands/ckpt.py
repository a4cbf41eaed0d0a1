"""``k2 ckpt``: inspect, verify, export and import checkpoints."""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

GiB = 1 << 30


def inspect(args: argparse.Namespace) -> int:
    from k2.checkpoint import CheckpointReader
    from k2.checkpoint.reader import group_of

    reader = CheckpointReader(args.dir)
    print(f"checkpoint  {reader.path}")
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name in reader.names():
        dtype, shape, file = reader.info(name)
        nbytes = _bytes(dtype, shape)
        groups[group_of(file)][0] += 1
        groups[group_of(file)][1] += nbytes
    for group, (count, nbytes) in sorted(groups.items()):
        print(f"  {group:<12} {count:6d} tensors  {_human(nbytes):>10}")
    checksums = "yes" if reader.has_manifest else "no (not a k2 checkpoint)"
    print(f"  {len(reader.shard_files())} shard file(s); checksums: {checksums}")
    pieced = [name for name in reader.names() if len(reader.pieces(name)) > 1]
    if pieced:
        print(f"  {len(pieced)} tensors stored in row pieces (written rank by rank)")
    if reader.has_file("train_state.json") and reader.has_manifest:
        state = reader.read_json("train_state.json").get("user")
        if isinstance(state, dict) and "step" in state:
            print(f"  step {state['step']}")
    if args.tensors:
        for name in reader.names():
            dtype, shape, file = reader.info(name)
            pieces = reader.pieces(name)
            where = file if len(pieces) == 1 else f"{len(pieces)} row pieces"
            print(f"    {name:<64} {dtype:<8} {str(shape):<22} {where}")
    return 0


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _bytes(dtype: str, shape: list[int]) -> int:
    from k2.checkpoint.tensors import TORCH_DTYPES

    numel = 1
    for d in shape:
        numel *= d
    return numel * TORCH_DTYPES[dtype].itemsize


def verify(args: argparse.Namespace) -> int:
    from k2.checkpoint import CheckpointReader

    reader = CheckpointReader(args.dir)
    start = time.perf_counter()
    reader.verify()
    seconds = time.perf_counter() - start
    rate = reader.bytes_read / max(seconds, 1e-9)
    print(f"OK {reader.path}: {_human(reader.bytes_read)} verified in {seconds:.2f} s ({_human(rate)}/s)")
    return 0


def _dtype(name: str | None):
    import torch

    from k2.errors import ConfigError

    if name is None:
        return None
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in dtypes:
        raise ConfigError(f"--dtype {name!r}: choose one of {', '.join(dtypes)}")
    return dtypes[name]


def export_hf(args: argparse.Namespace) -> int:
    from k2.checkpoint import export_hf as export

    export(args.dir, args.out, dtype=_dtype(args.dtype), tokenizer_dir=args.tokenizer)
    print(f"wrote {args.out}")
    return 0


def import_hf(args: argparse.Namespace) -> int:
    from k2.checkpoint import import_hf as run_import

    run_import(args.dir, args.out, dtype=_dtype(args.dtype), memory_cap_bytes=int(args.memory_cap * GiB))
    print(f"wrote {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ckpt",
        help="inspect, verify, export (Hub) and import (Hub) checkpoints",
        description="Work with k2 checkpoints. DIR may be a checkpoint root (its `latest` is "
        "used) or one checkpoint directory.",
    )
    commands = parser.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)

    p = commands.add_parser("inspect", help="list a checkpoint's groups, shards and step")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--tensors", action="store_true", help="also list every tensor with dtype and shape")
    p.set_defaults(handler=inspect)

    p = commands.add_parser(
        "verify",
        help="check every byte against the manifest's checksums",
        description="Read every tensor chunk and JSON file and compare its XXH3 with the manifest. "
        "Exit status 1 names the shard and tensor of the first mismatch.",
    )
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(handler=verify)

    p = commands.add_parser(
        "export-hf",
        help="write a directory transformers loads (config.json, safetensors, tokenizer)",
        description="Export the model of a k2 checkpoint in the Hub layout: config.json with "
        "model_type deepseek_v3, sharded safetensors with an index, and the tokenizer files when "
        "the checkpoint (or --tokenizer) has them. transformers' "
        "AutoModelForCausalLM.from_pretrained(OUT) then loads it.",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("out", metavar="OUT", help="directory to create (must not exist)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="cast weights (default: as saved)")
    p.add_argument("--tokenizer", metavar="TOKDIR", help="take tokenizer files from here if the checkpoint has none")
    p.set_defaults(handler=export_hf)

    p = commands.add_parser(
        "import-hf",
        help="convert a Hub DeepSeek-V3 / Kimi-K2 checkpoint (FP8 or not) into k2",
        description="Convert a Hub checkpoint (model_type deepseek_v3 or kimi_k2) into a k2 "
        "checkpoint directory, dequantizing FP8 block-quantized weights and skipping "
        "multi-token-prediction layers. Streams shard by shard; prints the memory and disk it "
        "needs before it starts.",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("out", metavar="OUT", help="k2 checkpoint directory to create (must not exist)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="output dtype (default bf16)")
    p.add_argument(
        "--memory-cap",
        type=float,
        default=8.0,
        metavar="GIB",
        help="most memory the conversion buffers may use, in GiB (default 8); sets the output "
        "shard size. The source is memory-mapped, so the page cache grows too, but it is reclaimable.",
    )
    p.set_defaults(handler=import_hf)
