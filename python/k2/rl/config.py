"""``k2 rl``'s settings: ``k2 train``'s (optimizer, schedule, cadence, device) with RL's defaults,
plus the task, the objective, the sampling schedule and K2's additions (docs/rl.md, "The RL
loop").

Defaults the K2 report leaves open, and what we chose:

* temperature: linear decay from ``temperature_start`` (1.0) to ``temperature_end`` (0.6) over
  ``temperature_decay_steps`` RL steps (0: the whole run), then constant;
* a truncated response (the task's token budget ran out before ``<|im_end|>``) scores its
  verifier reward minus ``truncation_penalty`` (0.5), so it may go negative;
* partial rollouts: off (``partial_rollout_steps`` 0); when on, a group of samples is carried
  over at most ``partial_max_age`` (2) steps, then decoded to the end (docs/rl.md, "Partial
  rollouts");
* PTX: off (``ptx_weight`` 0); with ``--ptx-data DIR --ptx-weight γ`` each step adds γ times
  the language-modelling loss of one ``ptx_batch_size × ptx_seq_len`` batch of DIR's token shards
  (loss mask honoured; both default to ``batch_size`` and ``seq_len``, which suit pretraining
  text: SFT conversations want their own context length, or a tool call is cut from the tools
  it must name).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from k2.errors import ConfigError
from k2.rl.critic.settings import CRITIC_HELP
from k2.rl.tasks.arithmetic import WORKINGS as TASK_WORKINGS  # task_working's values (arithmetic only)
from k2.train.config import HELP, TrainConfig

OBJECTIVES = ("k2", "grpo")
WEIGHT_TRANSPORTS = ("shm", "dist")
CUSTOM_PRESET = "custom"


@dataclass
class RLConfig(TrainConfig):
    """The settings of one ``k2 rl`` run (:data:`RL_HELP` documents each field).

    ``steps`` counts RL steps; a run takes ``warm_start_steps + steps`` optimizer steps in all
    (the warm-start SFT steps first), and ``log_every``/``eval_every``/``save_every`` count
    optimizer steps. ``preset`` is the init model's (or ``custom``); ``seq_len`` and
    ``batch_size`` shape the PTX and warm-start batches.
    """

    run_dir: str = "runs/rl"
    data_dir: str = ""
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 100
    lr: float = 1e-3
    adamw_lr: float = 5e-4
    warmup_steps: int = 0
    decay_fraction: float = 0.0
    eval_every: int = 10
    save_every: int = 50
    log_every: int = 1
    num_samples: int = 0
    init: str = ""
    task: str = "arithmetic"
    task_level: int = 0
    task_working: str = "none"
    task_digits: int = 0
    task_data: str = ""
    agent_constraints: bool = True
    token_budget: int = 0
    objective: str = "k2"
    tau: float = 1.0
    grpo_epsilon: float = 0.2
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    temperature_start: float = 1.0
    temperature_end: float = 0.6
    temperature_decay_steps: int = 0
    top_p: float = 1.0
    truncation_penalty: float = 0.5
    ptx_data: str = ""
    ptx_weight: float = 0.0
    ptx_seq_len: int = 0
    ptx_batch_size: int = 0
    warm_start_steps: int = 0
    warm_start_examples: int = 512
    eval_prompts: int = 64
    rollout_batch: int = 64
    rollout_workers: int = 0
    weight_transport: str = "shm"
    rollout_remote_workers: int = 0
    rollout_store: str = ""
    partial_rollout_steps: int = 0
    partial_max_age: int = 2
    # The self-critique rubric reward (k2.rl.critic, docs/critic.md); critic_share 0 turns it off.
    critic_share: float = 0.0
    critic_prompts: str = "bait"
    critic_source: str = "copy"
    critic_init: str = ""
    critic_rubrics: str = ""
    critic_aggregation: str = "win_rate"
    critic_pairs: str = "all"
    critic_cap: float = 0.0
    critic_update_every: int = 1
    critic_update_steps: int = 1
    critic_batch: int = 8
    critic_lr: float = 1e-4
    critic_buffer: int = 256
    critic_pairs_per_prompt: int = 4
    critic_eval_prompts: int = 8
    critic_eval_every: int = 1
    critic_max_reply_tokens: int = 0
    critic_bootstrap_steps: int = 0
    critic_bootstrap_pairs: int = 256

    def validate(self) -> None:
        base = dataclasses.replace(self, preset="tiny") if self.preset == CUSTOM_PRESET else self
        if self.steps == 0 and self.warm_start_steps > 0:
            # A warm-start-only run: supervised steps on the task's gold answers (the
            # continued-SFT baseline RL is compared with), no RL step.
            base = dataclasses.replace(base, steps=self.warm_start_steps)
        TrainConfig.validate(base)
        if self.grad_accum != 1:
            raise ConfigError(f"grad_accum must be 1 in k2 rl (a step is one batch of P x K "
                              f"samples; raise prompts_per_step instead), got {self.grad_accum}")
        if self.ep != 1:
            raise ConfigError(f"ep must be 1 in k2 rl (expert parallelism is built for k2 train "
                              f"only), got {self.ep}")
        if not self.init:
            raise ConfigError("init is missing: give --init RUN_DIR or --init CHECKPOINT_DIR (the "
                              "policy to start from)")
        if self.task_working not in TASK_WORKINGS:
            raise ConfigError(f"unknown task_working {self.task_working!r}; choose one of {', '.join(TASK_WORKINGS)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if not self.tau > 0:
            raise ConfigError(f"tau must be > 0, got {self.tau}")
        if not 0 <= self.grpo_epsilon < 1:
            raise ConfigError(f"grpo_epsilon must lie in [0, 1), got {self.grpo_epsilon}")
        for name in ("prompts_per_step", "eval_prompts", "rollout_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt must be at least 2 (the group mean is the "
                              f"baseline), got {self.samples_per_prompt}")
        for name in ("temperature_start", "temperature_end"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 (RL samples; evaluation is greedy), got "
                                  f"{getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p}")
        for name in ("task_level", "task_digits", "token_budget", "temperature_decay_steps", "truncation_penalty",
                     "ptx_weight", "ptx_seq_len", "ptx_batch_size", "warm_start_steps", "rollout_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.weight_transport not in WEIGHT_TRANSPORTS:
            raise ConfigError(f"unknown weight_transport {self.weight_transport!r}; choose one of "
                              f"{', '.join(WEIGHT_TRANSPORTS)}")
        if self.rollout_remote_workers < 0:
            raise ConfigError(f"rollout_remote_workers must be >= 0, got {self.rollout_remote_workers}")
        if self.rollout_remote_workers > 0:
            if self.weight_transport != "dist":
                raise ConfigError("rollout_remote_workers needs weight_transport dist (workers on other "
                                  "hosts are torch.distributed ranks)")
            if not self.rollout_store:
                raise ConfigError("rollout_remote_workers needs rollout_store HOST:PORT (an address the "
                                  "other hosts reach)")
        if self.rollout_store:
            host, _, port = self.rollout_store.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"rollout_store {self.rollout_store!r} is not HOST:PORT")
        if self.partial_rollout_steps < 0:
            raise ConfigError(f"partial_rollout_steps must be >= 0 (0: off), got {self.partial_rollout_steps}")
        if self.partial_rollout_steps > 0:
            if self.partial_max_age < 1:
                raise ConfigError(f"partial_max_age must be at least 1 with partial rollouts, got "
                                  f"{self.partial_max_age}")
            if self.critic_share > 0:
                raise ConfigError("partial rollouts (partial_rollout_steps > 0) cannot be combined with "
                                  "critic_share > 0: critic-rewarded prompts sample to completion")
        if self.warm_start_steps > 0 and self.warm_start_examples < 1:
            raise ConfigError("warm_start_examples must be at least 1 when warm_start_steps > 0")
        if self.ptx_weight > 0:
            if not self.ptx_data:
                raise ConfigError("ptx_weight > 0 needs --ptx-data DIR (prepared token shards)")
            if not (Path(self.ptx_data) / "manifest.json").is_file():
                raise ConfigError(f"ptx_data {self.ptx_data}: no manifest.json there (prepare it "
                                  "with k2 data prepare or k2 sft)")
        from k2.rl.critic.settings import validate_critic

        validate_critic(self)

    def temperature(self, rl_step: int) -> float:
        """The sampling temperature of RL step ``rl_step`` (0-based): linear from
        ``temperature_start`` to ``temperature_end`` over ``temperature_decay_steps`` steps
        (0: over all ``steps``), constant after."""
        span = self.temperature_decay_steps or self.steps
        done = min(max(rl_step, 0) / max(span - 1, 1), 1.0) if span > 1 else 1.0
        return self.temperature_start + (self.temperature_end - self.temperature_start) * done


RL_HELP: dict[str, str] = {
    **HELP,
    "run_dir": "where checkpoints, metrics and plots go",
    "seq_len": "tokens per PTX / warm-start sequence",
    "batch_size": "sequences per PTX / warm-start batch",
    "steps": "RL steps (after the warm-start steps; 0 with --warm-start-steps: supervised steps only)",
    "init": "the policy to start from: a k2 run directory (its newest checkpoint) or a "
            "checkpoint directory (k2 or Hub layout, with tokenizer files)",
    "task": "arithmetic | countdown | rg:NAME | code:humaneval | agentic:DOMAIN (multi-turn episodes)",
    "task_level": "the task's difficulty level (0: the task's default)",
    "task_working": "none | steps: what the gold replies show before the answer line: nothing, or "
                    "worked column-by-column steps (arithmetic levels 1-4; docs/rl-tasks.md)",
    "task_digits": "digits of each arithmetic operand, overriding the level's (0: the level's); e.g. "
                   "3 with level 2 asks three-digit sums a level-2 warm start never saw",
    "task_data": "with --task agentic:DOMAIN: a k2 synth output directory whose tasks of DOMAIN to play "
                 "(train split for RL, validation split held out), each in its own tool variants "
                 "(default: the domain's shipped example tasks)",
    "agent_constraints": "schema-constrained tool calls in agentic episodes, rollouts and evaluation alike "
                         "(docs/rl.md, \"Multi-turn tasks\")",
    "token_budget": "most response tokens (0: the task's budget)",
    "objective": "k2 (the K1.5/K2 loss) | grpo (TRL's clipped token-level loss)",
    "tau": "the K2 loss's tau (weight of the log-ratio term)",
    "grpo_epsilon": "GRPO's clip range epsilon",
    "prompts_per_step": "prompts drawn per RL step (P)",
    "samples_per_prompt": "responses sampled per prompt (K, at least 2)",
    "temperature_start": "sampling temperature at the first RL step",
    "temperature_end": "sampling temperature after the decay",
    "temperature_decay_steps": "RL steps of the linear temperature decay (0: all of them)",
    "top_p": "nucleus sampling mass (log-probabilities ignore it)",
    "truncation_penalty": "subtracted from the reward of a response cut at the token budget",
    "ptx_data": "prepared token shards for the PTX loss",
    "ptx_weight": "weight gamma of the PTX loss (0: off)",
    "ptx_seq_len": "tokens per PTX sequence (0: seq_len)",
    "ptx_batch_size": "sequences per PTX batch (0: batch_size)",
    "warm_start_steps": "SFT steps on the task's gold examples before RL (0: none)",
    "warm_start_examples": "how many gold examples the warm start cycles through",
    "eval_prompts": "held-out test prompts per evaluation (greedy)",
    "rollout_batch": "sequences the rollout engine decodes together",
    "rollout_workers": "rollout processes (0: sample in the trainer's process)",
    "weight_transport": "how rollout workers get weights and requests: shm (shared memory, this host) | "
                        "dist (torch.distributed gloo ranks and a TCP store)",
    "rollout_remote_workers": "rollout workers started on other hosts (dist transport): each runs "
                              "`python -m k2.rl.dist_workers HOST:PORT` with the rollout_store address",
    "rollout_store": "dist transport: HOST:PORT where the trainer hosts the workers' TCP store "
                     "(default: a free port on 127.0.0.1)",
    "partial_rollout_steps": "partial rollouts: cap each step's sampling at this many decode steps, carrying "
                             "unfinished groups to the next step (0: off, sample every step to completion)",
    "partial_max_age": "partial rollouts: a group drawn at RL step s is finished at step s + this at the latest",
    **CRITIC_HELP,
}
RL_FLAGS = [name for name in RLConfig.fields()
            if name not in ("corpus", "vocab_size", "preset", "sample_prompt", "sample_tokens",
                            "num_samples", "data_dir", "eval_batches", "grad_accum", "ep")]
"""The settings ``k2 rl`` takes as flags."""
