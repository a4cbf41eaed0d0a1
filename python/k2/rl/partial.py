"""Partial rollouts across RL steps (``k2 rl --partial-rollout-steps N``; docs/rl.md, "Partial
rollouts").

Each RL step draws its ``P`` prompts as usual (``K`` samples each, a *group* per prompt), adds
them to the groups still in flight from earlier steps, and samples everything with the step's
weights for at most ``N`` decode steps of the rollout engine (``generate(..., max_steps=N)``).
Groups whose ``K`` samples all finished are trained on; the others wait in a buffer and resume
next step (``Request(prefix=completion)``) with the next weights, so one trajectory's tokens
carry several weight versions, in order, but the tokens sampled within one step always carry that
step's version.

The buffer is bounded by ``partial_max_age``: a group drawn at RL step ``s0`` is finished at step
``s0 + partial_max_age`` at the latest — its unfinished samples are decoded to the end, without
the cap, with that step's weights (*force-finished*, never dropped: dropping would discard the
long responses and bias training toward short ones). If no group finished within the cap, the
oldest group in flight is force-finished too, so every step trains on at least one group.

Every request's random stream is the one the uncapped loop gives it (its seed derives from the
RL step that drew it and its index in that step), so with unchanged weights partial rollouts
sample exactly what uninterrupted ones do. The buffer is part of the checkpoint
(:meth:`PartialRollouts.state_dict`): prompts are re-derived from their step, the paused
completions (tokens, log-probabilities, versions, seeds) are stored as they are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from k2.errors import RLError
from k2.rl.rollout import Completion, Request
from k2.rl.sampling import request_seed

if TYPE_CHECKING:
    from k2.rl.job import RLJob, Rollouts
    from k2.rl.tasks.base import Prompt


@dataclass
class Group:
    """The ``K`` samples of one prompt, drawn at RL step ``origin`` as prompt ``slot`` of it.

    ``resumed[j]`` is True once sample ``j`` was paused at a step boundary and carried over."""

    origin: int
    slot: int
    prompt: Prompt
    prompt_ids: list[int]
    completions: list[Completion]
    resumed: list[bool] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


def _completion_state(c: Completion) -> dict[str, Any]:
    return {"token_ids": list(c.token_ids), "logprobs": list(c.logprobs), "versions": list(c.versions),
            "finish_reason": c.finish_reason, "seed": int(c.seed)}


class PartialRollouts:
    """The partial-rollout scheduler of an :class:`k2.rl.job.RLJob` and its buffer of groups in
    flight."""

    def __init__(self, job: RLJob) -> None:
        self.job = job
        self.buffer: list[Group] = []
        self.last_trained: list[Group] = []

    # ------------------------------------------------------------------ one step
    def _draw(self, rl_step: int) -> list[Group]:
        from k2.rl.job import render_prompt, step_seed

        job, cfg = self.job, self.job.config
        k = cfg.samples_per_prompt
        prompts = job.task.prompts("train", cfg.prompts_per_step, seed=step_seed(cfg.seed, rl_step, "prompts"))
        call_seed = step_seed(cfg.seed, rl_step, "rollout")
        groups = []
        for slot, prompt in enumerate(prompts):
            ids = render_prompt(job.tokenizer, prompt)
            # Not yet started: a paused completion with no tokens, on the stream the uncapped
            # loop gives request slot·K + j of this step's call.
            completions = [Completion(slot * k + j, list(ids), seed=request_seed(call_seed, slot * k + j))
                           for j in range(k)]
            groups.append(Group(rl_step, slot, prompt, ids, completions, [False] * k))
        return groups

    def _request(self, group: Group, c: Completion) -> Request:
        cfg = self.job.config
        return Request(group.prompt_ids, self.job.budget, temperature=cfg.temperature(group.origin),
                       top_p=cfg.top_p, stop_ids=[self.job.im_end], prefix=c)

    def _sample(self, groups: list[Group], max_steps: int | None) -> None:
        """Run every unfinished sample of ``groups`` (for at most ``max_steps`` decode steps) and
        put the new completions in place."""
        todo = [(g, j) for g in groups for j, c in enumerate(g.completions) if c.finish_reason is None]
        if not todo:
            return
        requests = [self._request(g, g.completions[j]) for g, j in todo]
        done = self.job.engine.generate(requests, seed=0, max_steps=max_steps)
        for (g, j), c in zip(todo, done):
            c.index = g.completions[j].index
            g.completions[j] = c

    def step(self, step: int) -> tuple[Rollouts, dict[str, Any]]:
        """Sample (optimizer) step ``step``: returns the finished groups as :class:`Rollouts`
        and the step's partial-rollout metrics."""
        job, cfg = self.job, self.job.config
        rl_step = step - cfg.warm_start_steps
        fresh = self._draw(rl_step)
        groups = [*self.buffer, *fresh]  # oldest first: they take the engine's rows first
        before = {id(g): [len(c.token_ids) for c in g.completions] for g in groups}
        sync_s = job._sync(step)
        started = time.perf_counter()
        self._sample(groups, cfg.partial_rollout_steps)
        aged = [g for g in groups if not g.finished and rl_step - g.origin >= cfg.partial_max_age]
        if not aged and not any(g.finished for g in groups):
            aged = [groups[0]]  # nothing finished within the cap: finish the oldest
        self._sample(aged, None)
        seconds = time.perf_counter() - started
        trained = [g for g in groups if g.finished]
        self.last_trained = trained
        self.buffer = [g for g in groups if not g.finished]
        for g in self.buffer:
            g.resumed = [r or c.finish_reason is None for r, c in zip(g.resumed, g.completions)]
        self._check_versions(step, trained + self.buffer, before)

        k = cfg.samples_per_prompt
        prompts = [g.prompt for g in trained for _ in range(k)]
        completions = [c for g in trained for c in g.completions]
        segments = [[(g.prompt_ids, c)] for g in trained for c in g.completions]
        texts = [job._decode(c) for c in completions]
        verdicts = job.task.verify_many(prompts, texts)
        temperatures = [cfg.temperature(g.origin) for g in trained for _ in range(k)]
        rollouts = job._shaped(prompts, segments, texts, verdicts, cfg.temperature(rl_step), seconds, sync_s)
        rollouts.temperatures = temperatures
        lags = [step - v for c in completions for v in c.versions]
        resumed = [r for g in trained for r in g.resumed]
        fields = {
            "version_lag": max(lags, default=0),
            "version_lag_mean": sum(lags) / max(len(lags), 1),
            "resumed_share": sum(resumed) / max(len(resumed), 1),
            "mixed_version_share": sum(len(set(c.versions)) > 1 for c in completions) / max(len(completions), 1),
            "groups_trained": len(trained),
            "groups_forced": len(aged),
            "partial_buffer_groups": len(self.buffer),
            "partial_buffer_tokens": sum(len(c.token_ids) for g in self.buffer for c in g.completions),
        }
        return rollouts, fields

    @staticmethod
    def _check_versions(step: int, groups: list[Group], before: dict[int, list[int]]) -> None:
        """The tokens a sample gained this step carry version ``step``, its earlier ones earlier
        versions, never decreasing: versions mix across steps, never within one."""
        for g in groups:
            for c, had in zip(g.completions, before[id(g)]):
                old, new = c.versions[:had], c.versions[had:]
                if any(v != step for v in new) or any(v >= step for v in old) or old != sorted(old):
                    raise RLError(f"step {step}: sample {c.index} of RL step {g.origin}'s prompt {g.slot} "
                                  f"holds weight versions {c.versions} ({had} tokens before this step); "
                                  f"this step's tokens must all be {step}, the earlier ones older")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"groups": [{"origin": g.origin, "slot": g.slot, "resumed": list(g.resumed),
                            "completions": [_completion_state(c) for c in g.completions]}
                           for g in self.buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from k2.rl.job import render_prompt, step_seed

        job, cfg = self.job, self.job.config
        buffer = []
        drawn: dict[int, list] = {}
        for entry in state["groups"]:
            origin, slot = int(entry["origin"]), int(entry["slot"])
            if origin not in drawn:
                drawn[origin] = job.task.prompts("train", cfg.prompts_per_step,
                                                 seed=step_seed(cfg.seed, origin, "prompts"))
            if slot >= len(drawn[origin]):
                raise RLError(f"the checkpoint's partial-rollout buffer holds prompt {slot} of RL step "
                              f"{origin}, but a step draws {cfg.prompts_per_step} prompts")
            prompt = drawn[origin][slot]
            ids = render_prompt(job.tokenizer, prompt)
            k = len(entry["completions"])
            completions = [Completion(slot * k + j, list(ids), [int(t) for t in c["token_ids"]],
                                      [float(x) for x in c["logprobs"]], [int(v) for v in c["versions"]],
                                      c["finish_reason"], int(c["seed"]))
                           for j, c in enumerate(entry["completions"])]
            buffer.append(Group(origin, slot, prompt, ids, completions, [bool(r) for r in entry["resumed"]]))
        self.buffer = buffer
