"""Offline critic probe: can the critic learn, from verified pairs alone, to prefer the right
reply? (docs/results.md, "Worked steps make the critic's job readable")

The policy (``--init``, a k2 run) samples K replies to train- and test-split prompts of the
arithmetic task (level 2, worked column steps, ``--digits`` operand digits) at ``--temperature``;
the verifier scores them; every two replies of a prompt with different scores make a preference
pair (the closed loop's rule, :func:`k2.rl.critic.closed_loop.preference_pairs`). A copy of the
policy is then trained as the pairwise critic (``CriticLearner``: AdamW, ``--batch`` pairs a
step in both orders) on the train pairs only, and its agreement with the verifier is measured on
up to ``--max-eval-pairs`` test-split pairs every ``--every`` steps. No RL runs: this separates
"can the critic learn to read these replies" from the closed loop's other moving parts.

    python bench/critic_probe.py --init runs/ws_d3 --steps 300 --every 25
"""

import argparse
import copy
import json
import random
import time

import torch

from k2.agentic.evaluate import load_model
from k2.rl.critic.closed_loop import CriticLearner, agreement, preference_pairs
from k2.rl.critic.critic import Critic
from k2.rl.critic.rubrics import TASK_RUBRICS, rubrics_for
from k2.rl.job import render_prompt
from k2.rl.rollout import Request, RolloutEngine
from k2.rl.tasks import get_task

p = argparse.ArgumentParser()
p.add_argument("--init", required=True, help="the policy: a k2 run directory or checkpoint")
p.add_argument("--train-prompts", type=int, default=512)
p.add_argument("--test-prompts", type=int, default=192)
p.add_argument("--k", type=int, default=4)
p.add_argument("--temperature", type=float, default=1.0)
p.add_argument("--lr", type=float, default=3e-4)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--every", type=int, default=25)
p.add_argument("--rubrics", default="task", choices=("all", "task"))
p.add_argument("--max-eval-pairs", type=int, default=128)
p.add_argument("--digits", type=int, default=3, help="operand digits")
p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
p.add_argument("--only-correct-vs-wrong", action="store_true", help="keep only pairs whose winner is fully right")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)

torch.manual_seed(0)
model, tok, _ = load_model(a.init)
task = get_task("arithmetic", level=2, working="steps", digits=a.digits)
im_end = tok.token_to_id("<|im_end|>")


def sample(split, n, seed):
    prompts = task.prompts(split, n, seed=seed)
    reqs = [Request(render_prompt(tok, pr), task.token_budget, temperature=a.temperature, stop_ids=[im_end])
            for pr in prompts for _ in range(a.k)]
    eng = RolloutEngine(model, max_batch=256, pad_token_id=tok.token_to_id("<|pad|>") or 0)
    comps = eng.generate(reqs, seed=seed)
    texts = [tok.decode(c.token_ids, skip_special_tokens=False) for c in comps]
    rep = [pr for pr in prompts for _ in range(a.k)]
    rewards = [task.verify(pr, t) for pr, t in zip(rep, texts)]
    scores = [r.score for r in rewards]
    return rep, texts, scores, rewards


t0 = time.perf_counter()
tr = sample("train", a.train_prompts, 1)
te = sample("test", a.test_prompts, 2)
print(f"sampled in {time.perf_counter() - t0:.0f} s; train acc {sum(r.correct for r in tr[3]) / len(tr[3]):.3f}",
      flush=True)
train_pairs = preference_pairs(task, tr[0], tr[1], tr[2], a.k)
eval_pairs = preference_pairs(task, te[0], te[1], te[2], a.k, evaluation=True)
if a.only_correct_vs_wrong:
    train_pairs = [q for q in train_pairs if q.winner_score == 1.0]
    eval_pairs = [q for q in eval_pairs if q.winner_score == 1.0]
random.Random(0).shuffle(eval_pairs)
eval_pairs = eval_pairs[: a.max_eval_pairs]
print(f"{len(train_pairs)} train pairs, {len(eval_pairs)} eval pairs", flush=True)
for q in train_pairs[:3]:
    print("WIN", q.winner_score, repr(q.winner[:200]))
    print("LOSE", q.loser_score, repr(q.loser[:200]))
rubrics = rubrics_for("arithmetic") if a.rubrics == "all" else list(TASK_RUBRICS.get("arithmetic", ()))
critic_model = copy.deepcopy(model)
critic = Critic(critic_model, tok, batch_size=32)
learner = CriticLearner(critic, rubrics, lr=a.lr, batch=a.batch, capacity=len(train_pairs))
learner.buffer.add(train_pairs)
curve = []
for step in range(0, a.steps + 1):
    if step % a.every == 0:
        ag = agreement(critic, eval_pairs, rubrics)
        curve.append((step, ag.agreement))
        print(f"step {step}: agreement {ag.agreement:.3f} p_winner {ag.mean_p_winner:.3f} "
              f"bias {ag.position_bias_rate:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if step < a.steps:
        m = learner.update(1, seed=step)
        if step % a.every == a.every - 1:
            print(f"  loss {m['critic_loss']:.3f} acc {m['critic_train_accuracy']:.2f}", flush=True)
print(json.dumps({"args": vars(a), "curve": curve}))
