"""Reinforcement learning with verifiable rewards (docs/rl.md)."""
