"""Hub import/export: FP8 block dequantization, MTP skipping, the memory cap, transformers interop."""

from __future__ import annotations

import ctypes
import json
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from k2 import checkpoint
from k2.checkpoint.hub import dequantize_fp8_blocks
from k2.cli import main
from k2.errors import ConfigError

BLOCK = 128
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def reference_dequant(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """``w * scale_inv`` per 128x128 block, built with a Kronecker product (independent of k2)."""
    rows, cols = weight.shape
    scale = torch.kron(scale_inv.float(), torch.ones(BLOCK, BLOCK))[:rows, :cols]
    return weight.float() * scale


def fp8_weight(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, cols, generator=g) * 100).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(-(-rows // BLOCK), -(-cols // BLOCK), generator=g) * 1e-3 + 1e-4
    return weight, scale_inv


def write_hub(directory: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int = 2) -> None:
    """A Hub-layout checkpoint: config.json, ``shards`` safetensors files and their index."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        safetensors.torch.save_file(part, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


FP8_CONFIG = {
    "model_type": "kimi_k2",
    "num_hidden_layers": 2,
    "num_nextn_predict_layers": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}


def test_block_dequantization_matches_the_reference_on_ragged_edges() -> None:
    weight, scale = fp8_weight(200, 300, 0)  # neither dimension a multiple of 128
    out = dequantize_fp8_blocks(weight, scale, torch.float32)
    torch.testing.assert_close(out, reference_dequant(weight, scale), rtol=0, atol=0)


def test_fp8_checkpoint_imports_to_the_dequantized_weights(tmp_path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(64, 32)}
    expected: dict[str, torch.Tensor] = {"model.embed_tokens.weight": tensors["model.embed_tokens.weight"].bfloat16()}
    for layer in range(3):  # layer 2 is the multi-token-prediction layer
        name = f"model.layers.{layer}.self_attn.kv_b_proj.weight"
        weight, scale = fp8_weight(200 + layer, 300, layer)
        tensors[name], tensors[name + "_scale_inv"] = weight, scale
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(32, dtype=torch.bfloat16)
        if layer < 2:
            expected[name] = reference_dequant(weight, scale).bfloat16()
            expected[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(32, dtype=torch.bfloat16)
    write_hub(tmp_path / "hub", tensors, FP8_CONFIG)

    with pytest.warns(UserWarning, match=r"multi-token-prediction layer\(s\) \[2\]"):
        checkpoint.import_hf(tmp_path / "hub", tmp_path / "k2", log=lambda _: None)
    reader = checkpoint.CheckpointReader(tmp_path / "k2")
    reader.verify()
    assert sorted(reader.names("model")) == sorted(expected)
    for name, want in expected.items():
        got = reader.tensor(name)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), name
    config = reader.read_json("config.json")
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 0


def anon_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.slow
def test_fp8_import_stays_under_its_memory_cap(tmp_path: Path) -> None:
    # 16 FP8 weights of 1024x2048: 32 MiB on disk, 64 MiB of bf16 to write.
    tensors = {}
    for i in range(16):
        name = f"model.layers.{i % 2}.mlp.experts.{i}.up_proj.weight"
        tensors[name], tensors[name + "_scale_inv"] = fp8_weight(1024, 2048, i)
    write_hub(tmp_path / "hub", tensors, FP8_CONFIG)
    del tensors
    # Fix glibc's mmap threshold, as it is for the hundreds-of-MiB tensors of a real import:
    # otherwise freed 4 MiB buffers stay in the heap and anonymous memory measures glibc's
    # retention policy instead of the conversion's buffers.
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 << 10)
    cap = 24 << 20
    lines: list[str] = []
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon_rss_bytes())
            time.sleep(0.0005)

    baseline = anon_rss_bytes()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        plan = checkpoint.import_hf(tmp_path / "hub", tmp_path / "k2", memory_cap_bytes=cap, log=lines.append)
    finally:
        done.set()
        sampler.join()
    assert plan.peak_bytes <= cap and len(plan.shards) >= 4
    assert "needs" in lines[0] and "disk" in lines[0]  # the needs are announced first
    grown = peak[0] - baseline
    assert grown < cap + (2 << 20), f"anonymous memory grew by {grown / 2**20:.1f} MiB (cap 24 MiB)"
    assert grown < 64 << 20  # less than the output alone: it really streamed


def test_a_memory_cap_below_one_tensor_is_refused(tmp_path: Path) -> None:
    weight, scale = fp8_weight(1024, 1024, 0)
    write_hub(tmp_path / "hub", {"w.weight": weight, "w.weight_scale_inv": scale}, FP8_CONFIG, shards=1)
    with pytest.raises(ConfigError, match="'w.weight'"):
        checkpoint.import_hf(tmp_path / "hub", tmp_path / "k2", memory_cap_bytes=1 << 20, log=lambda _: None)
    assert not (tmp_path / "k2").exists()


def test_an_unknown_model_type_is_refused(tmp_path: Path) -> None:
    write_hub(tmp_path / "hub", {"w": torch.zeros(2)}, {"model_type": "llama", "num_hidden_layers": 1}, shards=1)
    assert main(["ckpt", "import-hf", str(tmp_path / "hub"), str(tmp_path / "k2")]) == 1


def tiny_deepseek_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
        n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8,
        qk_nope_head_dim=8, first_k_dense_replace=1, n_group=1, topk_group=1, num_experts_per_tok=2,
    )


@pytest.mark.slow
def test_save_pretrained_output_imports_tensor_for_tensor(tmp_path: Path) -> None:
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(tiny_deepseek_config())
    hf.save_pretrained(tmp_path / "hf")
    assert main(["ckpt", "import-hf", str(tmp_path / "hf"), str(tmp_path / "k2"), "--dtype", "fp32"]) == 0
    reader = checkpoint.CheckpointReader(tmp_path / "k2")
    saved = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(reader.names("model")) == sorted(saved)
    for name, tensor in saved.items():
        assert torch.equal(reader.tensor(name), tensor), name
