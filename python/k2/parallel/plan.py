"""A training plan on paper: memory and communication per GPU for a model, a layout and a batch.

Pure arithmetic on a :class:`~k2.model.config.K2Config` (no model is built, no torch import):
parameter counts from the configuration's shapes, the bytes each GPU holds for parameters,
gradients, master weights, optimizer states and activations, and the bytes each GPU sends per
optimizer step along every parallel dimension. ``k2 plan`` prints it. The formulas, the layout
conventions and the comparison with the K2 report are written out in docs/plan.md.

Layout (:class:`Layout`): ``gpus = pp × tp × dp_replicate × dp_shard × ep``. Every rank of the
``dp_replicate × dp_shard × ep`` ranks of one pipeline stage reads different data (the
expert-parallel ranks are data-parallel for the dense layers); routed experts are split ``ep``
ways; ``sharding`` says how parameters, gradients and optimizer states are spread over the
data-parallel ranks (``fsdp``: FSDP2 / ZeRO-3, what k2 builds; ``zero1``: optimizer states
only, what the K2 report used; ``ddp``: nothing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from k2.errors import ConfigError
from k2.model.config import K2Config

GIB = 1 << 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SHARDINGS = ("fsdp", "zero1", "ddp")
RECOMPUTE = ("none", "selective", "full")
OFFLOAD = ("none", "optimizer", "activations", "all")
OPTIMIZERS = ("muonclip", "adamw")

@dataclass(frozen=True)
class ReportFacts:
    """What the K2 report (arXiv 2507.20534, §2.4) states about its training system. Facts only;
    :func:`compare_with_report` recomputes each from our own formulas."""

    gpu: str = "NVIDIA H800 (80 GB), 8 per node over NVLink/NVSwitch, 8 x 400 Gbps RoCE between nodes"
    host_memory_per_node_bytes: float = 2e12
    pp: int = 16
    ep: int = 16
    data_parallel: str = "ZeRO-1"
    model_parallel_group: int = 256
    nodes_multiple: int = 32
    params_bf16_grads_fp32_bytes: float = 6e12
    states_per_gpu_bytes: float = 30e9
    seq_len: int = 4096
    global_batch_tokens: float = 67e6
    total_params: float = 1.04e12
    active_params: float = 32.6e9


@dataclass(frozen=True)
class ReportAssumptions:
    """Our choices where the report gives no number: how many GPUs trained K2, how many virtual
    stages each pipeline rank holds, the micro-batch size, and the batch as a power of two."""

    gpus: int = 2048
    vpp: int = 2
    micro_batch: int = 1
    global_batch_tokens: int = 1 << 26


REPORT = ReportFacts()
REPORT_ASSUMED = ReportAssumptions()

# Newton-Schulz batches hold at most this many numbers (k2.optim.muon.muon_step's max_batch_numel).
NS_MAX_BATCH_NUMEL = 1 << 27
# Buffers of one Newton-Schulz iteration, in batch-sized units (input copy, X, X X^T-sized
# products, the polynomial, the output): an upper estimate.
NS_BUFFERS = 4


# ---------------------------------------------------------------------------- parameter counts
@dataclass(frozen=True)
class LayerParams:
    """The parameters of one decoder layer, by who updates them and whether ``ep`` splits them.

    Attributes:
        index: layer index.
        moe: an MoE layer (otherwise a dense MLP layer).
        muon: non-expert matrices (attention projections, router, dense or shared MLP): Muon.
        adamw: norms (1-D): AdamW.
        experts: the routed expert stacks [E, m, n] (Muon), split across expert parallelism.
        experts_active: the part of ``experts`` one token uses (K of E experts).
    """

    index: int
    moe: bool
    muon: int
    adamw: int
    experts: int
    experts_active: int

    @property
    def dense(self) -> int:
        """Everything but the routed experts."""
        return self.muon + self.adamw

    @property
    def total(self) -> int:
        return self.muon + self.adamw + self.experts


@dataclass(frozen=True)
class ParamCounts:
    """A configuration's parameters, counted from its shapes (equal to the model's numel sum).

    Attributes:
        embedding: the token embedding [V, h] (AdamW).
        head: the output head [V, h] (AdamW); 0 when tied to the embedding.
        final_norm: the last RMSNorm (AdamW).
        layers: one :class:`LayerParams` per decoder layer.
    """

    embedding: int
    head: int
    final_norm: int
    layers: tuple[LayerParams, ...]

    @property
    def experts(self) -> int:
        return sum(layer.experts for layer in self.layers)

    @property
    def dense(self) -> int:
        return self.total - self.experts

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.final_norm + sum(layer.total for layer in self.layers)

    @property
    def active(self) -> int:
        return self.total - sum(layer.experts - layer.experts_active for layer in self.layers)

    @property
    def muon(self) -> int:
        return sum(layer.muon + layer.experts for layer in self.layers)

    @property
    def adamw(self) -> int:
        return self.total - self.muon


def count_parameters(config: K2Config) -> ParamCounts:
    """Count a configuration's parameters from its shapes (docs/plan.md, "Parameters").

    Args:
        config: the model configuration.

    Returns:
        The counts; ``total`` equals ``sum(p.numel() for p in K2ForCausalLM(config).parameters())``.
    """
    h, heads = config.hidden_size, config.num_attention_heads
    dq = config.qk_nope_head_dim + config.qk_rope_head_dim
    rank, rope = config.kv_lora_rank, config.qk_rope_head_dim
    if config.q_lora_rank is None:
        attn_muon, attn_norms = h * heads * dq, 0
    else:
        attn_muon = h * config.q_lora_rank + config.q_lora_rank * heads * dq
        attn_norms = config.q_lora_rank
    attn_muon += h * (rank + rope) + rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
    attn_muon += heads * config.v_head_dim * h
    attn_norms += rank
    layers = []
    for i in range(config.num_hidden_layers):
        norms = attn_norms + 2 * h
        if i < config.first_k_dense_replace:
            layers.append(LayerParams(i, False, attn_muon + 3 * h * config.intermediate_size, norms, 0, 0))
            continue
        per_expert = 3 * h * config.moe_intermediate_size
        shared = 3 * h * config.moe_intermediate_size * config.n_shared_experts
        router = config.n_routed_experts * h
        layers.append(LayerParams(i, True, attn_muon + router + shared, norms,
                                  config.n_routed_experts * per_expert,
                                  config.num_experts_per_tok * per_expert))
    head = 0 if config.tie_word_embeddings else config.vocab_size * h
    return ParamCounts(config.vocab_size * h, head, h, tuple(layers))


# ---------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActivationBytes:
    """Bytes that autograd keeps per token for the backward pass, by part (docs/plan.md).

    Attributes:
        attention: one MLA block with its input norm.
        moe: one MoE block with its norm (router, dispatch, routed experts, shared experts).
        dense_mlp: one dense MLP block with its norm.
        head: the final norm and k2's fused head + loss (one fp32 logits-sized buffer).
    """

    attention: int
    moe: int
    dense_mlp: int
    head: int

    def layer(self, moe: bool) -> int:
        return self.attention + (self.moe if moe else self.dense_mlp)


def activation_bytes(config: K2Config, compute_bytes: int, recompute: str = "none",
                     fp8_moe_inputs: bool = False) -> ActivationBytes:
    """Per-token activation bytes of each part under a recomputation mode (docs/plan.md).

    Args:
        config: the model configuration.
        compute_bytes: bytes of the compute dtype (2 for bf16, 4 for fp32).
        recompute: ``none`` (what k2's model keeps today), ``selective`` (recompute norms,
            SwiGLU, the MLA up-projections and the MoE down-projections; keep the residual stream,
            the latents, the attention output and the dispatched expert inputs) or ``full``
            (keep only each layer's input).
        fp8_moe_inputs: store the dispatched expert inputs (and SwiGLU inputs, when kept) in
            FP8 with one fp32 scale per 128 numbers, as the K2 report does.

    Returns:
        The bytes per token of each part.
    """
    b = compute_bytes
    h, heads = config.hidden_size, config.num_attention_heads
    dq = config.qk_nope_head_dim + config.qk_rope_head_dim
    v_dim, rank, rope = config.v_head_dim, config.kv_lora_rank, config.qk_rope_head_dim
    experts, k = config.n_routed_experts, config.num_experts_per_tok
    inter_moe, inter = config.moe_intermediate_size, config.intermediate_size
    shared_inter = inter_moe * config.n_shared_experts
    qr = config.q_lora_rank or 0
    x_bytes = 1 + 4 / 128 if fp8_moe_inputs else b  # per number of the dispatched expert input
    routing = 4 * experts + 28 * k  # fp32 sigmoid scores; expert ids, row positions, weights
    if recompute == "none":
        # RMSNorm keeps its input in fp32 and its output twice (before and after the gain).
        norm_h = 4 * h + 2 * b * h
        attention = norm_h + (4 * qr + 2 * b * qr) + (4 * rank + 2 * b * rank)
        # fused attention keeps q, k, v (padded to q's width), its output and the log-sum-exp
        attention += 2 * b * heads * dq + 2 * b * heads * max(v_dim, dq) + 4 * heads
        attention += b * heads * v_dim  # o_proj's input
        router_in = 4 * h if b != 4 else 0  # the router runs in fp32
        routed = round(k * h * x_bytes) + 4 * k * inter_moe * b + k * h * b  # x, a, b, silu(a), a*b, y
        moe = norm_h + router_in + routing + routed + 4 * b * shared_inter
        dense_mlp = norm_h + 4 * b * inter
    elif recompute == "selective":
        attention = b * h + b * qr + b * (rank + rope) + b * heads * v_dim + 4 * heads
        moe = b * h + routing + round(k * h * x_bytes)
        dense_mlp = b * h
    elif recompute == "full":
        attention, moe, dense_mlp = b * h, 0, 0
    else:
        raise ConfigError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r} (--recompute)")
    head = 4 * h + 2 * b * h + 4 * config.vocab_size + 13
    return ActivationBytes(attention, moe, dense_mlp, head)


# ---------------------------------------------------------------------------- layout and settings
@dataclass(frozen=True)
class Layout:
    """How the GPUs are arranged: ``gpus = pp × tp × dp_replicate × dp_shard × ep``.

    Attributes:
        gpus: number of GPUs.
        pp: pipeline stages; ``vpp`` virtual stages (layer chunks) per pipeline rank.
        tp: tensor parallelism (with sequence parallelism).
        ep: expert parallelism, carved out of the data-parallel ranks.
        dp_shard: data-parallel ranks that shard state (FSDP2 / ZeRO).
        dp_replicate: data-parallel replicas of the sharded state (HSDP).
        sharding: ``fsdp`` (parameters, gradients and optimizer states sharded: FSDP2),
            ``zero1`` (optimizer states and master weights sharded) or ``ddp`` (none).
        dense_shard_over_ep: under ``fsdp``, shard the dense parameters over ``dp_shard × ep``
            ranks (the ep ranks are data-parallel for them); otherwise over ``dp_shard`` only.
    """

    gpus: int
    pp: int = 1
    vpp: int = 1
    tp: int = 1
    ep: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    sharding: str = "fsdp"
    dense_shard_over_ep: bool = True

    def __post_init__(self) -> None:
        if self.sharding not in SHARDINGS:
            raise ConfigError(f"--sharding must be one of {', '.join(SHARDINGS)}, got {self.sharding!r}")
        product = self.pp * self.tp * self.dp_replicate * self.dp_shard * self.ep
        if product != self.gpus:
            raise ConfigError(
                f"--gpus {self.gpus} is not the product of the dimensions pp × tp × ep × "
                f"dp_replicate × dp_shard = {self.pp} × {self.tp} × {self.ep} × {self.dp_replicate} × "
                f"{self.dp_shard} = {product} (--pp, --tp, --ep, --dp-replicate, --dp-shard)")

    @classmethod
    def resolve(cls, gpus: int, *, pp: int = 1, vpp: int = 1, tp: int = 1, ep: int = 1,
                dp_shard: int | None = None, dp_replicate: int = 1, sharding: str = "fsdp",
                dense_shard_over_ep: bool = True) -> Layout:
        """A layout with ``dp_shard`` defaulting to what the other dimensions leave.

        Raises:
            ConfigError: naming the option, for a non-positive size, an unknown sharding, or
                ``gpus`` not divisible by (or not equal to) the product of the dimensions.
        """
        for name, value in (("gpus", gpus), ("pp", pp), ("vpp", vpp), ("tp", tp), ("ep", ep),
                            ("dp-replicate", dp_replicate), ("dp-shard", dp_shard)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
        if sharding not in SHARDINGS:
            raise ConfigError(f"--sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
        if vpp > 1 and pp == 1:
            raise ConfigError(f"--vpp {vpp} needs pipeline parallelism (--pp > 1)")
        fixed = pp * tp * ep * dp_replicate
        if dp_shard is None:
            if gpus % fixed:
                raise ConfigError(
                    f"--gpus {gpus} is not divisible by pp × tp × ep × dp_replicate = "
                    f"{pp} × {tp} × {ep} × {dp_replicate} = {fixed} (--pp, --tp, --ep, --dp-replicate)")
            dp_shard = gpus // fixed
        elif fixed * dp_shard != gpus:
            raise ConfigError(
                f"--gpus {gpus} is not the product of the dimensions pp × tp × ep × dp_replicate × "
                f"dp_shard = {pp} × {tp} × {ep} × {dp_replicate} × {dp_shard} = {fixed * dp_shard} "
                "(--pp, --tp, --ep, --dp-replicate, --dp-shard)")
        return cls(gpus, pp, vpp, tp, ep, dp_shard, dp_replicate, sharding, dense_shard_over_ep)

    @property
    def data_parallel(self) -> int:
        """Ranks of one pipeline stage (and tensor-parallel rank) that read different data."""
        return self.dp_replicate * self.dp_shard * self.ep

    @property
    def dims(self) -> str:
        text = f"pp {self.pp}"
        if self.vpp > 1:
            text += f" (vpp {self.vpp})"
        return (f"{text} × tp {self.tp} × dp_replicate {self.dp_replicate} × dp_shard "
                f"{self.dp_shard} × ep {self.ep} = {self.gpus}")


@dataclass(frozen=True)
class Settings:
    """Batch, precision, optimizer, recomputation, offload and the memory budget.

    Attributes:
        seq_len: tokens per sequence.
        micro_batch: sequences per micro-batch on one data-parallel rank.
        global_batch_tokens: tokens per optimizer step over all ranks (None: one micro-batch
            per data-parallel rank).
        param_dtype: compute dtype of the weights (``bf16`` on GPUs; ``fp32`` as on the CPU).
            With bf16 the optimizer keeps fp32 master weights.
        grad_dtype: dtype of gradients and their reduction.
        optimizer_dtype: dtype of momentum and AdamW moments.
        optimizer: ``muonclip`` (momentum for Muon's matrices, two moments for the AdamW part)
            or ``adamw`` (two moments for everything).
        recompute: ``none``, ``selective`` or ``full`` (see :func:`activation_bytes`).
        fp8_moe_inputs: store dispatched expert inputs in FP8.
        offload: ``optimizer`` (ZeRO-1: master weights and optimizer states to host memory;
            FSDP: FSDP2's CPU offload of the sharded parameters, gradients and states),
            ``activations`` (everything but the layer being computed), ``all`` or ``none``.
        gpu_memory_gib: memory of one GPU in GiB.
        headroom: fraction of the GPU memory kept free (allocator fragmentation, CUDA context,
            communication buffers).
    """

    seq_len: int = 4096
    micro_batch: int = 1
    global_batch_tokens: int | None = None
    param_dtype: str = "bf16"
    grad_dtype: str = "fp32"
    optimizer_dtype: str = "fp32"
    optimizer: str = "muonclip"
    recompute: str = "none"
    fp8_moe_inputs: bool = False
    offload: str = "none"
    gpu_memory_gib: float = 80.0
    headroom: float = 0.10

    def validate(self) -> None:
        for name in ("seq_len", "micro_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.global_batch_tokens is not None and (
                not isinstance(self.global_batch_tokens, int) or self.global_batch_tokens < 1):
            raise ConfigError(f"--global-batch-tokens must be a positive integer, got {self.global_batch_tokens!r}")
        for name in ("param_dtype", "grad_dtype", "optimizer_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(DTYPE_BYTES)}, "
                                  f"got {getattr(self, name)!r}")
        choices = (("optimizer", OPTIMIZERS), ("recompute", RECOMPUTE), ("offload", OFFLOAD))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not self.gpu_memory_gib > 0:
            raise ConfigError(f"--gpu-memory must be > 0 GiB, got {self.gpu_memory_gib!r}")
        if not 0 <= self.headroom < 1:
            raise ConfigError(f"--headroom must lie in [0, 1), got {self.headroom!r}")


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Stage:
    """What one pipeline rank holds.

    Attributes:
        rank: pipeline rank (0 is the first stage).
        layers: indices of its decoder layers (``vpp`` chunks, interleaved).
        embedding: it holds the token embedding.
        head: it holds the final norm and the output head.
    """

    rank: int
    layers: tuple[int, ...]
    embedding: bool
    head: bool


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU. ``on_gpu`` is what must fit; ``host`` is what offload moved to CPU memory.

    Attributes:
        parameters: the parameters this GPU stores (under FSDP the fp32 shards, which are the
            master weights).
        gradients: the gradient buffer.
        master_weights: fp32 copies kept by the optimizer when computing in bf16 (ZeRO/DDP).
        optimizer_states: Muon momentum and AdamW moments.
        muon_states: the Muon-momentum part of ``optimizer_states``.
        adamw_states: the AdamW-moments part of ``optimizer_states``.
        activations: activations kept for the backward pass under the chosen recomputation,
            for every micro-batch in flight (what stays on the GPU after offload).
        activations_no_recompute: the same without recomputation and offload, for reference.
        transient: short-lived buffers on top of the activations at the peak of forward and
            backward: FSDP's unsharded layers plus the larger of k2's QK-Clip score matrix and
            a recomputed layer; ``transient_parts`` lists each part.
        optimizer_transient: the optimizer step's work buffers (a Newton-Schulz batch); the
            activations are gone by then, so this competes with them rather than adding.
        host_states: state bytes offload moved to host memory.
        host_activations: activation bytes offload moved to host memory.
    """

    parameters: int
    gradients: int
    master_weights: int
    optimizer_states: int
    muon_states: int
    adamw_states: int
    activations: int
    activations_no_recompute: int
    transient: int
    transient_parts: dict[str, int]
    optimizer_transient: int = 0
    host_states: int = 0
    host_activations: int = 0

    @property
    def states(self) -> int:
        """Parameters, gradients, master weights and optimizer states, wherever they live."""
        return self.parameters + self.gradients + self.master_weights + self.optimizer_states

    @property
    def host(self) -> int:
        """Bytes in host memory (offload)."""
        return self.host_states + self.host_activations

    @property
    def on_gpu(self) -> int:
        """What must fit on the GPU: the states not offloaded, plus the larger of the forward and
        backward peak (activations and their transients) and the optimizer step's buffers."""
        return (self.states - self.host_states
                + max(self.activations + self.transient, self.optimizer_transient))


@dataclass(frozen=True)
class Traffic:
    """Bytes one GPU sends per optimizer step along one parallel dimension.

    Attributes:
        dim: ``dp``, ``ep``, ``pp`` or ``tp``.
        collective: the operation (all-gather, reduce-scatter, all-reduce, all-to-all, send/recv).
        group: ranks in the group.
        bytes: bytes sent per GPU per step (ring algorithms: (n-1)/n of the buffer each).
        what: what travels.
        count: how many such operations per step (``bytes / count`` each: for ``ep``, one
            dispatch or combine of one MoE layer and micro-batch).
    """

    dim: str
    collective: str
    group: int
    bytes: int
    what: str
    count: int = 1

    @property
    def per_call(self) -> int:
        return self.bytes // max(self.count, 1)


@dataclass(frozen=True)
class Plan:
    """The plan for one model, layout and settings (see :func:`make_plan`)."""

    name: str
    config: K2Config
    counts: ParamCounts
    layout: Layout
    settings: Settings
    micro_batches: int
    stage: Stage
    memory: Memory
    traffic: tuple[Traffic, ...]
    activation_per_token: ActivationBytes
    activation_per_token_no_recompute: ActivationBytes
    notes: tuple[str, ...] = field(default=())

    @property
    def budget(self) -> int:
        """Usable bytes per GPU: the memory less the headroom."""
        return int(self.settings.gpu_memory_gib * GIB * (1 - self.settings.headroom))

    @property
    def fits(self) -> bool:
        return self.memory.on_gpu <= self.budget

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: every number in bytes or counts."""
        m = self.memory
        return {
            "preset": self.name,
            "parameters": {"total": self.counts.total, "active": self.counts.active,
                           "experts": self.counts.experts, "dense": self.counts.dense,
                           "muon": self.counts.muon, "adamw": self.counts.adamw},
            "layout": dataclasses.asdict(self.layout) | {"data_parallel": self.layout.data_parallel},
            "settings": dataclasses.asdict(self.settings),
            "micro_batches_per_step": self.micro_batches,
            "stage": dataclasses.asdict(self.stage),
            "memory_per_gpu": {
                "parameters": m.parameters, "gradients": m.gradients,
                "master_weights": m.master_weights, "optimizer_states": m.optimizer_states,
                "muon_states": m.muon_states, "adamw_states": m.adamw_states,
                "activations": m.activations, "activations_no_recompute": m.activations_no_recompute,
                "transient": m.transient, "transient_parts": dict(m.transient_parts),
                "optimizer_transient": m.optimizer_transient,
                "host": m.host, "states": m.states, "on_gpu": m.on_gpu,
                "budget": self.budget, "fits": self.fits,
            },
            "activation_bytes_per_token": dataclasses.asdict(self.activation_per_token),
            "activation_bytes_per_token_no_recompute": dataclasses.asdict(self.activation_per_token_no_recompute),
            "communication_per_gpu_per_step": [dataclasses.asdict(t) | {"per_call": t.per_call}
                                               for t in self.traffic],
            "notes": list(self.notes),
        }


def stages(config: K2Config, layout: Layout) -> list[Stage]:
    """The layers of every pipeline rank: ``pp × vpp`` contiguous chunks as even as possible
    (the first chunks take one more layer), chunk ``c`` on rank ``c mod pp``; the embedding on
    rank 0 and the head on rank ``pp - 1``."""
    chunks = layout.pp * layout.vpp
    layers = config.num_hidden_layers
    if chunks > layers:
        raise ConfigError(f"pp × vpp = {layout.pp} × {layout.vpp} = {chunks} pipeline chunks for "
                          f"{layers} layers: each chunk needs a layer (--pp, --vpp)")
    base, extra = divmod(layers, chunks)
    owned: list[list[int]] = [[] for _ in range(layout.pp)]
    start = 0
    for chunk in range(chunks):
        size = base + (1 if chunk < extra else 0)
        owned[chunk % layout.pp].extend(range(start, start + size))
        start += size
    return [Stage(r, tuple(owned[r]), r == 0, r == layout.pp - 1) for r in range(layout.pp)]


def make_plan(config: K2Config | str, layout: Layout, settings: Settings | None = None,
              name: str | None = None) -> Plan:
    """Plan memory and communication per GPU (docs/plan.md); the heaviest pipeline rank counts.

    Args:
        config: a configuration or a preset name.
        layout: the GPU layout (:meth:`Layout.resolve`).
        settings: batch, precision, optimizer, recomputation, offload and memory budget.
        name: what to call the model in the output (default: the preset name, or "custom").

    Returns:
        The plan for the pipeline rank that needs the most GPU memory.

    Raises:
        ConfigError: naming the option, for an unknown preset, ``ep`` not dividing the routed
            experts, ``tp`` not dividing the heads, more pipeline chunks than layers, or a
            global batch that is not a whole number of micro-batches per data-parallel rank.
    """
    name = name or (config if isinstance(config, str) else "custom")
    if isinstance(config, str):
        try:
            config = K2Config.from_preset(config)
        except ConfigError as err:
            raise ConfigError(f"--preset: {err}") from None
    settings = settings or Settings()
    settings.validate()
    _check_layout(config, layout)
    tokens_mb = settings.seq_len * settings.micro_batch
    if settings.seq_len > config.max_position_embeddings:
        raise ConfigError(f"--seq-len {settings.seq_len} is longer than the model's "
                          f"max_position_embeddings={config.max_position_embeddings}")
    per_step = tokens_mb * layout.data_parallel
    global_tokens = settings.global_batch_tokens or per_step
    if global_tokens % per_step:
        raise ConfigError(
            f"--global-batch-tokens {global_tokens} is not a multiple of seq_len × micro_batch × "
            f"data-parallel ranks = {settings.seq_len} × {settings.micro_batch} × {layout.data_parallel} "
            f"= {per_step} tokens")
    micro_batches = global_tokens // per_step
    counts = count_parameters(config)
    b = DTYPE_BYTES[settings.param_dtype]
    acts = activation_bytes(config, b, settings.recompute, settings.fp8_moe_inputs)
    acts_none = activation_bytes(config, b, "none", False)
    plans = [_plan_stage(name, config, counts, layout, settings, micro_batches, stage, acts, acts_none)
             for stage in stages(config, layout)]
    return max(plans, key=lambda p: (p.memory.on_gpu, -p.stage.rank))


def predicted_bytes_per_rank(config: K2Config | str, world: int, *, ep: int = 1,
                             optimizer: str = "muonclip", dtype: str = "fp32",
                             dense_shard_over_ep: bool = True) -> dict[str, int]:
    """What one rank of an FSDP2 run (``world = dp_shard × ep``) holds, by the plan.

    For comparing with bytes measured on the ranks of a CPU run (fp32 everywhere by default).

    Returns:
        ``{"parameters", "gradients", "optimizer_states"}`` in bytes.
    """
    layout = Layout.resolve(world, ep=ep, sharding="fsdp", dense_shard_over_ep=dense_shard_over_ep)
    settings = Settings(seq_len=1, optimizer=optimizer, param_dtype=dtype, grad_dtype=dtype,
                        optimizer_dtype=dtype)
    memory = make_plan(config, layout, settings).memory
    return {"parameters": memory.parameters, "gradients": memory.gradients,
            "optimizer_states": memory.optimizer_states}


def _check_layout(config: K2Config, layout: Layout) -> None:
    if config.num_moe_layers == 0 and layout.ep > 1:
        raise ConfigError(f"--ep {layout.ep}: the model has no MoE layer to split")
    if config.n_routed_experts % layout.ep:
        raise ConfigError(f"--ep {layout.ep} does not divide the {config.n_routed_experts} routed experts")
    if config.num_attention_heads % layout.tp:
        raise ConfigError(f"--tp {layout.tp} does not divide the {config.num_attention_heads} attention heads")


def _in_flight(layout: Layout, micro_batches: int, rank: int) -> float:
    """Micro-batches whose activations pipeline rank ``rank`` holds at its peak (1F1B; the
    interleaved schedule's warm-up adds (pp - 1) / (pp × vpp) of that)."""
    if layout.pp == 1:
        return 1.0
    held = float(min(micro_batches, layout.pp - rank))
    if layout.vpp > 1:
        held *= 1 + (layout.pp - 1) / (layout.pp * layout.vpp)
    return held


def _plan_stage(name: str, config: K2Config, counts: ParamCounts, layout: Layout, settings: Settings,
                micro_batches: int, stage: Stage, acts: ActivationBytes, acts_none: ActivationBytes) -> Plan:
    b = DTYPE_BYTES[settings.param_dtype]
    g = DTYPE_BYTES[settings.grad_dtype]
    o = DTYPE_BYTES[settings.optimizer_dtype]
    tp, ep = layout.tp, layout.ep
    layers = [counts.layers[i] for i in stage.layers]
    edge_adamw = (counts.embedding if stage.embedding else 0) + (
        counts.head + counts.final_norm if stage.head else 0)
    # Parameters of this pipeline rank before data-parallel sharding (tensor parallelism splits all).
    dense_muon = sum(layer.muon for layer in layers) / tp
    dense_adamw = (sum(layer.adamw for layer in layers) + edge_adamw) / tp
    expert = sum(layer.experts for layer in layers) / (tp * ep)
    dense = dense_muon + dense_adamw

    data_ranks = layout.data_parallel  # dense layers' data-parallel group
    expert_ranks = layout.dp_replicate * layout.dp_shard  # each expert's data-parallel group
    if layout.sharding == "fsdp":
        dense_shard = layout.dp_shard * (ep if layout.dense_shard_over_ep else 1)
        expert_shard = layout.dp_shard
        state_dense, state_expert = dense_shard, expert_shard
    elif layout.sharding == "zero1":
        dense_shard = expert_shard = 1
        state_dense, state_expert = data_ranks, expert_ranks
    else:
        dense_shard = expert_shard = state_dense = state_expert = 1

    master = 4 if b != 4 else 0
    if settings.optimizer == "muonclip":
        muon_numbers = dense_muon / state_dense + expert / state_expert
        adamw_numbers = dense_adamw / state_dense
        muon_states, adamw_states = muon_numbers * o, 2 * adamw_numbers * o
    else:
        muon_numbers = 0.0
        adamw_numbers = dense / state_dense + expert / state_expert
        muon_states, adamw_states = 0.0, 2 * adamw_numbers * o
    stored = dense / dense_shard + expert / expert_shard
    if layout.sharding == "fsdp":
        # FSDP2 keeps the sharded parameters in fp32 (they are the master weights) and casts to
        # the compute dtype when it gathers a layer.
        parameters, master_weights = stored * max(b, master), 0.0
    else:
        parameters = stored * b
        master_weights = (dense / state_dense + expert / state_expert) * master
    gradients = stored * g

    # Activations: per token per layer, for each micro-batch in flight.
    tokens_mb = settings.seq_len * settings.micro_batch
    in_flight = _in_flight(layout, micro_batches, stage.rank)

    def held(table: ActivationBytes) -> float:
        per_mb = sum(table.layer(counts.layers[i].moe) for i in stage.layers) * tokens_mb
        if stage.head:
            per_mb_head = table.head * tokens_mb
        else:
            per_mb_head = 0
        # the last stage runs each micro-batch's backward right after its forward: one in flight
        return (per_mb * in_flight + per_mb_head) / tp

    activations_kept = held(acts)
    activations_none = held(acts_none)
    one_layer_none = max((acts_none.layer(counts.layers[i].moe) for i in stage.layers), default=0) * tokens_mb / tp
    one_layer_kept = max((acts.layer(counts.layers[i].moe) for i in stage.layers), default=0) * tokens_mb / tp

    transient: dict[str, int] = {}
    if layout.sharding == "fsdp" and (dense_shard > 1 or expert_shard > 1):
        unit = max((layer.dense / tp + layer.experts / (tp * ep) for layer in layers), default=0)
        edges = [counts.embedding] * stage.embedding + [counts.head + counts.final_norm] * stage.head
        unit = max([unit] + [edge / tp for edge in edges])  # embedding and head: units of their own
        # the gathered layer, the next one prefetched, and its unsharded gradient
        transient["fsdp unsharded layers"] = int(unit * (2 * b + b))
    if settings.recompute != "none" and stage.layers:
        transient["recomputed layer"] = int(one_layer_none - one_layer_kept)
    if stage.layers:
        # k2's MLA records the per-head max logit from a materialized score matrix (QK-Clip).
        heads = config.num_attention_heads // tp
        scores = settings.micro_batch * heads * settings.seq_len ** 2
        transient["qk-clip score matrix"] = int(scores * (b + (4 if b != 4 else 0)))
    if settings.optimizer == "muonclip":
        local_matrix = max((layer.muon for layer in layers), default=0) / tp
        gathered = min(NS_MAX_BATCH_NUMEL, max(local_matrix, expert / max(len(layers), 1)))
        transient["newton-schulz batch"] = int(gathered * NS_BUFFERS * b)
    optimizer_transient = transient.get("newton-schulz batch", 0)
    transient_bytes = transient.get("fsdp unsharded layers", 0) + max(
        transient.get("qk-clip score matrix", 0), transient.get("recomputed layer", 0))

    host_states = 0.0
    if settings.offload in ("optimizer", "all"):
        host_states = muon_states + adamw_states
        host_states += parameters + gradients if layout.sharding == "fsdp" else master_weights
    activations_on_gpu = activations_kept
    act_host = 0.0
    if settings.offload in ("activations", "all") and stage.layers:
        # everything but the layer in flight and the one being prefetched goes to host memory
        activations_on_gpu = min(activations_kept, 2 * one_layer_kept)
        act_host = activations_kept - activations_on_gpu

    memory = Memory(
        parameters=int(parameters), gradients=int(gradients), master_weights=int(master_weights),
        optimizer_states=int(muon_states + adamw_states), muon_states=int(muon_states),
        adamw_states=int(adamw_states), activations=int(activations_on_gpu),
        activations_no_recompute=int(activations_none), transient=transient_bytes,
        transient_parts=transient, optimizer_transient=optimizer_transient,
        host_states=int(host_states), host_activations=int(act_host))
    traffic = _traffic(config, counts, layout, settings, micro_batches, stage, layers,
                       dense, expert, dense_muon if settings.optimizer == "muonclip" else 0.0,
                       dense_shard, expert_shard, state_dense, state_expert)
    notes = _notes(layout, settings, micro_batches)
    return Plan(name, config, counts, layout, settings, micro_batches, stage, memory, traffic,
                acts, acts_none, notes)


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def _traffic(config: K2Config, counts: ParamCounts, layout: Layout, settings: Settings,
             micro_batches: int, stage: Stage, layers: list[LayerParams], dense: float, expert: float,
             dense_muon: float, dense_shard: int, expert_shard: int, state_dense: int,
             state_expert: int) -> tuple[Traffic, ...]:
    b = DTYPE_BYTES[settings.param_dtype]
    g = DTYPE_BYTES[settings.grad_dtype]
    o = DTYPE_BYTES[settings.optimizer_dtype]
    n = micro_batches
    out: list[Traffic] = []
    # data parallelism
    ep_copies = 1 if layout.dense_shard_over_ep else layout.ep
    groups = ((dense, "dense", dense_shard if layout.sharding == "fsdp" else state_dense),
              (expert, "expert", expert_shard if layout.sharding == "fsdp" else state_expert))
    for numbers, kind, group in groups:
        if numbers == 0 or group == 1 and layout.sharding == "zero1":
            continue
        if layout.sharding == "fsdp":
            if group > 1:
                out.append(Traffic("dp", "all-gather", group, int(2 * n * _ring(group) * numbers * b),
                                   f"{kind} parameters, gathered for forward and again for backward, "
                                   "every micro-batch", 2 * n))
                out.append(Traffic("dp", "reduce-scatter", group, int(n * _ring(group) * numbers * g),
                                   f"{kind} gradients, every micro-batch", n))
            # replicas of the shards (HSDP; and the ep ranks when dense layers are not sharded
            # over them) all-reduce the reduced shard after every reduce-scatter
            r = layout.dp_replicate * (ep_copies if kind == "dense" else 1)
            if r > 1:
                out.append(Traffic("dp", "all-reduce", r, int(2 * n * _ring(r) * numbers / group * g),
                                   f"{kind} gradient shards across {r} replicas, every micro-batch", n))
        elif layout.sharding == "zero1":
            out.append(Traffic("dp", "reduce-scatter", group, int(_ring(group) * numbers * g),
                               f"{kind} gradients, once per step"))
            out.append(Traffic("dp", "all-gather", group, int(_ring(group) * numbers * b),
                               f"updated {kind} parameters, once per step"))
        else:
            ranks = layout.data_parallel if kind == "dense" else layout.dp_replicate * layout.dp_shard
            if ranks > 1:
                out.append(Traffic("dp", "all-reduce", ranks, int(2 * _ring(ranks) * numbers * g),
                                   f"{kind} gradients, once per step"))
    if settings.optimizer == "muonclip" and layout.sharding != "ddp":
        # Newton-Schulz needs whole matrices: each matrix's owner rank gathers its shards and
        # scatters the orthogonalized update back (balanced: every rank owns 1/n of the numbers).
        muon_groups = ((dense_muon, state_dense, "dense"), (expert, state_expert, "expert"))
        for numbers, group, kind in muon_groups:
            if numbers and group > 1:
                out.append(Traffic("dp", "gather + scatter", group,
                                   int(2 * _ring(group) * numbers / group * o),
                                   f"{kind} Muon matrices to their owner rank and the update back, once per step"))
    # expert parallelism: dispatch and combine, forward and backward, per MoE layer and micro-batch
    tokens_mb = settings.seq_len * settings.micro_batch
    moe_layers = sum(1 for layer in layers if layer.moe)
    if layout.ep > 1 and moe_layers:
        passes = 6 if settings.recompute == "full" else 4
        per = _ring(layout.ep) * config.num_experts_per_tok * tokens_mb * config.hidden_size * b / layout.tp
        out.append(Traffic("ep", "all-to-all", layout.ep, int(passes * per * moe_layers * n),
                           f"top-{config.num_experts_per_tok} token copies to their experts' ranks and back "
                           f"({'forward, recomputed forward' if passes == 6 else 'forward'} and backward), "
                           f"{moe_layers} MoE layers × {_n(n, 'micro-batch')}", passes * moe_layers * n))
    # pipeline parallelism: hidden states forward, their gradients backward, at each chunk edge
    if layout.pp > 1:
        per = tokens_mb * config.hidden_size * b / layout.tp
        out.append(Traffic("pp", "send/recv", 2, int(2 * layout.vpp * per * n),
                           f"hidden states and their gradients at {layout.vpp} chunk boundaries × {_n(n, 'micro-batch')}",
                           2 * layout.vpp * n))
    if layout.tp > 1 and layers:
        passes = 12 if settings.recompute == "full" else 8
        per = _ring(layout.tp) * tokens_mb * config.hidden_size * b
        out.append(Traffic("tp", "all-gather + reduce-scatter", layout.tp, int(passes * per * len(layers) * n),
                           "sequence-parallel activations, 2 of each per layer forward and backward",
                           passes * len(layers) * n))
    return tuple(out)


def _notes(layout: Layout, settings: Settings, micro_batches: int) -> tuple[str, ...]:
    notes = []
    if layout.pp > 1:
        notes.append("k2 has no pipeline-parallel implementation: pp/vpp here is arithmetic for a "
                     "layout k2 cannot run yet")
        if micro_batches < layout.pp:
            notes.append(f"{micro_batches} micro-batches per step for {layout.pp} pipeline stages: "
                         "the pipeline bubble dominates")
        elif layout.vpp > 1 and micro_batches % layout.pp:
            notes.append(f"interleaved 1F1B needs micro-batches ({micro_batches}) divisible by pp ({layout.pp})")
    if layout.tp > 1:
        notes.append("k2 has no tensor parallelism: tp here is arithmetic only")
    if layout.sharding == "zero1":
        notes.append("k2 shards with FSDP2 (--sharding fsdp), not ZeRO-1: zero1 plans the K2 report's layout")
    if layout.ep > 1:
        notes.append("expert parallelism in k2 is the all_to_all path of issue 23 (k2.parallel.expert)")
    if settings.recompute != "none":
        notes.append(f"k2's model keeps every activation today: --recompute {settings.recompute} "
                     "plans a recomputation k2 does not implement yet")
    if settings.fp8_moe_inputs:
        notes.append("k2 keeps activations in the compute dtype: FP8 storage of expert inputs is not implemented")
    if settings.offload in ("activations", "all"):
        notes.append("k2 has no activation offload: the activation offload here is arithmetic only")
    if settings.offload in ("optimizer", "all") and layout.sharding == "zero1":
        notes.append("k2 offloads only through FSDP2's CPUOffloadPolicy (parameters, gradients "
                     "and optimizer states together)")
    return tuple(notes)


# ---------------------------------------------------------------------------- the K2 report
@dataclass(frozen=True)
class ReportCheck:
    """One statement of the K2 report next to our recomputation of it."""

    what: str
    report: str
    ours: str


def report_settings(gpu_memory_gib: float = 80.0, headroom: float = 0.10) -> Settings:
    """The K2 report's training settings as we read them (§2.4; assumptions in REPORT_ASSUMED)."""
    return Settings(seq_len=REPORT.seq_len, micro_batch=REPORT_ASSUMED.micro_batch,
                    global_batch_tokens=REPORT_ASSUMED.global_batch_tokens, param_dtype="bf16",
                    grad_dtype="fp32", optimizer_dtype="fp32", optimizer="muonclip",
                    recompute="selective", fp8_moe_inputs=True, offload="activations",
                    gpu_memory_gib=gpu_memory_gib, headroom=headroom)


def report_layout(gpus: int = REPORT_ASSUMED.gpus) -> Layout:
    """PP 16 with virtual stages, EP 16, ZeRO-1 over the remaining data-parallel ranks."""
    return Layout.resolve(gpus, pp=REPORT.pp, vpp=REPORT_ASSUMED.vpp, ep=REPORT.ep,
                          sharding="zero1")


def compare_with_report(gpus: int = REPORT_ASSUMED.gpus, gpu_memory_gib: float = 80.0,
                        headroom: float = 0.10) -> tuple[Plan, list[ReportCheck]]:
    """Plan the K2 report's layout on ``gpus`` GPUs and set its stated numbers beside ours.

    Returns:
        The plan and the rows of the comparison.

    Raises:
        ConfigError: ``gpus`` is not a multiple of the 256-GPU model-parallel group.
    """
    group = REPORT.model_parallel_group
    if gpus % group:
        raise ConfigError(f"--gpus {gpus}: the K2 report's layout needs a multiple of its "
                          f"{group}-GPU model-parallel group (pp 16 × ep 16)")
    config = K2Config.from_preset("kimi-k2")
    counts = count_parameters(config)
    settings = report_settings(gpu_memory_gib, headroom)
    plan = make_plan(config, report_layout(gpus), settings, name="kimi-k2 (the K2 report's layout)")
    smallest = make_plan(config, report_layout(group), settings)
    smallest_off = make_plan(config, report_layout(group), dataclasses.replace(settings, offload="all"))
    whole = counts.total * (2 + 4)
    held_by_group = 0.0
    for rank_stage in stages(config, plan.layout):
        layers = [counts.layers[i] for i in rank_stage.layers]
        edge = (counts.embedding if rank_stage.embedding else 0) + (
            counts.head + counts.final_norm if rank_stage.head else 0)
        dense = sum(layer.dense for layer in layers) + edge
        expert = sum(layer.experts for layer in layers) / REPORT.ep
        held_by_group += REPORT.ep * (dense + expert) * 6
    m = plan.memory
    rows = [
        ReportCheck("total parameters", f"{REPORT.total_params / 1e12:.2f}T",
                    f"{counts.total:,} ({counts.total / 1e12:.3f}T; no multi-token-prediction layer)"),
        ReportCheck("active parameters per token", f"{REPORT.active_params / 1e9:.1f}B",
                    f"{counts.active:,} ({counts.active / 1e9:.2f}B, embedding and head included)"),
        ReportCheck("bf16 parameters + fp32 gradient buffer", "about 6 TB over a 256-GPU model-parallel group",
                    f"{whole / 1e12:.2f} TB for the model once; {held_by_group / 1e12:.2f} TB held by the "
                    f"group when the dense layers are replicated on the 16 EP ranks"),
        ReportCheck("states per GPU (parameters, gradients, optimizer)", "about 30 GB",
                    f"{m.states / 1e9:.1f} GB on pipeline rank {plan.stage.rank} at {gpus} GPUs "
                    f"(optimizer states and master weights {(m.optimizer_states + m.master_weights) / 1e9:.1f} GB "
                    f"sharded over {plan.layout.dp_replicate * plan.layout.dp_shard} expert-data-parallel ranks)"),
        ReportCheck("optimizer states at 32 nodes (256 GPUs, no data parallelism)",
                    "offloaded in part to CPU memory",
                    f"{(smallest.memory.optimizer_states + smallest.memory.master_weights) / 1e9:.1f} GB per GPU "
                    f"(total on GPU {smallest.memory.on_gpu / GIB:.1f} GiB: "
                    f"{'fits' if smallest.fits else 'does not fit'}; with them offloaded "
                    f"{smallest_off.memory.on_gpu / GIB:.1f} GiB: {'fits' if smallest_off.fits else 'does not fit'})"),
        ReportCheck("activations", "the rest of GPU memory, after selective recomputation, FP8 storage "
                    "and CPU offload", f"{m.activations_no_recompute / GIB:.1f} GiB per GPU without any of them; "
                    f"{plan.memory.activations / GIB:.1f} GiB left on the GPU with them "
                    f"({m.host / GIB:.1f} GiB to host)"),
        ReportCheck("host memory per node (8 GPUs)", "2 TB of RAM per node",
                    f"{8 * m.host / 1e12:.2f} TB of offloaded activations on the node of pipeline rank "
                    f"{plan.stage.rank}"),
        ReportCheck("sequence length, global batch", "4096 tokens, 67M tokens",
                    f"{settings.seq_len} tokens, {settings.global_batch_tokens:,} tokens "
                    f"= {plan.micro_batches} micro-batches per data-parallel rank"),
    ]
    return plan, rows


DIFFERENCES = (
    "sharding: k2 shards with FSDP2 over a DeviceMesh (parameters, gradients and optimizer states); "
    "the report keeps bf16 parameters and an fp32 gradient buffer whole within each 256-GPU "
    "model-parallel group and shards only the optimizer states (ZeRO-1)",
    "pipeline: the report runs 16 pipeline stages with virtual stages (interleaved 1F1B); k2 has "
    "no pipeline-parallel implementation",
    "activations: the report recomputes cheap stages, stores some in FP8 and offloads the rest to "
    "CPU memory; k2's model keeps every activation in the compute dtype",
    "QK-Clip statistics: k2's MLA materializes the [heads, T, T] score matrix to record the "
    "per-head max logit (6 GiB per sequence at 4096 tokens in bf16 plus its fp32 copy); an "
    "attention kernel that returns the max would not need it",
    "GPU count, virtual stages and micro-batch size are not in the report; we assume "
    f"{REPORT_ASSUMED.gpus} GPUs, vpp {REPORT_ASSUMED.vpp} and one sequence per micro-batch",
)


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else ("es" if noun.endswith("ch") else "s"))
