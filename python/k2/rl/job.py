"""The RL step (``k2 rl``) on the shared run harness (docs/rl.md, "The RL loop").

:class:`RLJob` is a :class:`k2.train.harness.Job`: the harness owns the run directory, metrics,
plots, checkpoints, exact resume and Ctrl-C; the job owns one optimizer step:

1. (steps ``< warm_start_steps``) a warm-start SFT step on the task's gold examples, with the
   SFT loss (mean cross-entropy over assistant tokens, :func:`k2.train.sft.masked_targets`);
2. otherwise an RL step: draw ``P`` train prompts, render each with the chat template and an
   open assistant turn, sample ``K`` responses per prompt with the :class:`RolloutEngine` at the
   step's temperature and the task's token budget (stop at ``<|im_end|>``), score them with
   ``task.verify_many`` (a response cut by the budget loses ``truncation_penalty``), take the
   sequence log-probabilities under π_θ with :func:`k2.rl.logprobs.batch_logprobs`, and step
   MuonClip on the K2 loss (or GRPO), plus γ × the PTX loss when asked.

Everything random in a step derives from ``(seed, step)`` — the prompts drawn, every response's
sampling stream, the warm-start batch — so a run resumed from a checkpoint repeats the
uninterrupted run exactly. The weight version of step ``s``'s samples is ``s`` (the number of
optimizer steps taken before it); every sampled token is checked to carry it. With partial
rollouts (``partial_rollout_steps > 0``, :mod:`k2.rl.partial`) a step samples for a capped number
of decode steps, trains on the groups that finished and carries the rest to the next step, whose
tokens then carry the next version.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from k2.errors import RLError
from k2.parallel.setup import Dist
from k2.rl.config import RLConfig
from k2.rl.logprobs import batch_logprobs, episode_rows, pad_logprobs
from k2.rl.objective import group_advantages, grpo_loss, k2_loss
from k2.rl.rollout import Completion, Request, RolloutEngine
from k2.rl.tasks.base import Prompt, Reward, Task
from k2.train.pretrain import _balance, sample_positions
from k2.train.schedule import WSDSchedule
from k2.train.sft import masked_targets

if TYPE_CHECKING:
    from k2.model.model import K2ForCausalLM

IM_END = "<|im_end|>"


def step_seed(seed: int, step: int, purpose: str) -> int:
    """A 63-bit seed for ``purpose`` (``"prompts"``, ``"rollout"``, ...) at ``step`` of a run
    seeded with ``seed``: a hash, so neighbouring steps and purposes are unrelated."""
    digest = hashlib.blake2b(f"k2.rl.loop:{purpose}:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def render_prompt(tokenizer, prompt: Prompt) -> list[int]:  # noqa: ANN001
    """The prompt's token ids: its messages in the chat template, assistant turn open."""
    from k2.data.chat import render_chat

    text = render_chat(prompt.messages, prompt.tools, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


@dataclass
class Rollouts:
    """One RL step's samples, prompt-major (each of the ``P`` prompts ``K`` times): per sample
    its prompt, its *segments* — ``(context ids, completion)``, one per assistant turn (a
    single-turn task has one: the rendered prompt and the response) —, its text, the verifier's
    verdict and the shaped reward the loss uses (truncation penalty applied)."""

    prompts: list[Prompt]
    segments: list[list[tuple[list[int], Completion]]]
    texts: list[str]
    verdicts: list[Reward]
    rewards: list[float]
    temperature: float
    seconds: float
    sync_seconds: float = 0.0
    temperatures: list[float] | None = None
    """Per sample, the temperature it was sampled at when it differs between samples (partial
    rollouts: each group keeps the temperature of the step that drew it); None: ``temperature``."""

    @property
    def prompt_ids(self) -> list[list[int]]:
        """Single-turn samples: each sample's prompt ids."""
        return [segments[0][0] for segments in self._single()]

    @property
    def completions(self) -> list[Completion]:
        """Single-turn samples: each sample's completion."""
        return [segments[0][1] for segments in self._single()]

    def _single(self) -> list[list[tuple[list[int], Completion]]]:
        if any(len(s) != 1 for s in self.segments):
            raise RLError("multi-turn samples have one completion per turn: use segments")
        return self.segments

    @property
    def all_completions(self) -> list[Completion]:
        return [c for segments in self.segments for _, c in segments]

    @property
    def truncated(self) -> list[bool]:
        """Whether any turn of each sample ran out of its token budget."""
        return [any(c.finish_reason == "length" for _, c in s) for s in self.segments]

    def lengths(self) -> list[int]:
        """Sampled tokens per sample (all turns)."""
        return [sum(len(c.token_ids) for _, c in s) for s in self.segments]


class RLJob:
    """The RL step for :class:`k2.train.harness.Harness`.

    Args:
        config: the run's settings.
        d: rank, world size and device (one process: ``k2 rl`` does not run under torchrun).
        model: the policy on ``d.device``.
        tokenizer: the policy's tokenizer (``tokenizers.Tokenizer``).
        task: the verifiable-reward task.
        log: progress lines.
        rollout: who samples (default: a colocated :class:`RolloutEngine` on ``model``); any
            object with ``generate(requests, seed=...) -> list[Completion]`` and a
            ``weight_version`` attribute.
    """

    def __init__(self, config: RLConfig, d: Dist, model: K2ForCausalLM, tokenizer, task: Task,  # noqa: ANN001
                 log: Callable[[str], None], rollout: Any = None) -> None:
        from k2.train.optimizers import build_optimizer, logit_watch

        self.config, self.d, self.tokenizer, self.task, self.log = config, d, tokenizer, task, log
        self.model: torch.nn.Module = model  # the harness's view (checkpoints)
        self.policy = model
        self.optimizer = build_optimizer(config, model)
        self.watch = logit_watch(self.optimizer, model)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.total_steps = config.warm_start_steps + config.steps
        self.schedule = WSDSchedule(peak=1.0, total_steps=self.total_steps,
                                    warmup_steps=config.warmup_steps,
                                    decay_fraction=config.decay_fraction, floor=config.min_lr_ratio)
        self.im_end = tokenizer.token_to_id(IM_END)
        if self.im_end is None:
            raise RLError(f"the tokenizer has no {IM_END} token: the policy needs K2's chat tokens")
        pad = tokenizer.token_to_id("<|pad|>")
        self.budget = config.token_budget or task.token_budget
        self.engine = rollout if rollout is not None else RolloutEngine(
            self.policy, max_batch=config.rollout_batch, pad_token_id=pad or 0)
        # Evaluation decodes greedily in this process (with workers: on their colocated fallback).
        self.evaluator = getattr(self.engine, "local", self.engine)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if d.device.type == "cuda" and config.bf16 else nullcontext())
        self.ptx = None
        if config.ptx_weight > 0:
            from k2.data import TokenLoader

            self.ptx = TokenLoader(config.ptx_data, config.ptx_seq_len or config.seq_len,
                                   config.ptx_batch_size or config.batch_size,
                                   seed=config.seed, prefetch=1, threads=1)
        self.warm: list[tuple[np.ndarray, np.ndarray]] = []
        if config.warm_start_steps > 0:
            self.warm = self._warm_examples()
        self.last: Rollouts | None = None
        self.partial = None
        if config.partial_rollout_steps > 0:  # trajectories carried across steps (docs/rl.md)
            from k2.rl.partial import PartialRollouts

            if task.multi_turn:
                raise NotImplementedError("partial rollouts of multi-turn episodes (--partial-rollout-steps "
                                          "with an agentic task): only single-turn tasks pause and resume")
            self.partial = PartialRollouts(self)
        self._partial_fields: dict[str, Any] = {}
        self.constrainer = None  # the tool-call constrainer of agentic episodes
        if task.multi_turn and config.agent_constraints:
            if config.rollout_workers or config.rollout_remote_workers:
                raise NotImplementedError("schema-constrained agentic episodes on rollout workers: the "
                                          "constraint (llguidance's matcher) cannot be sent to a worker "
                                          "process; use --rollout-workers 0, or --no-agent-constraints")
            from k2.agentic.constrain import ToolCallConstrainer

            self.constrainer = ToolCallConstrainer(tokenizer)

    # ------------------------------------------------------------------ the Job protocol
    def train_step(self, step: int, log: bool) -> dict[str, Any] | None:
        factor = self.schedule(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        if step < self.config.warm_start_steps:
            fields = self._warm_step(step)
        else:
            fields = self._rl_step(step)
        fields["lr"] = self.base_lrs[0] * factor
        return fields if log else None

    def evaluate(self, step: int, final: bool) -> dict[str, float]:
        """Held-out accuracy and mean reward on ``eval_prompts`` test prompts, greedy (the same
        prompts every time)."""
        cfg = self.config
        prompts = self.task.prompts("test", cfg.eval_prompts, seed=cfg.seed)
        self.evaluator.weight_version = step
        if self.task.multi_turn:
            episodes = self._episodes(prompts, self.evaluator, 0.0, 0)
            verdicts = [e.reward for e in episodes]
            truncated = sum(any(c.finish_reason == "length" for _, c in e.segments)
                            for e in episodes) / len(episodes)
        else:
            ids = [render_prompt(self.tokenizer, p) for p in prompts]
            requests = [Request(i, self.budget, temperature=0.0, stop_ids=[self.im_end]) for i in ids]
            completions = self.evaluator.generate(requests, seed=0)
            verdicts = self.task.verify_many(prompts, [self._decode(c) for c in completions])
            truncated = sum(c.finish_reason == "length" for c in completions) / len(completions)
        accuracy = sum(v.correct for v in verdicts) / len(verdicts)
        reward = sum(v.score for v in verdicts) / len(verdicts)
        self.log(f"step {step}: held-out accuracy {accuracy:.3f} (greedy, {len(prompts)} "
                 f"{self.task.name} test prompts), mean reward {reward:.3f}")
        return {"accuracy": accuracy, "reward": reward, "truncation_rate": truncated}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"ptx_loader": self.ptx.state_dict()} if self.ptx is not None else {}
        if self.partial is not None:
            state["partial_rollouts"] = self.partial.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = state.get("partial_rollouts", {"groups": []})
        if self.partial is not None:  # a run that had none starts with an empty buffer
            self.partial.load_state_dict(groups)
        elif groups["groups"]:
            raise RLError(f"the checkpoint holds {len(groups['groups'])} groups of partial rollouts in "
                          "flight; resume with partial_rollout_steps > 0 (they would be lost)")
        if self.ptx is not None:
            if "ptx_loader" not in state:
                raise RLError("the checkpoint has no PTX loader state (its run had no --ptx-data)")
            self.ptx.load_state_dict(state["ptx_loader"])

    def progress(self, fields: dict[str, Any]) -> dict[str, str]:
        if fields.get("phase") == "warm_start":
            return {"warm_loss": f"{fields['loss']:.3f}"}
        return {"reward": f"{fields['reward']:.3f}", "acc": f"{fields['accuracy']:.2f}",
                "trunc": f"{fields['truncation_rate']:.2f}", "T": f"{fields['temperature']:.2f}",
                "roll_tok_s": f"{fields['rollout_tokens_per_s']:,.0f}"}

    # ------------------------------------------------------------------ rollouts
    def rollouts(self, step: int) -> Rollouts:
        """Sample and score the responses (or episodes) of (optimizer) step ``step``."""
        if self.task.multi_turn:
            return self._multi_turn_rollouts(step)
        if self.partial is not None:
            rollouts, self._partial_fields = self.partial.step(step)
            return rollouts
        cfg = self.config
        rl_step = step - cfg.warm_start_steps
        temperature = cfg.temperature(rl_step)
        prompts = self.task.prompts("train", cfg.prompts_per_step, seed=step_seed(cfg.seed, rl_step, "prompts"))
        rendered = [render_prompt(self.tokenizer, p) for p in prompts]
        k = cfg.samples_per_prompt
        repeated = [p for p in prompts for _ in range(k)]
        prompt_ids = [ids for ids in rendered for _ in range(k)]
        requests = [Request(ids, self.budget, temperature=temperature, top_p=cfg.top_p,
                            stop_ids=[self.im_end]) for ids in prompt_ids]
        sync_s = self._sync(step)
        started = time.perf_counter()
        completions = self.engine.generate(requests, seed=step_seed(cfg.seed, rl_step, "rollout"))
        seconds = time.perf_counter() - started
        self._check_versions(step, completions)
        texts = [self._decode(c) for c in completions]
        verdicts = self.task.verify_many(repeated, texts)
        segments = [[(ids, c)] for ids, c in zip(prompt_ids, completions)]
        return self._shaped(repeated, segments, texts, verdicts, temperature, seconds, sync_s)

    def _shaped(self, prompts, segments, texts, verdicts, temperature, seconds, sync_s) -> Rollouts:  # noqa: ANN001
        penalty = self.config.truncation_penalty
        rollouts = Rollouts(prompts, segments, texts, verdicts, [], temperature, seconds, sync_s)
        rollouts.rewards = [v.score - (penalty if cut else 0.0)
                            for v, cut in zip(verdicts, rollouts.truncated)]
        return rollouts

    def _check_versions(self, step: int, completions: list[Completion]) -> None:
        for c in completions:  # a version published mid-step must never reach a sample
            if any(v != step for v in c.versions):
                raise RLError(f"step {step}: sample {c.index} holds tokens of weight versions "
                              f"{sorted(set(c.versions))}, not only {step}")

    def _sync(self, step: int) -> float:
        sync = getattr(self.engine, "sync", None)
        if sync is not None:  # rollout workers: publish this step's weights to them
            return sync(step)
        self.engine.weight_version = step
        return 0.0

    def _episodes(self, prompts: list[Prompt], engine: Any, temperature: float, seed: int) -> list:
        from k2.rl.episodes import play_episodes

        return play_episodes(self.task, prompts, engine, self.tokenizer, budget=self.budget,
                             temperature=temperature, top_p=self.config.top_p, stop_id=self.im_end,
                             seed=seed, max_context=self.policy.config.max_position_embeddings,
                             constrainer=self.constrainer)

    def _multi_turn_rollouts(self, step: int) -> Rollouts:
        cfg = self.config
        rl_step = step - cfg.warm_start_steps
        temperature = cfg.temperature(rl_step)
        prompts = self.task.prompts("train", cfg.prompts_per_step, seed=step_seed(cfg.seed, rl_step, "prompts"))
        repeated = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
        sync_s = self._sync(step)
        started = time.perf_counter()
        episodes = self._episodes(repeated, self.engine, temperature, step_seed(cfg.seed, rl_step, "rollout"))
        seconds = time.perf_counter() - started
        segments = [e.segments for e in episodes]
        self._check_versions(step, [c for s in segments for _, c in s])
        return self._shaped(repeated, segments, [e.transcript for e in episodes],
                            [e.reward for e in episodes], temperature, seconds, sync_s)

    def _decode(self, completion: Completion) -> str:
        return self.tokenizer.decode(completion.token_ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ the RL step
    def rl_loss(self, rollouts: Rollouts, version: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The step's RL loss from π_θ's log-probabilities of the samples (with gradients): a
        sample's log π is the sum over its segments (turns) of their tokens' log-probabilities.

        ``version``: the weight version π_θ holds. A group whose K rewards are all equal and whose
        every token that version sampled has advantage 0, so its gradient is zero (GRPO: exactly;
        the K2 loss: 2τ²·(log π_θ − log π_old)·∇log π, rounding-sized at θ = θ_old). Such groups are
        not forwarded: their samples enter the loss with π_θ's log-probabilities set to π_old's,
        which leaves the loss's value and normalization as they were (docs/rl.md, "The RL
        loop"). With ``version`` None (or tokens of older versions: partial rollouts) every group
        is forwarded."""
        cfg = self.config
        k = cfg.samples_per_prompt
        p = len(rollouts.segments) // k  # groups trained (fewer or more than P with partial rollouts)
        device = self.d.device
        skip = self._still_groups(rollouts, version)
        # A multi-turn sample is one row (its turns and the observations between them, only the
        # turns scored), not one row per turn: the prompt and earlier turns run once.
        rows = [[] if skip[i // k] else episode_rows(segments) for i, segments in enumerate(rollouts.segments)]
        flat_rows = [r for sample in rows for r in sample]
        temperatures = [rollouts.temperatures[i] if rollouts.temperatures else rollouts.temperature
                        for i, sample in enumerate(rows) for _ in sample]
        # In the model's own precision, as the sampler ran (no bf16 autocast): at θ = θ_old the
        # log-ratio must be zero up to rounding.
        with nullcontext():
            flat = batch_logprobs(self.policy, [p for p, _, _ in flat_rows], [t for _, t, _ in flat_rows],
                                  temperatures, keep=[k for _, _, k in flat_rows])
        old = [torch.tensor([lp for _, c in segments for lp in c.logprobs], dtype=torch.float32, device=device)
               for segments in rollouts.segments]
        new: list[torch.Tensor] = []  # per sample, its tokens' log-probabilities, turns joined
        at = 0
        for i, sample in enumerate(rows):
            if skip[i // k]:
                new.append(old[i])  # a constant: ratio 1, no gradient
                continue
            parts = flat[at: at + len(sample)]
            at += len(sample)
            new.append(torch.cat(parts) if parts else torch.zeros(0, device=device))
        rewards = torch.tensor(rollouts.rewards, dtype=torch.float32, device=device).view(p, k)
        new_seq = torch.stack([x.float().sum() for x in new])
        old_seq = torch.tensor([math.fsum(lp for _, c in segments for lp in c.logprobs)
                                for segments in rollouts.segments], dtype=torch.float32, device=device)
        if cfg.objective == "k2":
            loss = k2_loss(new_seq.view(p, k), old_seq.view(p, k), rewards, cfg.tau)
        else:
            new_tok, mask = pad_logprobs(new)
            old_tok, _ = pad_logprobs(old)
            advantages = group_advantages(rewards).flatten()
            loss = grpo_loss(new_tok, old_tok, advantages, mask, epsilon=cfg.grpo_epsilon)
        forwarded = [i for i in range(len(rows)) if not skip[i // k]]
        log_ratio = float((new_seq.detach()[forwarded] - old_seq[forwarded]).mean()) if forwarded else 0.0
        return loss, {"log_ratio": log_ratio, "forward_tokens": sum(len(p) + len(t) for p, t, _ in flat_rows),
                      "still_groups": sum(skip) / max(p, 1)}

    def _still_groups(self, rollouts: Rollouts, version: int | None) -> list[bool]:
        """Per group: True when its rewards are all equal and every token of its samples came
        from ``version`` (its gradient is zero); at least one group stays False, so that the
        step still has a graph to run backward through."""
        k = self.config.samples_per_prompt
        p = len(rollouts.segments) // k
        if version is None:
            return [False] * p
        out = []
        for g in range(p):
            rewards = rollouts.rewards[g * k:(g + 1) * k]
            current = all(v == version for segments in rollouts.segments[g * k:(g + 1) * k]
                          for _, c in segments for v in c.versions)
            out.append(current and max(rewards) == min(rewards))
        if out and all(out):
            out[0] = False
        return out

    def _rl_step(self, step: int) -> dict[str, Any]:
        cfg, d = self.config, self.d
        rollouts = self.rollouts(step)
        self.last = rollouts
        self.model.train()
        started = time.perf_counter()
        loss, extra = self.rl_loss(rollouts, version=step)
        total = loss
        ptx_loss = None
        if self.ptx is not None:
            ptx_loss = self._ptx_loss()
            total = loss + cfg.ptx_weight * ptx_loss
        total.backward()
        grad_norm, report, layers = self._optimizer_step()
        train_s = time.perf_counter() - started
        completions = rollouts.all_completions
        samples = len(rollouts.segments)
        tokens = sum(rollouts.lengths())
        trained = extra.pop("forward_tokens")  # what the trainer's forward ran
        logprobs = [lp for c in completions for lp in c.logprobs]
        reward = sum(rollouts.rewards) / len(rollouts.rewards)
        fields: dict[str, Any] = {
            "phase": "rl", "loss": float(loss.detach()), "grad_norm": float(grad_norm),
            "reward": reward, "reward_by_task": {self.task.name: reward},
            "score": sum(v.score for v in rollouts.verdicts) / samples,
            "accuracy": sum(v.correct for v in rollouts.verdicts) / samples,
            "truncation_rate": sum(rollouts.truncated) / samples,
            "response_len": tokens / samples, "turns": len(completions) / samples,
            "entropy": -math.fsum(logprobs) / max(len(logprobs), 1),
            "temperature": rollouts.temperature, "weight_version": step,
            "version_lag": step - min((v for c in completions for v in c.versions), default=step),
            "rollout_tokens_per_s": tokens / max(rollouts.seconds, 1e-9),
            "trainer_tokens_per_s": trained / max(train_s, 1e-9),
            "rollout_s": rollouts.seconds, "train_s": train_s,
            "weight_sync_s": rollouts.sync_seconds,
            "weight_sync_share": rollouts.sync_seconds / max(
                rollouts.sync_seconds + rollouts.seconds + train_s, 1e-9),
            "max_logit": [c.max_logit for c in layers],
            "clipped_heads": [c.clipped_heads for c in layers],
            "expert_balance": _balance(report), "skipped_steps": report.skipped_steps, **extra,
        }
        if self.partial is not None:
            fields.update(self._partial_fields)
        if ptx_loss is not None:
            fields["ptx_loss"] = float(ptx_loss.detach())
        return fields

    def _optimizer_step(self):  # noqa: ANN202
        cfg = self.config
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        report = self.optimizer.last_report
        layers = self.watch.pop() if self.watch is not None else report.layers
        return grad_norm, report, layers

    def _ptx_loss(self) -> torch.Tensor:
        assert self.ptx is not None
        batch = self.ptx.next_batch()
        device = self.d.device
        ids, targets, positions = (torch.from_numpy(a).to(device)
                                   for a in (batch.inputs, batch.targets, batch.positions))
        if batch.loss_mask is not None:
            targets = masked_targets(targets, torch.from_numpy(batch.loss_mask).to(device))
        with self.autocast:
            return self.model(input_ids=ids, position_ids=sample_positions(positions),
                              targets=targets).loss

    # ------------------------------------------------------------------ the warm start
    def _warm_examples(self) -> list[tuple[np.ndarray, np.ndarray]]:
        from k2.data.sft import encode_conversation

        cfg = self.config
        pairs = self.task.warm_start_examples(cfg.warm_start_examples, seed=cfg.seed)
        out = []
        for messages, gold in pairs:
            ids, mask = encode_conversation(self.tokenizer, [*messages, {"role": "assistant", "content": gold}])
            if len(ids) > cfg.seq_len + 1:
                raise RLError(f"warm-start example of {len(ids)} tokens exceeds seq_len + 1 = "
                              f"{cfg.seq_len + 1}; raise --seq-len")
            out.append((ids.astype(np.int64), mask))
        return out

    def warm_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs, masked targets and positions of warm-start step ``step``: examples
        ``step·B .. step·B + B − 1`` (cycling), right-padded."""
        cfg, n = self.config, len(self.warm)
        chosen = [self.warm[(step * cfg.batch_size + i) % n] for i in range(cfg.batch_size)]
        width = max(len(ids) for ids, _ in chosen) - 1
        inputs = torch.zeros(len(chosen), width, dtype=torch.long)
        targets = torch.full((len(chosen), width), -100, dtype=torch.long)
        for row, (ids, mask) in enumerate(chosen):
            t = torch.from_numpy(ids)
            inputs[row, : len(ids) - 1] = t[:-1]
            targets[row, : len(ids) - 1] = masked_targets(t[1:], torch.from_numpy(mask[1:]))
        positions = torch.arange(width).expand(len(chosen), width)
        device = self.d.device
        return inputs.to(device), targets.to(device), positions.to(device)

    def _warm_step(self, step: int) -> dict[str, Any]:
        self.model.train()
        inputs, targets, positions = self.warm_batch(step)
        with self.autocast:
            loss = self.model(input_ids=inputs, position_ids=positions, targets=targets).loss
        ptx_loss = self._ptx_loss() if self.ptx is not None else None  # the warm start forgets too
        (loss if ptx_loss is None else loss + self.config.ptx_weight * ptx_loss).backward()
        grad_norm, report, layers = self._optimizer_step()
        fields = {"phase": "warm_start", "loss": float(loss.detach()), "grad_norm": float(grad_norm),
                  "weight_version": step, "max_logit": [c.max_logit for c in layers],
                  "clipped_heads": [c.clipped_heads for c in layers],
                  "expert_balance": _balance(report), "skipped_steps": report.skipped_steps}
        if ptx_loss is not None:
            fields["ptx_loss"] = float(ptx_loss.detach())
        return fields
