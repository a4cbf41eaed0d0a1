"""``k2 rl`` with a share of critic-rewarded prompts (docs/critic.md, "In `k2 rl`").

:class:`CriticRLJob` is :class:`k2.rl.job.RLJob` with three additions:

1. **Mixed prompts.** Of each step's ``P`` prompts, ``round(critic_share · P)`` come from the
   critic's prompt set (the bait set, or the task's own train prompts with the verifier hidden)
   and the rest from the task. All ``P · K`` requests are sampled in one engine call, as before.
2. **Critic rewards.** The K replies of a critic-rewarded prompt are compared pairwise
   (``critic_pairs``), each pair in both orders, and the judgements become rewards in [0, 1]
   (``critic_aggregation``); a reply breaking a mandatory rubric's check is capped at
   ``critic_cap``. They replace the verifier's score and enter the same K2 (or GRPO) loss with
   the same truncation penalty: the loss does not know which prompts were critic-rewarded.
3. **Closed loop.** After the policy's update, the verifiable prompts' samples give preference
   pairs (different verifier scores; never a held-out prompt) for the critic's buffer; every
   ``critic_update_every`` RL steps the critic takes ``critic_update_steps`` steps of its own
   optimizer on them. Critic–verifier agreement is measured on on-policy pairs of held-out
   prompts (``critic_eval_prompts`` of the test split) every ``critic_eval_every`` RL steps and
   at every evaluation.

The critic's weights (unless it is the policy itself), its optimizer state, its buffer and its
counters are part of the job's checkpointed state (:meth:`state_dict`), so a resumed run goes on
exactly.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch

from k2.errors import ConfigError, CriticError
from k2.rl.critic.aggregate import aggregate, pair_schedule
from k2.rl.critic.checks import cap_rewards, opening_praise, self_justification, violations
from k2.rl.critic.closed_loop import CriticLearner, agreement, preference_pairs
from k2.rl.critic.critic import Comparison, Critic
from k2.rl.critic.rubrics import rubrics_for
from k2.rl.job import RLJob, Rollouts, render_prompt, step_seed
from k2.rl.rollout import Request
from k2.rl.tasks.base import Reward


def build_critic_model(config: Any, policy: torch.nn.Module, tokenizer) -> torch.nn.Module:  # noqa: ANN001
    """The critic model ``config.critic_source`` names: a copy of ``policy``, ``policy`` itself,
    or the checkpoint ``config.critic_init`` (whose tokenizer must be the policy's)."""
    if config.critic_source == "policy":
        return policy
    if config.critic_source == "copy":
        return copy.deepcopy(policy).eval()
    from k2 import checkpoint
    from k2.data import load_tokenizer
    from k2.model import K2Config, K2ForCausalLM
    from k2.train.sft import resolve_init

    init = resolve_init(config.critic_init)
    if load_tokenizer(init.tokenizer_dir).get_vocab() != tokenizer.get_vocab():
        raise CriticError(f"critic_init {config.critic_init}: its tokenizer differs from the policy's; "
                          "the critic must read the policy's tokens")
    model = K2ForCausalLM(K2Config.from_hf_dict(init.hf_config)).to(next(policy.parameters()).device)
    checkpoint.load(init.checkpoint, model, restore_rng=False)
    return model.eval()


class CriticRLJob(RLJob):
    """:class:`RLJob` with critic-rewarded prompts and the closed-loop critic (module docstring)."""

    def __init__(self, config, d, model, tokenizer, task, log: Callable[[str], None],  # noqa: ANN001
                 rollout: Any = None) -> None:
        super().__init__(config, d, model, tokenizer, task, log, rollout=rollout)
        cfg = config
        if task.multi_turn:
            raise ConfigError("the critic reward is for single-turn tasks; --task "
                              f"{task.name} is multi-turn")
        if cfg.critic_prompts == "bait":
            from k2.rl.critic.bait import BaitPrompts

            self.critic_prompt_set = BaitPrompts()
        else:
            self.critic_prompt_set = task
        self.n_critic = round(cfg.critic_share * cfg.prompts_per_step)
        self.critic_budget = cfg.token_budget or self.critic_prompt_set.token_budget
        self.critic = Critic(build_critic_model(cfg, model, tokenizer), tokenizer, batch_size=cfg.critic_batch,
                             max_reply_tokens=cfg.critic_max_reply_tokens or max(self.budget, self.critic_budget))
        self.judge_rubrics = rubrics_for(self.critic_prompt_set.name, file=cfg.critic_rubrics or None)
        self.loop_rubrics = rubrics_for(task.name, file=cfg.critic_rubrics or None)
        self.learner = CriticLearner(self.critic, self.loop_rubrics, lr=cfg.critic_lr, batch=cfg.critic_batch,
                                     capacity=cfg.critic_buffer)
        self.shared = self.critic.model is model
        self.eval_prompts = task.prompts("test", cfg.critic_eval_prompts, seed=cfg.seed) \
            if cfg.critic_eval_prompts else []
        self.held_out_ids = {p.id for p in self.eval_prompts}
        self.bootstrapped = cfg.critic_bootstrap_steps == 0
        self._fields: dict[str, Any] = {}

    # ------------------------------------------------------------------ bootstrap
    def _bootstrap(self) -> dict[str, float]:
        """The critic's bootstrap on synthesized pairs, once per run (before its first use)."""
        if self.bootstrapped:
            return {}
        from k2.rl.critic.bootstrap import synthesize_pairs, task_of

        cfg = self.config
        pairs = synthesize_pairs(cfg.critic_bootstrap_pairs, seed=cfg.seed)
        rubrics = {t: rubrics_for(t, file=cfg.critic_rubrics or None) for t in ("arithmetic", "bait")}
        model = self.critic.model
        optimizer = self.learner.optimizer
        import random

        rng = random.Random(f"k2.rl.critic.bootstrap:{cfg.seed}")
        was_training = model.training
        model.train()
        losses = []
        for _ in range(cfg.critic_bootstrap_steps):
            chosen = rng.sample(pairs, min(cfg.critic_batch, len(pairs)))
            loss, _ = self.critic.loss([Comparison(p.messages, rubrics[task_of(p)], p.winner, p.loser, p.prompt_id)
                                        for p in chosen])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.learner.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        model.train(was_training)
        self.bootstrapped = True
        self.log(f"critic bootstrap: {len(losses)} steps on {len(pairs)} synthesized pairs, loss "
                 f"{losses[0]:.3f} -> {losses[-1]:.3f}")
        return {"critic_bootstrap_loss": losses[-1]}

    # ------------------------------------------------------------------ rollouts
    def rollouts(self, step: int) -> Rollouts:
        """The step's samples: verifiable prompts first, then the critic-rewarded ones, scored
        by the verifier and by the critic respectively."""
        cfg = self.config
        rl_step = step - cfg.warm_start_steps
        temperature = cfg.temperature(rl_step)
        n_v = cfg.prompts_per_step - self.n_critic
        v_prompts = self.task.prompts("train", n_v, seed=step_seed(cfg.seed, rl_step, "prompts")) if n_v else []
        c_prompts = self.critic_prompt_set.prompts("train", self.n_critic,
                                               seed=step_seed(cfg.seed, rl_step, "critic_prompts"))
        k = cfg.samples_per_prompt
        prompts = [*v_prompts, *c_prompts]
        repeated = [p for p in prompts for _ in range(k)]
        rendered = [render_prompt(self.tokenizer, p) for p in prompts]
        budgets = [self.budget] * n_v + [self.critic_budget] * self.n_critic
        requests = [Request(ids, budget, temperature=temperature, top_p=cfg.top_p, stop_ids=[self.im_end])
                    for ids, budget in zip(rendered, budgets) for _ in range(k)]
        prompt_ids = [r.prompt_ids for r in requests]
        sync_s = self._sync(step)
        started = time.perf_counter()
        completions = self.engine.generate(requests, seed=step_seed(cfg.seed, rl_step, "rollout"))
        seconds = time.perf_counter() - started
        self._check_versions(step, completions)
        texts = [self._decode(c) for c in completions]
        cut = n_v * k
        verdicts = self.task.verify_many(repeated[:cut], texts[:cut]) if cut else []
        critic_verdicts, fields = self.critic_rewards(c_prompts, texts[cut:])
        if cfg.critic_prompts == "task":  # the hidden verifier, for the record only
            hidden = self.task.verify_many(repeated[cut:], texts[cut:])
            fields["critic_prompt_accuracy"] = sum(v.correct for v in hidden) / max(len(hidden), 1)
            fields["critic_prompt_verifier_score"] = sum(v.score for v in hidden) / max(len(hidden), 1)
        segments = [[(ids, c)] for ids, c in zip(prompt_ids, completions)]
        rollouts = self._shaped(repeated, segments, texts, [*verdicts, *critic_verdicts], temperature,
                                seconds, sync_s)
        self._fields = fields
        return rollouts

    def critic_rewards(self, prompts, texts: list[str]) -> tuple[list[Reward], dict[str, Any]]:  # noqa: ANN001
        """Rewards of the K replies of each critic-rewarded prompt (prompt-major), and the
        step's critic metrics."""
        if not prompts:
            return [], {}
        cfg = self.config
        k = cfg.samples_per_prompt
        pairs = pair_schedule(k, cfg.critic_pairs)
        comparisons = [Comparison(p.messages, self.judge_rubrics, texts[g * k + i], texts[g * k + j],
                                  name=f"{p.id} samples {i} and {j}")
                       for g, p in enumerate(prompts) for i, j in pairs]
        started = time.perf_counter()
        judged = self.critic.judge(comparisons)
        judge_s = time.perf_counter() - started
        out: list[Reward] = []
        for g in range(len(prompts)):
            probs = [j.p_first for j in judged[g * len(pairs): (g + 1) * len(pairs)]]
            rewards = aggregate(k, pairs, probs, cfg.critic_aggregation)
            group = texts[g * k: (g + 1) * k]
            broken = [violations(t, self.judge_rubrics) for t in group]
            capped = cap_rewards(rewards, broken, cfg.critic_cap)
            for r, b in zip(capped, broken):
                out.append(Reward(min(max(r, 0.0), 1.0), False, "critic" + (f" (breaks {', '.join(b)})" if b else "")))
        praise = sum(opening_praise(t) for t in texts)
        fields = {
            "critic_prompts": len(prompts),
            "critic_reward": sum(r.score for r in out) / len(out),
            "critic_judgements": len(judged),
            "critic_judge_s": judge_s,
            "critic_judgements_per_s": len(judged) / max(judge_s, 1e-9),
            "position_bias_rate": sum(j.biased for j in judged) / len(judged),
            "opening_praise_rate": praise / len(texts),
            "self_justification_rate": sum(self_justification(t) for t in texts) / len(texts),
            "capped_rate": sum(r.reason != "critic" for r in out) / len(out),
        }
        return out, fields

    # ------------------------------------------------------------------ the step
    def _rl_step(self, step: int) -> dict[str, Any]:
        cfg = self.config
        rl_step = step - cfg.warm_start_steps
        extra = self._bootstrap()
        fields = super()._rl_step(step)
        r = self.last
        assert r is not None
        fields.update(self._fields)
        fields.update(extra)
        k = cfg.samples_per_prompt
        cut = (cfg.prompts_per_step - self.n_critic) * k
        lengths = r.lengths()
        if self.n_critic:
            fields["critic_response_len"] = sum(lengths[cut:]) / len(lengths[cut:])
        if cut:
            fields["verified_reward"] = sum(r.rewards[:cut]) / cut
        fields["reward_by_task"] = {
            **({self.task.name: sum(r.rewards[:cut]) / cut} if cut else {}),
            **({f"critic:{self.critic_prompt_set.name}": sum(r.rewards[cut:]) / len(r.rewards[cut:])}
               if self.n_critic else {}),
        }
        fields["opening_praise_rate_all"] = sum(opening_praise(t) for t in r.texts) / len(r.texts)
        # The closed loop: verifiable samples → preference pairs → (every N steps) a critic update.
        new = preference_pairs(self.task, r.prompts[:cut], r.texts[:cut], [v.score for v in r.verdicts[:cut]], k,
                               held_out_ids=self.held_out_ids, per_prompt=cfg.critic_pairs_per_prompt,
                               seed=step_seed(cfg.seed, rl_step, "critic_pairs"))
        self.learner.buffer.add(new)
        fields["critic_new_pairs"] = len(new)
        fields["critic_buffer"] = len(self.learner.buffer)
        if cfg.critic_update_every and (rl_step + 1) % cfg.critic_update_every == 0:
            fields.update(self.learner.update(cfg.critic_update_steps, step_seed(cfg.seed, rl_step, "critic_update")))
        fields["critic_updates"] = self.learner.updates
        if cfg.critic_eval_every and ((rl_step + 1) % cfg.critic_eval_every == 0 or step + 1 == self.total_steps):
            fields.update(self.critic_agreement(step + 1))
        return fields

    def critic_agreement(self, version: int) -> dict[str, float]:
        """Critic–verifier agreement on on-policy pairs of the held-out prompts: K samples of each
        (the policy of weight ``version``, temperature 1, seeded by ``version``), the pairs whose
        verifier scores differ."""
        if not self.eval_prompts:
            return {}
        self._bootstrap()
        cfg = self.config
        k = cfg.samples_per_prompt
        ids = [render_prompt(self.tokenizer, p) for p in self.eval_prompts]
        requests = [Request(i, self.budget, temperature=1.0, top_p=cfg.top_p, stop_ids=[self.im_end])
                    for i in ids for _ in range(k)]
        self.evaluator.weight_version = version
        completions = self.evaluator.generate(requests, seed=step_seed(cfg.seed, version, "critic_eval"))
        texts = [self._decode(c) for c in completions]
        repeated = [p for p in self.eval_prompts for _ in range(k)]
        scores = [v.score for v in self.task.verify_many(repeated, texts)]
        pairs = preference_pairs(self.task, repeated, texts, scores, k, per_prompt=cfg.critic_pairs_per_prompt,
                                 seed=version, evaluation=True)
        result = agreement(self.critic, pairs, self.loop_rubrics)
        if not result.pairs:  # the policy's samples all scored alike: nothing to measure
            return {"critic_agreement_pairs": 0}
        return {"critic_agreement": result.agreement, "critic_agreement_pairs": result.pairs,
                "critic_p_winner": result.mean_p_winner, "critic_eval_position_bias": result.position_bias_rate}

    def evaluate(self, step: int, final: bool) -> dict[str, float]:
        out = super().evaluate(step, final)
        found = self.critic_agreement(step)
        if found.get("critic_agreement_pairs"):
            self.log(f"step {step}: critic-verifier agreement {found['critic_agreement']:.3f} on "
                     f"{found['critic_agreement_pairs']} held-out pairs")
        return {**out, **found}

    def progress(self, fields: dict[str, Any]) -> dict[str, str]:
        out = super().progress(fields)
        if "critic_reward" in fields:
            out["critic_r"] = f"{fields['critic_reward']:.3f}"
            out["praise"] = f"{fields['opening_praise_rate']:.2f}"
        if "critic_agreement" in fields:
            out["agree"] = f"{fields['critic_agreement']:.2f}"
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = self.learner.state_dict()
        if self.shared:  # the critic is the policy: its weights are the checkpoint's model
            del state["model"]
        return {**super().state_dict(), "critic": {**state, "bootstrapped": self.bootstrapped}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "critic" not in state:
            raise CriticError("the checkpoint has no critic state (its run had no --critic-share)")
        critic = dict(state["critic"])
        self.bootstrapped = bool(critic.pop("bootstrapped"))
        if self.shared:
            critic["model"] = self.critic.model.state_dict()
        elif "model" not in critic:
            raise CriticError("the checkpoint's critic was the policy itself (critic_source policy); "
                              "resume with the same critic_source")
        self.learner.load_state_dict(critic)
