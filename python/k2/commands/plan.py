"""``k2 plan``: memory and communication per GPU for a model on a GPU layout, on paper.

Pure arithmetic (``k2.parallel.plan``, formulas in docs/plan.md): parameters, gradients,
master weights, optimizer states and activations per GPU; bytes sent per GPU per step along each
parallel dimension; whether it fits. ``--k2-report`` plans the layout the K2 report describes and
sets the report's stated numbers beside ours.
"""

from __future__ import annotations

import argparse
import json


def _settings(args: argparse.Namespace):  # noqa: ANN202 - k2.parallel.plan.Settings
    from k2.parallel.plan import Settings

    seq_len = args.seq_len
    if seq_len is None:
        from k2.model import K2Config

        seq_len = min(4096, K2Config.from_preset(args.preset).max_position_embeddings)
    return Settings(seq_len=seq_len, micro_batch=args.micro_batch,
                    global_batch_tokens=args.global_batch_tokens, param_dtype=args.param_dtype,
                    grad_dtype=args.grad_dtype, optimizer_dtype=args.optimizer_dtype,
                    optimizer=args.optimizer, recompute=args.recompute,
                    fp8_moe_inputs=args.fp8_moe_inputs, offload=args.offload,
                    gpu_memory_gib=args.gpu_memory, headroom=args.headroom)


def run(args: argparse.Namespace) -> int:
    from k2.errors import ConfigError
    from k2.model import K2Config
    from k2.parallel import plan as planning

    if args.preset is None:
        args.preset = "kimi-k2" if args.k2_report else "tiny"
    if args.gpus is None:
        args.gpus = planning.REPORT_ASSUMED.gpus if args.k2_report else 1
    if args.k2_report:
        if args.preset != "kimi-k2":
            raise ConfigError(f"--k2-report plans the kimi-k2 preset, not --preset {args.preset}")
        plan, rows = planning.compare_with_report(args.gpus, args.gpu_memory, args.headroom)
        if args.json:
            print(json.dumps(plan.to_dict() | {"report": [vars(r) for r in rows],
                                               "differences": list(planning.DIFFERENCES)}))
        else:
            print(planning.format_plan(plan))
            print()
            print(planning.format_comparison(rows))
        return 0
    try:
        K2Config.from_preset(args.preset)
    except ConfigError as err:
        raise ConfigError(f"--preset: {err}") from None
    layout = planning.Layout.resolve(
        args.gpus, pp=args.pp, vpp=args.vpp, tp=args.tp, ep=args.ep, dp_shard=args.dp_shard,
        dp_replicate=args.dp_replicate, sharding=args.sharding,
        dense_shard_over_ep=not args.dense_replicated_over_ep)
    plan = planning.make_plan(args.preset, layout, _settings(args))
    print(json.dumps(plan.to_dict()) if args.json else planning.format_plan(plan))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="memory and communication per GPU for a model on a GPU layout (arithmetic, no GPU needed)",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]
        + "\n\nLayout: gpus = pp × tp × dp_replicate × dp_shard × ep; dp_shard defaults to what the "
        "others leave. The ep ranks are data-parallel for the dense layers. Sizes are GiB.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default=None, metavar="PRESET",
                        help="tiny, small or kimi-k2 (default: tiny; kimi-k2 with --k2-report)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="number of GPUs (default: 1; 2048 with --k2-report)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                        help="memory per GPU in GiB (default: 80; an \"80 GB\" H100 or H800 has about 79.6 GiB)")
    parser.add_argument("--headroom", type=float, default=0.10,
                        help="fraction of GPU memory kept free for fragmentation, the CUDA context "
                        "and communication buffers (default: 0.10)")
    layout = parser.add_argument_group("layout")
    layout.add_argument("--pp", type=int, default=1, help="pipeline stages (k2 has no pipeline "
                        "parallelism yet: arithmetic only; default: 1)")
    layout.add_argument("--vpp", type=int, default=1, help="virtual stages (layer chunks) per "
                        "pipeline rank, interleaved 1F1B (default: 1)")
    layout.add_argument("--tp", type=int, default=1, help="tensor parallelism with sequence "
                        "parallelism (k2 has none: arithmetic only; default: 1)")
    layout.add_argument("--ep", type=int, default=1, help="expert parallelism: routed experts split "
                        "this many ways; must divide the expert count (default: 1)")
    layout.add_argument("--dp-shard", type=int, default=None, help="data-parallel ranks that shard "
                        "state (default: what --gpus leaves after the other dimensions)")
    layout.add_argument("--dp-replicate", type=int, default=1, help="replicas of the sharded state "
                        "(HSDP; default: 1)")
    layout.add_argument("--sharding", default="fsdp", choices=("fsdp", "zero1", "ddp"),
                        help="fsdp: FSDP2, parameters, gradients and optimizer states sharded (what "
                        "k2 builds); zero1: optimizer states and master weights only (the K2 "
                        "report); ddp: nothing (default: fsdp)")
    layout.add_argument("--dense-replicated-over-ep", action="store_true",
                        help="with fsdp: shard dense parameters over dp_shard only, replicated on "
                        "the ep ranks (default: over dp_shard × ep)")
    batch = parser.add_argument_group("batch, precision and memory savings")
    batch.add_argument("--seq-len", type=int, default=None,
                       help="tokens per sequence (default: 4096, or the model's maximum if shorter)")
    batch.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default: 1)")
    batch.add_argument("--global-batch-tokens", type=int, default=None,
                       help="tokens per optimizer step over all GPUs (default: one micro-batch per "
                       "data-parallel rank; K2 used about 67M)")
    batch.add_argument("--param-dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                       help="compute dtype of the weights; below fp32 the optimizer keeps fp32 "
                       "master weights (default: bf16)")
    batch.add_argument("--grad-dtype", default="fp32", choices=("bf16", "fp16", "fp32"),
                       help="gradient and reduction dtype (default: fp32)")
    batch.add_argument("--optimizer-dtype", default="fp32", choices=("bf16", "fp16", "fp32"),
                       help="dtype of momentum and AdamW moments (default: fp32)")
    batch.add_argument("--optimizer", default="muonclip", choices=("muonclip", "adamw"),
                       help="muonclip: momentum for Muon's matrices, two moments for the AdamW "
                       "part; adamw: two moments for everything (default: muonclip)")
    batch.add_argument("--recompute", default="none", choices=("none", "selective", "full"),
                       help="activation recomputation: none (what k2 does today), selective (norms, "
                       "SwiGLU, MLA up- and MoE down-projections, as in the K2 report) or full "
                       "(only each layer's input kept) (default: none)")
    batch.add_argument("--fp8-moe-inputs", action="store_true",
                       help="store the dispatched expert inputs in FP8 (as the K2 report does)")
    batch.add_argument("--offload", default="none", choices=("none", "optimizer", "activations", "all"),
                       help="move to host memory: optimizer states (with fsdp: FSDP2's CPU offload "
                       "of sharded parameters, gradients and states), activations, or both "
                       "(default: none)")
    parser.add_argument("--k2-report", action="store_true",
                        help="plan the K2 report's layout (pp 16 with virtual stages, ep 16, ZeRO-1, "
                        "selective recomputation, FP8 expert inputs, activation offload) on --gpus "
                        "(default there: 2048) and compare with the numbers the report states")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.set_defaults(handler=run, parser=parser)
