"""k2 checkpoints of the K2 model against transformers' DeepseekV3ForCausalLM.

- a k2 checkpoint exported with ``k2 ckpt export-hf`` loads with ``AutoModelForCausalLM`` and
  gives k2's logits; the tokenizer files travel with it;
- ``save_pretrained`` output imported with ``k2 ckpt import-hf`` loads into k2 with the same
  logits;
- a training checkpoint of the K2 model (MoE experts under Hub names) with its AdamW or MuonClip
  state round-trips bit-identically, and training resumes exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from k2 import checkpoint
from k2.cli import main
from k2.model import K2Config, K2ForCausalLM

TOLERANCE = 1e-4

SMALL = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=2, num_attention_heads=2, n_shared_experts=1, n_routed_experts=4,
    num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=24,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
    max_position_embeddings=64, rope_scaling=None, bos_token_id=None, eos_token_id=None,
)  # fmt: skip


def small_model(seed: int) -> K2ForCausalLM:
    """A small K2 with every weight and router bias random (so no term is trivially zero)."""
    torch.manual_seed(seed)
    model = K2ForCausalLM(K2Config(**SMALL))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_exported_checkpoint_loads_in_transformers_with_k2_logits(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = small_model(0)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    checkpoint.save(tmp_path / "run", model, step=7, tokenizer_dir=tokenizer)

    assert main(["ckpt", "export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert (out / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tokenizer / name).read_bytes()
    reference, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = ids(model.config.vocab_size)
    with torch.no_grad():
        assert (model(x).logits - reference.eval()(x).logits).abs().max().item() <= TOLERANCE


@pytest.mark.slow
def test_save_pretrained_output_imports_into_k2_with_the_same_logits(tmp_path: Path) -> None:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hub_dict = K2Config(**SMALL).to_hf_dict()
    reference = DeepseekV3ForCausalLM(DeepseekV3Config(**hub_dict))
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.1)
    reference.eval().save_pretrained(tmp_path / "hf")

    assert main(["ckpt", "import-hf", str(tmp_path / "hf"), str(tmp_path / "k2"), "--dtype", "fp32"]) == 0
    config = K2Config.from_hf_dict(json.loads((tmp_path / "k2" / "config.json").read_text()))
    model = K2ForCausalLM(config)
    checkpoint.load(tmp_path / "k2", model)
    x = ids(config.vocab_size)
    with torch.no_grad():
        assert (model.eval()(x).logits - reference(x).logits).abs().max().item() <= TOLERANCE


def test_a_k2_model_and_its_optimizer_round_trip_bit_identically(tmp_path: Path) -> None:
    model = small_model(2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = ids(model.config.vocab_size)
    model(x, labels=x).loss.backward()
    optimizer.step()
    checkpoint.save(tmp_path, model, optimizer, {"step": 1})
    index = json.loads((tmp_path / "step-00000001" / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in index["weight_map"]  # Hub names

    fresh = small_model(3)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    checkpoint.load(tmp_path, fresh, fresh_optimizer)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    for index in saved:
        for key in saved[index]:
            assert torch.equal(saved[index][key], loaded[index][key]), (index, key)


def test_a_k2_model_trained_with_muonclip_resumes_bit_identically(tmp_path: Path) -> None:
    from k2.optim import MuonClip

    def step(model: K2ForCausalLM, optimizer: MuonClip) -> None:
        optimizer.zero_grad()
        x = ids(model.config.vocab_size)
        model(x, labels=x).loss.backward()
        optimizer.step()

    model = small_model(4).train()
    optimizer = MuonClip(model, lr=1e-2)
    for _ in range(2):
        step(model, optimizer)
    checkpoint.save(tmp_path, model, optimizer, {"step": 2})

    fresh = small_model(5).train()
    fresh_optimizer = MuonClip(fresh, lr=1e-2)
    checkpoint.load(tmp_path, fresh, fresh_optimizer)
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["muonclip"] == loaded["muonclip"] and saved["param_groups"] == loaded["param_groups"]
    for index in saved["state"]:
        for key, value in saved["state"][index].items():
            other = loaded["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, key)
    # Training continues exactly as it would have without the interruption.
    step(model, optimizer)
    step(fresh, fresh_optimizer)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
