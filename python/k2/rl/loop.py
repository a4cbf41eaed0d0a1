"""One ``k2 rl`` run: the init policy, the task, the :class:`k2.rl.job.RLJob` on the shared
:class:`k2.train.harness.Harness` (docs/rl.md, "The RL loop").

1. check the settings and resolve the run directory;
2. find the policy to start from (:func:`k2.train.sft.resolve_init`: a k2 run directory or a
   checkpoint directory, with its tokenizer) and build the task (``--task``, ``--task-level``,
   ``--task-working``);
3. evaluate the initial policy on the held-out prompts (an ``eval`` record at step 0);
4. run ``warm_start_steps + steps`` optimizer steps with the harness's cadence, checkpoints
   (with the tokenizer), exact resume and Ctrl-C; draw the plots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from k2.errors import ConfigError
from k2.parallel import init_distributed
from k2.rl.config import RLConfig
from k2.train.harness import Cadence, Harness
from k2.train.resume import ResumePoint, check_settings


@dataclass
class RLResult:
    """What a finished (or interrupted) RL run reached."""

    run_dir: Path
    step: int
    first_eval: dict[str, float] | None
    last_eval: dict[str, float] | None
    interrupted: bool


def build_task(config: RLConfig):  # noqa: ANN201
    """The task ``config.task`` names, at ``task_level`` when set, with ``task_working`` when not
    ``none`` and ``task_digits`` when set (only arithmetic takes those two), on ``task_data``'s
    synthesized tasks when set (agentic tasks only)."""
    from k2.rl.tasks import get_task

    options: dict[str, Any] = {}
    if config.task_level:
        options["level"] = config.task_level
    if config.task_working != "none":
        if config.task != "arithmetic":
            raise ConfigError(f"task_working {config.task_working!r}: task {config.task!r} does not take it "
                              "(only arithmetic shows worked steps)")
        options["working"] = config.task_working
    if config.task_digits:
        if config.task != "arithmetic":
            raise ConfigError(f"task_digits {config.task_digits}: task {config.task!r} does not take it "
                              "(only arithmetic has operand digits)")
        options["digits"] = config.task_digits
    if config.task_data:
        if not config.task.startswith("agentic:"):
            raise ConfigError(f"task_data {config.task_data!r}: task {config.task!r} does not take it "
                              "(only agentic:DOMAIN plays k2 synth tasks)")
        options["synth"] = config.task_data
    return get_task(config.task, **options)


class RLTrainer:
    """One RL run. Build it, then call :meth:`run`.

    Args:
        config: the resolved settings (``preset`` becomes the init model's).
        resume: continue the run in ``config.run_dir`` from its newest verified checkpoint.
        log: progress lines.
        progress: draw a progress bar.
        resume_point: the checkpoint to resume from, when already chosen.
        allow_changes: let a resume continue with changed settings.
    """

    def __init__(self, config: RLConfig, resume: bool = False, log: Callable[[str], None] = print,
                 progress: bool = True, *, resume_point: ResumePoint | None = None,
                 allow_changes: bool = False) -> None:
        from k2.model import K2Config
        from k2.train.sft import resolve_init

        self.d = init_distributed(config.device)
        if self.d.world > 1:
            raise ConfigError("k2 rl runs in one process (rollouts are colocated); do not start it "
                              "under torchrun")
        self.harness = Harness(Path(config.run_dir), self.d, resume=resume,
                               resume_point=resume_point, log=log, progress=progress)
        self.run_dir = self.harness.run_dir
        self.log = self.harness.log
        point = self.harness.resume_point
        init = resolve_init(point.path if resume and point is not None else config.init)
        config = dataclasses.replace(config, preset=init.preset)
        config.validate()
        self.config, self.init = config, init
        self.task = build_task(config)
        self.model_config = K2Config.from_hf_dict(init.hf_config)
        if resume:
            assert point is not None
            check_settings(config, point, allow_changes, self.log)

    @property
    def interrupted(self) -> bool:
        return self.harness.interrupted

    def run(self) -> RLResult:
        from k2 import checkpoint
        from k2.data import load_tokenizer
        from k2.model import K2ForCausalLM

        cfg, d, harness = self.config, self.d, self.harness
        harness.write_records(cfg.to_dict())
        tokenizer = load_tokenizer(self.init.tokenizer_dir)
        if tokenizer.get_vocab_size() > self.model_config.vocab_size:
            raise ConfigError(f"the tokenizer's vocabulary ({tokenizer.get_vocab_size()}) is larger "
                              f"than the model's ({self.model_config.vocab_size})")
        torch.manual_seed(cfg.seed)
        model = K2ForCausalLM(self.model_config).to(d.device)
        if not harness.resume:
            checkpoint.load(self.init.checkpoint, model, restore_rng=False)
            self.log(f"init: {self.init.checkpoint} ({cfg.preset}); task {self.task!r}")
        workers = None
        if cfg.rollout_workers > 0 or cfg.rollout_remote_workers > 0:
            from k2.rl.workers import RolloutWorkers

            pad = tokenizer.token_to_id("<|pad|>") or 0
            workers = RolloutWorkers(model, self.init.hf_config, cfg.rollout_workers,
                                     max_batch=cfg.rollout_batch, pad_token_id=pad, log=self.log,
                                     transport=cfg.weight_transport, remote=cfg.rollout_remote_workers,
                                     address=cfg.rollout_store)
            self.log(f"rollout workers: {', '.join(workers.alive)} (weights by "
                     f"{workers.transport.describe()})")
        try:
            return self._run(model, tokenizer, workers)
        finally:
            if workers is not None:
                workers.close()

    def _run(self, model, tokenizer, workers) -> RLResult:  # noqa: ANN001
        from k2.rl.job import RLJob

        cfg, d, harness = self.config, self.d, self.harness
        job_class = RLJob
        if cfg.critic_share > 0:  # a share of critic-rewarded prompts (docs/critic.md)
            from k2.rl.critic.job import CriticRLJob

            job_class = CriticRLJob
        job = job_class(cfg, d, model, tokenizer, self.task, self.log, rollout=workers)
        start = harness.restore(job)
        first_eval = None
        if start == 0:
            first_eval = job.evaluate(0, final=False)
            metrics = harness.open_metrics()
            if metrics is not None:
                metrics.write(0, "eval", **first_eval)
        total = cfg.warm_start_steps + cfg.steps
        cadence = Cadence(total, cfg.log_every, cfg.eval_every, cfg.save_every, cfg.keep_last)
        result = harness.loop(job, cadence, start, save=lambda step: harness.save(
            job, step, keep_last=cfg.keep_last, config=cfg.to_dict(),
            tokenizer_dir=self.init.tokenizer_dir))
        harness.finish()
        if d.main:
            from k2.rl.plots import plot_rl

            plot_rl(self.run_dir)
        return RLResult(self.run_dir, result.step, first_eval, result.last_eval, result.interrupted)
