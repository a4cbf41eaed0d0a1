"""Fixtures for the k2.rl tests: a small random float32 policy built from the tiny preset."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from k2.model import K2Config, K2ForCausalLM

from model_helpers import randomize


# Overrides of the tiny preset that keep every part (q LoRA, MLA, a dense layer, routed and shared
# experts) but make a forward cheap.
SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    n_routed_experts=8,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    max_position_embeddings=128,
)


def tiny_policy(seed: int = 0) -> K2ForCausalLM:
    """The tiny preset cut down for speed (``SMALL``), with random
    weights large enough that its next-token distributions are far from uniform."""
    config = dataclasses.replace(K2Config.from_preset("tiny"), **SMALL)
    torch.manual_seed(seed)
    return randomize(K2ForCausalLM(config), seed, scale=0.15).eval()


@pytest.fixture(scope="module")
def policy() -> K2ForCausalLM:
    return tiny_policy()


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one torch thread: the models are too small to gain from more, and on a
    busy machine a second thread waiting at every small op makes them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
