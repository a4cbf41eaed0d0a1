"""``k2 plan``: memory and communication per GPU for a model on a GPU layout, on paper.

Pure arithmetic (``k2.parallel.plan``, formulas in docs/plan.md): parameters, gradients,
master weights, optimizer states and activations per GPU; bytes sent per GPU per step along each
parallel dimension; whether it fits. ``--k2-report`` plans the layout the K2 report describes and
sets the report's stated numbers beside ours.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from k2.parallel.plan import Plan, ReportCheck

GIB = 1 << 30


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
            print(format_plan(plan))
            print()
            print(format_comparison(rows))
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
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan))
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


# ---------------------------------------------------------------------------- text output
def _gib(n: float) -> str:
    return f"{n / GIB:,.2f}"


def format_plan(plan: Plan) -> str:
    """The plan as a readable table."""
    c, s, lay, m = plan.counts, plan.settings, plan.layout, plan.memory
    stage = plan.stage
    moe = sum(1 for i in stage.layers if c.layers[i].moe)
    held = ", ".join(part for part, on in (("embedding", stage.embedding), ("head", stage.head)) if on)
    layer_text = _ranges(stage.layers)
    lines = [
        f"k2 plan: {plan.name} ({c.total:,} parameters, {c.active / 1e9:.2f}B active) on "
        f"{_n(lay.gpus, 'GPU')} of {s.gpu_memory_gib:g} GiB",
        f"layout   {lay.dims}; sharding {lay.sharding}",
        f"batch    {s.seq_len} tokens × {_n(s.micro_batch, 'sequence')} per micro-batch; "
        f"{_n(plan.micro_batches, 'micro-batch')} per data-parallel rank per step "
        f"({plan.micro_batches * s.seq_len * s.micro_batch * lay.data_parallel:,} tokens per step)",
        f"stage    pipeline rank {stage.rank} (the heaviest): layers {layer_text} "
        f"({moe} MoE, {len(stage.layers) - moe} dense){'; ' + held if held else ''}",
        "",
        f"{'memory per GPU':<44}{'GiB':>10}  notes",
    ]
    master = f"fp32 master weights" if m.master_weights else "none (fp32 compute, or FSDP's fp32 shards)"
    optimizer = (f"Muon momentum {_gib(m.muon_states)} + AdamW moments {_gib(m.adamw_states)}"
                 if s.optimizer == "muonclip" else "AdamW moments")
    offloaded = " (offloaded to host)" if m.host_states else ""
    param_note = "fp32 shards (FSDP2 master)" if lay.sharding == "fsdp" and s.param_dtype != "fp32" else s.param_dtype
    rows = [
        (f"  parameters", m.parameters, param_note + offloaded if lay.sharding == "fsdp" else param_note),
        (f"  gradients", m.gradients, s.grad_dtype + (offloaded if lay.sharding == "fsdp" else "")),
        (f"  master weights", m.master_weights, master + (offloaded if lay.sharding != "fsdp" and m.master_weights else "")),
        (f"  optimizer states ({s.optimizer_dtype})", m.optimizer_states, optimizer + offloaded),
        (f"  activations (recompute {s.recompute})", m.activations,
         "on the GPU" + (f"; {_gib(m.host_activations)} GiB offloaded" if m.host_activations else "")),
        (f"  transient (forward/backward peak)", m.transient, _transient_note(m.transient_parts)),
        (f"  optimizer step buffers", m.optimizer_transient,
         "a Newton-Schulz batch (activations are freed by then)" if m.optimizer_transient else ""),
    ]
    for label, value, note in rows:
        lines.append(f"{label:<44}{_gib(value):>10}  {note}")
    verdict = "yes" if plan.fits else "NO"
    lines += [
        f"{'  total on the GPU':<44}{_gib(m.on_gpu):>10}",
        f"{'  budget (memory less ' + format(s.headroom, '.0%') + ' headroom)':<44}{_gib(plan.budget):>10}  "
        f"fits: {verdict} ({_gib(plan.budget - m.on_gpu)} GiB left)",
        f"{'  activations with no recomputation':<44}{_gib(m.activations_no_recompute):>10}  for reference",
        f"{'  host memory (offload)':<44}{_gib(m.host):>10}",
        "",
        f"{'communication per GPU per step':<44}{'GiB':>10}  {'collective':<28}{'group':>6}  what",
    ]
    if not plan.traffic:
        lines.append("  (none: one rank holds everything)")
    for t in plan.traffic:
        lines.append(f"  {t.dim:<42}{_gib(t.bytes):>10}  {t.collective:<28}{t.group:>6}  {t.what}")
    if plan.notes:
        lines.append("")
        lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def format_comparison(rows: list[ReportCheck]) -> str:
    """The comparison with the K2 report as a table, then where k2's layout differs."""
    width = max(len(r.what) for r in rows)
    lines = ["the K2 report (§2.4) against our formulas:"]
    for r in rows:
        lines.append(f"  {r.what:<{width}}  report: {r.report}")
        lines.append(f"  {'':<{width}}  ours:   {r.ours}")
    lines.append("where k2 differs from the report's layout:")
    from k2.parallel.plan import DIFFERENCES

    lines += [f"  - {d}" for d in DIFFERENCES]
    return "\n".join(lines)


def _transient_note(parts: dict[str, int]) -> str:
    fsdp = parts.get("fsdp unsharded layers")
    either = [f"{k} {_gib(parts[k])}" for k in ("qk-clip score matrix", "recomputed layer") if k in parts]
    text = f"fsdp unsharded layers {_gib(fsdp)}" if fsdp else ""
    if either:
        text += (" + " if text else "") + (f"max({', '.join(either)})" if len(either) > 1 else either[0])
    return text


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else ("es" if noun.endswith("ch") else "s"))


def _ranges(indices: tuple[int, ...]) -> str:
    if not indices:
        return "none"
    parts, start, prev = [], indices[0], indices[0]
    for i in indices[1:] + (None,):  # type: ignore[operator]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)
