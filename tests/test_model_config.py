"""K2Config: presets, the exact K2 counts, config.json in both dialects, and clear errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV3Config

from k2.errors import ConfigError
from k2.model import K2Config, K2ForCausalLM

FIXTURES = Path(__file__).parent / "fixtures"


def meta_counts(config: K2Config) -> tuple[int, int]:
    with torch.device("meta"):
        return K2ForCausalLM(config).parameter_counts()


def test_kimi_k2_preset_has_the_published_shape_and_exact_counts() -> None:
    config = K2Config.from_preset("kimi-k2")
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (163840, 7168, 61)
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_shared_experts) == (384, 8, 1)
    total, active = meta_counts(config)
    assert total == 1_026_408_209_408
    # Independent count: everything minus the 376 idle experts of each of the 60 MoE layers.
    per_expert = 3 * 7168 * 2048
    assert active == total - 60 * (384 - 8) * per_expert
    assert round(active / 1e9, 2) == 32.86


def test_kimi_k2_preset_equals_the_published_config_json() -> None:
    published = K2Config.from_hf_dict(json.loads((FIXTURES / "kimi_k2_config.json").read_text()))
    preset = K2Config.from_preset("kimi-k2")
    assert dataclasses.asdict(published) == dataclasses.asdict(preset)


def test_tiny_and_small_presets_are_pinned() -> None:
    tiny = K2Config.from_preset("tiny")
    assert (tiny.vocab_size, tiny.hidden_size, tiny.num_hidden_layers) == (8192, 256, 4)
    assert (tiny.first_k_dense_replace, tiny.intermediate_size, tiny.num_attention_heads) == (1, 768, 4)
    assert (tiny.q_lora_rank, tiny.kv_lora_rank) == (128, 64)
    assert (tiny.qk_nope_head_dim, tiny.qk_rope_head_dim, tiny.v_head_dim) == (32, 16, 32)
    assert (tiny.n_routed_experts, tiny.moe_intermediate_size, tiny.num_experts_per_tok) == (16, 128, 2)
    assert (tiny.n_shared_experts, tiny.max_position_embeddings) == (1, 1024)
    tiny_total, _ = meta_counts(tiny)
    assert 9e6 < tiny_total < 11e6
    small_total, small_active = meta_counts(K2Config.from_preset("small"))
    assert 130e6 < small_total < 170e6 and small_active < small_total / 2


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="huge.*kimi-k2"):
        K2Config.from_preset("huge")


@pytest.mark.parametrize("fixture", ["deepseek_v3_config.json", "kimi_k2_config.json"])
def test_published_config_json_files_load(fixture: str) -> None:
    raw = json.loads((FIXTURES / fixture).read_text())
    config = K2Config.from_hf_dict(raw)
    for key in ("hidden_size", "n_routed_experts", "n_group", "topk_group", "routed_scaling_factor",
                "q_lora_rank", "max_position_embeddings", "first_k_dense_replace"):  # fmt: skip
        assert getattr(config, key) == raw[key]
    assert config.rope_theta == raw["rope_theta"]
    assert config.rope_scaling["factor"] == raw["rope_scaling"]["factor"]
    # transformers reads the same file to the same architecture.
    reference = DeepseekV3Config(**raw)
    assert reference.rope_parameters["rope_theta"] == config.to_hf_dict()["rope_parameters"]["rope_theta"]


@pytest.mark.parametrize("preset", ["tiny", "small", "kimi-k2"])
def test_to_hf_dict_keys_are_transformers_attributes_and_round_trip(preset: str) -> None:
    config = K2Config.from_preset(preset)
    exported = config.to_hf_dict()
    reference = DeepseekV3Config(**exported)
    for key, value in exported.items():
        assert hasattr(reference, key), key
        if key == "rope_parameters":
            for name, item in value.items():
                assert reference.rope_parameters[name] == item
        else:
            assert getattr(reference, key) == value, key
    # k2 -> dict -> k2, and transformers' own config.json -> k2.
    assert K2Config.from_hf_dict(exported) == config
    assert K2Config.from_hf_dict(reference.to_dict()) == config


def test_transformers_softmax_scale_matches_yarn_mscale() -> None:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    config = K2Config.from_preset("kimi-k2")
    reference = DeepseekV3Config(**config.to_hf_dict())
    expected = yarn_apply_mscale(reference.rope_parameters, reference.qk_head_dim**-0.5)
    assert config.softmax_scale == pytest.approx(expected, rel=1e-12)


def test_unknown_and_misspelt_keys_are_named() -> None:
    raw = K2Config.from_preset("tiny").to_hf_dict()
    raw["n_routed_expert"] = 16
    raw["frobnicate"] = True
    with pytest.raises(ConfigError, match="frobnicate, n_routed_expert"):
        K2Config.from_hf_dict(raw)


@pytest.mark.parametrize(
    ("key", "value"),
    [("scoring_func", "softmax"), ("model_type", "llama"), ("hidden_act", "gelu"), ("moe_layer_freq", 2)],
)
def test_values_k2_does_not_implement_are_rejected(key: str, value: object) -> None:
    raw = K2Config.from_preset("tiny").to_hf_dict()
    raw[key] = value
    with pytest.raises(ConfigError, match=key):
        K2Config.from_hf_dict(raw)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"topk_group": 3, "n_group": 2}, "topk_group=3 is larger than n_group=2"),
        ({"n_group": 4, "topk_group": 1, "num_experts_per_tok": 5}, "num_experts_per_tok=5"),
        ({"n_group": 16, "topk_group": 2}, "n_group=16 leaves 1 expert per group"),
        ({"n_group": 3}, "not divisible by n_group=3"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"qk_rope_head_dim": 15}, "qk_rope_head_dim must be even"),
        ({"first_k_dense_replace": 9}, "first_k_dense_replace=9"),
        ({"q_lora_rank": -1}, "q_lora_rank"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear'"),
    ],
)
def test_inconsistent_configs_name_the_field(overrides: dict, message: str) -> None:
    fields = {**dataclasses.asdict(K2Config.from_preset("tiny")), **overrides}
    with pytest.raises(ConfigError, match=message):
        K2Config(**fields)
