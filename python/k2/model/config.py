"""The K2 model configuration: one dataclass, three presets, and the Hub ``config.json`` format.

Field names are those of the published DeepSeek-V3 / Kimi-K2 ``config.json`` files and of
transformers' ``DeepseekV3Config``, so a k2 model exports to (and imports from) the Hub layout.

Two ``config.json`` dialects exist, and :meth:`K2Config.from_hf_dict` reads both:

* the published checkpoints (DeepSeek-V3, Kimi-K2) carry ``rope_theta`` and ``rope_scaling``
  (``{"type": "yarn", "factor": ...}``) plus keys of DeepSeek's own modeling code
  (``auto_map``, ``topk_method``, ``scoring_func``, ``quantization_config``, ...);
* transformers 5 writes ``rope_parameters`` (``rope_theta`` folded in, ``rope_type``),
  ``rope_interleave``, ``head_dim`` and ``qk_head_dim``.

:meth:`K2Config.to_hf_dict` writes the transformers 5 dialect, with ``model_type: deepseek_v3``
(transformers has no ``kimi_k2`` type).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from k2.errors import ConfigError

# Keys a config.json may carry that k2 reads but does not store, with why. Values that would
# change the architecture are checked against what k2 implements (see `_check_fixed_keys`).
IGNORED_HF_KEYS: dict[str, str] = {
    "architectures": "k2 always builds a causal LM",
    "auto_map": "points at DeepSeek's remote modeling code; k2 has its own",
    "transformers_version": "bookkeeping",
    "torch_dtype": "a checkpoint's storage dtype; k2 models are cast by the caller",
    "dtype": "a checkpoint's storage dtype; k2 models are cast by the caller",
    "quantization_config": "FP8 weights are dequantized when the state dict is loaded",
    "use_cache": "generation always uses the KV cache",
    "pretraining_tp": "a Megatron tensor-parallel hint with no effect on the math",
    "ep_size": "expert parallelism is applied outside the model",
    "num_nextn_predict_layers": "multi-token-prediction layers are skipped (with a warning on load)",
    "num_mtp_layers": "multi-token-prediction layers are skipped (with a warning on load)",
    "seq_aux": "the sequence-wise balance loss is set by seq_aux_loss_alpha (k2's training choice)",
    "aux_loss_alpha": "the sequence-wise balance loss is set by seq_aux_loss_alpha (k2's training choice)",
    "output_router_logits": "router statistics come from MoE.pop_expert_load()",
    "attention_dropout": "must be 0: K2 trains without attention dropout",
    "_name_or_path": "bookkeeping",
    "output_hidden_states": "transformers output switch",
    "output_attentions": "transformers output switch",
    "return_dict": "transformers output switch",
    "id2label": "classification heads only",
    "label2id": "classification heads only",
    "problem_type": "classification heads only",
    "chunk_size_feed_forward": "transformers memory switch",
    "is_encoder_decoder": "always False for K2",
}

# Keys whose value is fixed by the architecture k2 implements: (key, accepted values).
_FIXED_HF_KEYS: dict[str, tuple[Any, ...]] = {
    "model_type": ("deepseek_v3", "kimi_k2"),
    "hidden_act": ("silu",),
    "scoring_func": ("sigmoid",),
    "topk_method": ("noaux_tc",),
    "moe_layer_freq": (1,),
    "attention_bias": (False,),
    "attention_dropout": (0, 0.0),
    "is_encoder_decoder": (False,),
}

# Keys derived from other fields: checked for consistency, then dropped.
_DERIVED_HF_KEYS = ("num_key_value_heads", "head_dim", "qk_head_dim")


@dataclass
class K2Config:
    """Hyperparameters of a K2 (DeepSeek-V3-family) decoder.

    Defaults are the full Kimi-K2 configuration (see docs/model.md). ``rope_scaling`` holds YaRN's
    parameters in the published form (``{"type": "yarn", "factor": 32.0, ...}``) or is ``None``
    for plain RoPE. ``seq_aux_loss_alpha`` weights DeepSeek-V3's sequence-wise balance loss
    (0 disables it; it is a k2 training choice, not part of the Hub format).
    """

    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    n_shared_experts: int = 1
    n_routed_experts: int = 384
    routed_scaling_factor: float = 2.827
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 50000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 32.0,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
        }
    )
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585
    pad_token_id: int | None = None
    seq_aux_loss_alpha: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: the non-rotary part plus the rotary part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        """How many layers hold an MoE (all after the first ``first_k_dense_replace``)."""
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """Attention scale: ``qk_head_dim^-0.5``, times YaRN's ``mscale²`` when YaRN is on."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None:
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                mscale = yarn_mscale(float(self.rope_scaling["factor"]), mscale_all_dim)
                scale *= mscale * mscale
        return scale

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`ConfigError`, naming the field, if the configuration is inconsistent."""
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "n_routed_experts", "kv_lora_rank",
            "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
            "num_experts_per_tok", "max_position_embeddings",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"K2Config.{name} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and (
            not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1
        ):
            raise ConfigError(
                f"K2Config.q_lora_rank must be a positive integer or None, got {self.q_lora_rank!r}"
            )
        if self.n_shared_experts < 0:
            raise ConfigError(f"K2Config.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"K2Config.qk_rope_head_dim must be even (RoPE rotates pairs), "
                f"got {self.qk_rope_head_dim}"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                f"K2Config.first_k_dense_replace={self.first_k_dense_replace} must lie in "
                f"[0, num_hidden_layers={self.num_hidden_layers}]"
            )
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"K2Config.n_routed_experts={self.n_routed_experts} is not divisible by "
                f"n_group={self.n_group}"
            )
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            raise ConfigError(
                f"K2Config.n_group={self.n_group} leaves {per_group} expert per group; group "
                "scores sum each group's top-2 experts, so every group needs at least 2"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(
                f"K2Config.topk_group={self.topk_group} is larger than n_group={self.n_group}"
            )
        reachable = self.topk_group * per_group
        if self.num_experts_per_tok > reachable:
            raise ConfigError(
                f"K2Config.num_experts_per_tok={self.num_experts_per_tok} is larger than the "
                f"{reachable} experts reachable through topk_group={self.topk_group} groups of "
                f"{per_group}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                raise ConfigError(
                    f"K2Config.rope_scaling type {kind!r} is not supported (only 'yarn')"
                )
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ConfigError(f"K2Config.rope_scaling is missing {key!r} for YaRN")
        if self.seq_aux_loss_alpha < 0:
            raise ConfigError(
                f"K2Config.seq_aux_loss_alpha must be >= 0, got {self.seq_aux_loss_alpha}"
            )

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str) -> K2Config:
        """A pinned configuration: ``"kimi-k2"``, ``"small"`` (~150M, one GPU) or ``"tiny"``.

        Raises:
            ConfigError: for an unknown preset name.
        """
        try:
            overrides = PRESETS[name]
        except KeyError:
            raise ConfigError(
                f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}"
            ) from None
        return cls(**overrides)

    # ------------------------------------------------------------------ config.json
    def to_hf_dict(self) -> dict[str, Any]:
        """The configuration as a transformers-5 ``config.json`` dict (``model_type: deepseek_v3``).

        Every key is an attribute of ``transformers.DeepseekV3Config``.
        """
        rope_parameters: dict[str, Any] = {"rope_theta": float(self.rope_theta)}
        if self.rope_scaling is None:
            rope_parameters["rope_type"] = "default"
        else:
            scaling = {k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_type")}
            rope_parameters.update(scaling, rope_type="yarn")
        out: dict[str, Any] = {
            "model_type": "deepseek_v3",
            "architectures": ["DeepseekV3ForCausalLM"],
        }
        for f in dataclasses.fields(self):
            if f.name in ("rope_theta", "rope_scaling", "seq_aux_loss_alpha"):
                continue
            out[f.name] = getattr(self, f.name)
        out.update(
            rope_parameters=rope_parameters,
            num_key_value_heads=self.num_attention_heads,
            head_dim=self.qk_rope_head_dim,
            qk_head_dim=self.qk_head_dim,
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            num_nextn_predict_layers=0,
        )
        return out

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> K2Config:
        """Read a ``config.json`` dict in either dialect (published Hub or transformers 5).

        Keys k2 does not use are listed in :data:`IGNORED_HF_KEYS`; keys that fix the
        architecture (``model_type``, ``scoring_func``, ``hidden_act``, ...) must hold a value k2
        implements.

        Raises:
            ConfigError: naming every unknown or misspelt key, or a value k2 cannot honour.
        """
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        known = names | set(IGNORED_HF_KEYS) | set(_FIXED_HF_KEYS) | set(_DERIVED_HF_KEYS)
        known |= {"rope_parameters"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config.json key(s): {', '.join(unknown)}")
        for key, accepted in _FIXED_HF_KEYS.items():
            if key in d and d[key] not in accepted:
                raise ConfigError(
                    f"config.json {key}={d[key]!r} is not supported by k2 (accepted: {accepted})"
                )
        kwargs = {k: v for k, v in d.items() if k in names}
        rope_parameters = d.get("rope_parameters")
        if rope_parameters is not None:
            if "rope_scaling" in d or "rope_theta" in d:
                raise ConfigError(
                    "config.json gives both rope_parameters and rope_theta/rope_scaling; "
                    "use one dialect"
                )
            rope = dict(rope_parameters)
            kind = rope.pop("rope_type", rope.pop("type", "default"))
            rope.pop("type", None)
            kwargs["rope_theta"] = rope.pop("rope_theta", cls.rope_theta)
            kwargs["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
        elif "rope_scaling" in d:
            kwargs["rope_scaling"] = dict(d["rope_scaling"]) if d["rope_scaling"] else None
        else:
            kwargs["rope_scaling"] = None
        # Fields a config.json omits take transformers' DeepseekV3Config defaults, not Kimi-K2's.
        for key, value in _HF_DEFAULTS.items():
            kwargs.setdefault(key, value)
        config = cls(**kwargs)
        heads = d.get("num_key_value_heads")
        if heads is not None and heads != config.num_attention_heads:
            raise ConfigError(
                f"config.json num_key_value_heads={heads} differs from num_attention_heads="
                f"{config.num_attention_heads}; MLA has one latent shared by all heads"
            )
        for key, expected in (("head_dim", config.qk_rope_head_dim), ("qk_head_dim", config.qk_head_dim)):
            if d.get(key) is not None and d[key] != expected:
                raise ConfigError(f"config.json {key}={d[key]} is inconsistent: expected {expected}")
        return config


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# transformers' DeepseekV3Config defaults for the fields a config.json may leave out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "n_group": 8,
    "topk_group": 4,
    "first_k_dense_replace": 3,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The published Kimi-K2 configuration (the dataclass defaults).
    "kimi-k2": {},
    # ~10M parameters: trains on two CPU cores in minutes.
    "tiny": {
        "vocab_size": 8192,
        "hidden_size": 256,
        "intermediate_size": 768,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "n_shared_experts": 1,
        "n_routed_experts": 16,
        "num_experts_per_tok": 2,
        "kv_lora_rank": 64,
        "q_lora_rank": 128,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 1024,
        "rope_scaling": None,
        "bos_token_id": None,
        "eos_token_id": None,
    },
    # ~152M parameters (~57M active): a research model for one GPU.
    "small": {
        "vocab_size": 32768,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "n_shared_experts": 1,
        "n_routed_experts": 48,
        "num_experts_per_tok": 4,
        "kv_lora_rank": 128,
        "q_lora_rank": 256,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 4096,
        "rope_scaling": None,
        "bos_token_id": None,
        "eos_token_id": None,
    },
}
