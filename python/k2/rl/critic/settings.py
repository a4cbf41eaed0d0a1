"""``k2 rl``'s critic settings: their help and their checks (docs/critic.md, "In `k2 rl`").

The fields themselves live on :class:`k2.rl.config.RLConfig` (so ``--config`` files, flags and
resume treat them like every other setting); this module documents and validates them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from k2.errors import ConfigError
from k2.rl.critic.aggregate import AGGREGATIONS, PAIR_SCHEDULES

CRITIC_SOURCES = ("copy", "policy", "checkpoint")
CRITIC_PROMPTS = ("bait", "task")

CRITIC_HELP: dict[str, str] = {
    "critic_share": "share of each step's prompts rewarded by the critic instead of the verifier "
                    "(0: no critic)",
    "critic_prompts": "the critic-rewarded prompts: bait (the opening-praise bait set) | task (the "
                      "--task's own train prompts, verifier hidden)",
    "critic_source": "the critic model: copy (a copy of the init policy, trained on its own) | "
                     "policy (the live policy itself; critic updates change it) | checkpoint "
                     "(--critic-init)",
    "critic_init": "with --critic-source checkpoint: a k2 run directory or checkpoint directory "
                   "with the policy's tokenizer",
    "critic_rubrics": "a JSON file of extra rubrics (list of {id, text, mandatory, weight, check})",
    "critic_aggregation": "pairwise judgements to per-sample rewards: win_rate | bradley_terry",
    "critic_pairs": "which of a prompt's K samples are compared: all (K(K-1)/2 pairs) | ring (K pairs)",
    "critic_cap": "the most reward a reply breaking a mandatory rubric's check may get",
    "critic_update_every": "update the critic every N RL steps on the closed-loop pairs (0: never)",
    "critic_update_steps": "critic optimizer steps per update",
    "critic_batch": "preference pairs per critic optimizer step, and sequences per critic forward",
    "critic_lr": "the critic's AdamW learning rate",
    "critic_buffer": "the newest closed-loop preference pairs kept for critic updates",
    "critic_pairs_per_prompt": "most closed-loop pairs taken from one verifiable prompt per step (0: all)",
    "critic_eval_prompts": "held-out verifiable prompts whose on-policy pairs measure critic-verifier "
                           "agreement",
    "critic_eval_every": "measure agreement every N RL steps (0: only at evaluations)",
    "critic_max_reply_tokens": "each reply is cut to this many tokens before the critic sees it "
                               "(0: the token budget)",
    "critic_bootstrap_steps": "critic optimizer steps on synthesized preference pairs before RL (0: none)",
    "critic_bootstrap_pairs": "how many synthesized pairs the bootstrap draws from",
}


def validate_critic(cfg: Any) -> None:
    """Check the critic settings of an :class:`~k2.rl.config.RLConfig`."""
    if not 0.0 <= cfg.critic_share <= 1.0:
        raise ConfigError(f"critic_share must lie in [0, 1], got {cfg.critic_share}")
    if cfg.critic_prompts not in CRITIC_PROMPTS:
        raise ConfigError(f"unknown critic_prompts {cfg.critic_prompts!r}; choose one of {', '.join(CRITIC_PROMPTS)}")
    if cfg.critic_source not in CRITIC_SOURCES:
        raise ConfigError(f"unknown critic_source {cfg.critic_source!r}; choose one of {', '.join(CRITIC_SOURCES)}")
    if cfg.critic_source == "checkpoint" and not cfg.critic_init:
        raise ConfigError("critic_source checkpoint needs --critic-init RUN_OR_CHECKPOINT")
    if cfg.critic_aggregation not in AGGREGATIONS:
        raise ConfigError(f"unknown critic_aggregation {cfg.critic_aggregation!r}; choose one of "
                          f"{', '.join(AGGREGATIONS)}")
    if cfg.critic_pairs not in PAIR_SCHEDULES:
        raise ConfigError(f"unknown critic_pairs {cfg.critic_pairs!r}; choose one of {', '.join(PAIR_SCHEDULES)}")
    if cfg.critic_rubrics and not Path(cfg.critic_rubrics).is_file():
        raise ConfigError(f"critic_rubrics {cfg.critic_rubrics}: no such file")
    for name in ("critic_update_every", "critic_update_steps", "critic_pairs_per_prompt", "critic_eval_every",
                 "critic_max_reply_tokens", "critic_bootstrap_steps", "critic_eval_prompts"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("critic_batch", "critic_buffer", "critic_bootstrap_pairs"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.critic_lr > 0:
        raise ConfigError(f"critic_lr must be > 0, got {cfg.critic_lr}")
    if cfg.critic_share > 0 and round(cfg.critic_share * cfg.prompts_per_step) < 1:
        raise ConfigError(f"critic_share {cfg.critic_share} of {cfg.prompts_per_step} prompts per step "
                          "rounds to no critic-rewarded prompt; raise one of them")
