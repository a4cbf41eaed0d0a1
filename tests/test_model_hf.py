"""Interoperability with transformers' DeepseekV3ForCausalLM through the Hub file layout.

k2 -> Hub: ``to_hf_state_dict()`` written with the safetensors package beside ``to_hf_dict()`` as
config.json, loaded by transformers' ``from_pretrained``; Hub -> k2: transformers'
``save_pretrained`` output read with the safetensors package into ``from_hf_state_dict``.
Either way the fp32 logits must agree to 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import random_model, randomize, small_config
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from k2.errors import CheckpointError
from k2.model import K2Config, K2ForCausalLM
from k2.model.hub_names import dequantize_fp8

TOLERANCE = 1e-4

CONFIGS: dict[str, dict[str, Any]] = {
    # grouped routing (4 groups of 2, top-2 groups), q_lora None, YaRN, 2 of 3 layers dense
    "grouped-noqlora-yarn": {},
    # q LoRA, one group, plain RoPE, tied embeddings
    "qlora-tied": dict(
        q_lora_rank=24, n_group=1, topk_group=1, rope_scaling=None, first_k_dense_replace=1,
        tie_word_embeddings=True,
    ),
    # every layer MoE, unnormalized top-k weights, non-interleaved RoPE, 2 groups of 4
    "all-moe-unnormalized": dict(
        first_k_dense_replace=0, norm_topk_prob=False, n_group=2, topk_group=1,
        num_experts_per_tok=2, rope_interleave=False, q_lora_rank=16,
    ),
    # several dense layers, YaRN with mscale == mscale_all_dim, two shared experts
    "dense-heavy-yarn": dict(
        num_hidden_layers=4, first_k_dense_replace=3, n_shared_experts=2, q_lora_rank=20,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8,
                      "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 4, "beta_slow": 1},
    ),
}  # fmt: skip


def write_hub_checkpoint(model: K2ForCausalLM, directory: Path) -> None:
    tensors = {name: t.detach().clone().contiguous() for name, t in model.to_hf_state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict()))


def inputs(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 21), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_k2_checkpoint_loads_in_transformers_with_equal_logits(name: str, tmp_path: Path) -> None:
    model = random_model(seed=3, **CONFIGS[name]).eval()
    write_hub_checkpoint(model, tmp_path)
    reference, info = DeepseekV3ForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference.eval()
    ids = inputs(model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids, labels=ids)
        theirs = reference(ids, labels=ids)
    assert (ours.logits - theirs.logits).abs().max().item() <= TOLERANCE
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), abs=TOLERANCE)


@pytest.mark.parametrize("name", ["grouped-noqlora-yarn", "all-moe-unnormalized"])
def test_transformers_save_pretrained_loads_in_k2_with_equal_logits(name: str, tmp_path: Path) -> None:
    hub_dict = small_config(**CONFIGS[name]).to_hf_dict()
    torch.manual_seed(5)
    reference = randomize(DeepseekV3ForCausalLM(DeepseekV3Config(**hub_dict)), seed=5).eval()
    reference.save_pretrained(tmp_path)
    config = K2Config.from_hf_dict(json.loads((tmp_path / "config.json").read_text()))
    state_dict = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in state_dict  # per-expert Hub names
    model = K2ForCausalLM.from_hf_state_dict(config, state_dict).eval()
    ids = inputs(config.vocab_size, seed=2)
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= TOLERANCE


def test_transformers_fused_in_memory_experts_also_load() -> None:
    torch.manual_seed(6)
    hub_dict = small_config().to_hf_dict()
    reference = randomize(DeepseekV3ForCausalLM(DeepseekV3Config(**hub_dict)), seed=6).eval()
    fused = reference.state_dict()  # experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]
    assert "model.layers.2.mlp.experts.gate_up_proj" in fused
    model = K2ForCausalLM.from_hf_state_dict(small_config(), fused).eval()
    ids = inputs(97, seed=3)
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= TOLERANCE


def test_hub_state_dict_uses_per_expert_views_not_copies() -> None:
    model = random_model()
    hub = model.to_hf_state_dict()
    stack = model.model.layers[2].mlp.experts.down_proj
    view = hub["model.layers.2.mlp.experts.5.down_proj.weight"]
    assert view.shape == stack.shape[1:]
    assert view.data_ptr() == stack[5].data_ptr()
    assert hub["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert not any(name.endswith("experts.gate_proj") for name in hub)
    # The native state dict keeps the stacks [E, out, in].
    assert model.state_dict()["model.layers.2.mlp.experts.gate_proj"].shape == (8, 16, 32)


def test_load_errors_name_the_tensor() -> None:
    model = random_model()
    hub = {k: v.clone() for k, v in model.to_hf_state_dict().items()}
    wrong = dict(hub)
    wrong["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"kv_b_proj.weight.*\(3, 3\)"):
        model.load_hf_state_dict(wrong)
    missing = dict(hub)
    del missing["model.layers.2.mlp.experts.3.up_proj.weight"]
    missing["model.layers.0.mlp.bogus.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj.*bogus"):
        model.load_hf_state_dict(missing)
    assert model.load_hf_state_dict(missing, strict=False) == (
        ["model.layers.2.mlp.experts.3.up_proj.weight"],
        ["model.layers.0.mlp.bogus.weight"],
    )


def test_mtp_layers_are_skipped_with_a_warning() -> None:
    model = random_model()
    hub = {k: v.clone() for k, v in model.to_hf_state_dict().items()}
    hub["model.layers.3.eh_proj.weight"] = torch.zeros(4, 4)  # layer 3 = MTP for a 3-layer model
    with pytest.warns(UserWarning, match=r"multi-token-prediction layer\(s\) \[3\]"):
        model.load_hf_state_dict(hub)


def test_fp8_block_quantized_weights_are_dequantized() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 200, generator=generator).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=generator) + 0.5  # ceil(300/128) x ceil(200/128) blocks
    dense = dequantize_fp8(weight, scale)
    # Element (i, j) is scaled by block (i // 128, j // 128): check every block's corner.
    for i in (0, 127, 128, 255, 256, 299):
        for j in (0, 127, 128, 199):
            assert dense[i, j] == weight[i, j].float() * scale[i // 128, j // 128]

    model = random_model()
    hub = {k: v.clone() for k, v in model.to_hf_state_dict().items()}
    name = "model.layers.0.self_attn.o_proj.weight"
    original = hub[name].clone()
    hub[name] = original.to(torch.float8_e4m3fn)
    hub[name.replace(".weight", ".weight_scale_inv")] = torch.full((1, 1), 2.0)
    model.load_hf_state_dict(hub)
    expected = original.to(torch.float8_e4m3fn).float() * 2.0
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, expected)


def test_causal_lm_loss_matches_torch_cross_entropy_in_value_and_gradient() -> None:
    from k2.model.loss import causal_lm_loss

    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 7, 11, generator=generator, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    labels[0, 3] = labels[2, 5] = -100
    ours = causal_lm_loss(logits, labels)
    (grad,) = torch.autograd.grad(2.0 * ours, logits)
    shifted = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    (expected,) = torch.autograd.grad(2.0 * shifted, logits)
    assert ours.item() == pytest.approx(shifted.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected)
    # The softmax buffer becomes the gradient: a second backward is refused, not wrong.
    loss = causal_lm_loss(logits, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
