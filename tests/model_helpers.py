"""Helpers shared by the model tests: small random configurations and non-trivial weights."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from k2.model import K2Config, K2ForCausalLM

# A small configuration exercising everything: grouped routing, no q LoRA, YaRN, 2 dense layers.
BASE: dict[str, Any] = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=12,
    first_k_dense_replace=2,
    max_position_embeddings=64,
    routed_scaling_factor=2.5,
    rope_scaling={
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "mscale": 1.0,
        "mscale_all_dim": 0.7,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    bos_token_id=None,
    eos_token_id=None,
)


def small_config(**overrides: Any) -> K2Config:
    """``BASE`` with ``overrides`` applied."""
    return K2Config(**{**BASE, **overrides})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter and selection bias random values (norm gains around 1), so that
    no term of the forward is trivially zero or one."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in sorted(model.state_dict().items()):
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        if name.endswith("e_score_correction_bias"):
            tensor.copy_(0.1 * noise)
        elif tensor.dim() == 1:
            tensor.copy_(1 + 0.1 * noise)
        else:
            tensor.copy_(scale * noise)
    return model


def random_model(seed: int = 0, **overrides: Any) -> K2ForCausalLM:
    torch.manual_seed(seed)
    return randomize(K2ForCausalLM(small_config(**overrides)), seed)


def config_fields(config: K2Config) -> dict[str, Any]:
    return dataclasses.asdict(config)
