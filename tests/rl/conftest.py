"""Fixtures for the k2.rl tests: a small random float32 policy built from the tiny preset."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from k2.model import K2Config, K2ForCausalLM

from model_helpers import randomize


def tiny_policy(seed: int = 0) -> K2ForCausalLM:
    """The tiny preset cut down for speed (2 layers, vocabulary 256, 128 positions), with random
    weights large enough that its next-token distributions are far from uniform."""
    config = dataclasses.replace(
        K2Config.from_preset("tiny"), vocab_size=256, num_hidden_layers=2, max_position_embeddings=128
    )
    torch.manual_seed(seed)
    return randomize(K2ForCausalLM(config), seed, scale=0.1).eval()


@pytest.fixture(scope="module")
def policy() -> K2ForCausalLM:
    return tiny_policy()
