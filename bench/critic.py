"""Critic speed: pairwise judgements per second against the rollout rate of the same model.

One model (the tiny preset with the tokenizer's vocabulary, random weights, float32) both samples
and judges, as with
``k2 rl --critic-source copy``: the rollout engine samples K replies to each of P bait prompts
(``RolloutEngine``, continuous batching, exactly ``--budget`` tokens each: no stop token, so
every round does the same work), then :class:`k2.rl.critic.critic.Critic` judges every pair of
each prompt's replies (``all``: K(K-1)/2 pairs, or ``ring``: K) in both orders — one batched
forward per ``--critic-batch`` sequences, no generation.

Reported: rollout samples/s and tokens/s; critic judgements/s (a judgement is one pair in both
orders, two sequences) and sequences/s; the critic's seconds per critic-rewarded prompt against
the rollout's seconds per prompt; and, for shares of critic-rewarded prompts, how much longer an
RL step's sampling + rewarding phase takes than sampling alone (the policy update, which is the
same either way, not counted).

Times are medians of interleaved rounds (rollout then critic in each round).

Run:  python bench/critic.py                 (tiny preset, P=4, K=4, budget 32, one thread)
      python bench/critic.py --quick         (a few seconds: smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import torch

from k2.data.chat import render_chat
from k2.data.tokenizer import train_tokenizer
from k2.model import K2Config, K2ForCausalLM
from k2.rl import Request, RolloutEngine
from k2.rl.critic.aggregate import pair_schedule
from k2.rl.critic.bait import BaitPrompts
from k2.rl.critic.bootstrap import critic_conversations, synthesize_pairs
from k2.rl.critic.critic import Comparison, Critic
from k2.rl.critic.rubrics import rubrics_for


def build_tokenizer(vocab: int):  # noqa: ANN201
    """A byte-level BPE tokenizer trained on the critic's own prompts and the arithmetic chats."""
    from k2.rl.tasks import get_task

    task = get_task("arithmetic")
    texts = [render_chat([*m, {"role": "assistant", "content": g}]) for m, g in task.warm_start_examples(200)]
    texts += [render_chat(r["messages"]) for r in critic_conversations(synthesize_pairs(200, seed=0))]
    return train_tokenizer(texts, vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompts", type=int, default=4, help="critic-rewarded prompts (P)")
    parser.add_argument("--samples", type=int, default=4, help="replies per prompt (K)")
    parser.add_argument("--budget", type=int, default=32, help="tokens per reply")
    parser.add_argument("--pairs", default="all", choices=("all", "ring"))
    parser.add_argument("--critic-batch", type=int, default=16)
    parser.add_argument("--rollout-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary")
    parser.add_argument("--quick", action="store_true", help="P=2, K=3, budget 8, one round")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.samples, args.budget, args.repeats = 2, 3, 8, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(args.vocab)
    # the model's vocabulary is the tokenizer's, so every sampled id decodes to text
    config = dataclasses.replace(K2Config.from_preset(args.preset), vocab_size=tokenizer.get_vocab_size())
    model = K2ForCausalLM(config).eval()
    pad = tokenizer.token_to_id("<|pad|>") or 0
    engine = RolloutEngine(model, max_batch=args.rollout_batch, pad_token_id=pad)
    critic = Critic(model, tokenizer, batch_size=args.critic_batch, max_reply_tokens=args.budget)
    prompts = BaitPrompts().prompts("train", args.prompts, seed=0)
    rubrics = rubrics_for("bait")
    ids = [tokenizer.encode(render_chat(p.messages, add_generation_prompt=True), add_special_tokens=False).ids
           for p in prompts]
    k = args.samples
    pairs = pair_schedule(k, args.pairs)

    def rollout(seed: int) -> list[str]:
        requests = [Request(i, args.budget, temperature=1.0) for i in ids for _ in range(k)]
        done = engine.generate(requests, seed=seed)
        return [tokenizer.decode(c.token_ids, skip_special_tokens=False) for c in done]

    def judge(texts: list[str]) -> int:
        comparisons = [Comparison(p.messages, rubrics, texts[g * k + i], texts[g * k + j])
                       for g, p in enumerate(prompts) for i, j in pairs]
        return len(critic.judge(comparisons))

    rollout_s, critic_s = [], []
    judgements = 0
    seq_tokens = 0
    for r in range(args.repeats + 1):  # round 0 warms up
        start = time.perf_counter()
        texts = rollout(r)
        t_roll = time.perf_counter() - start
        start = time.perf_counter()
        judgements = judge(texts)
        t_judge = time.perf_counter() - start
        if r:
            rollout_s.append(t_roll)
            critic_s.append(t_judge)
        comparisons = [Comparison(p.messages, rubrics, texts[g * k + i], texts[g * k + j])
                       for g, p in enumerate(prompts) for i, j in pairs]
        seq_tokens = sum(len(s) for s in critic.encode_both(comparisons))
    roll, crit = statistics.median(rollout_s), statistics.median(critic_s)
    samples = args.prompts * k
    per_prompt_roll = roll / args.prompts
    per_prompt_critic = crit / args.prompts
    result = {
        "preset": args.preset, "prompts": args.prompts, "samples": k, "budget": args.budget, "pairs": args.pairs,
        "threads": args.threads, "rounds": args.repeats,
        "rollout_s": roll, "rollout_samples_per_s": samples / roll, "rollout_tokens_per_s": samples * args.budget / roll,
        "critic_s": crit, "judgements": judgements, "judgements_per_s": judgements / crit,
        "critic_sequences_per_s": 2 * judgements / crit,
        "critic_tokens_per_sequence": seq_tokens / (2 * judgements),
        "critic_prefill_tokens_per_s": seq_tokens / crit,
        "critic_s_per_prompt": per_prompt_critic, "rollout_s_per_prompt": per_prompt_roll,
        "critic_over_rollout_per_prompt": per_prompt_critic / per_prompt_roll,
        "sampling_phase_slowdown": {f"{s:.2f}": 1 + s * per_prompt_critic / per_prompt_roll
                                    for s in (0.1, 0.25, 0.5, 1.0)},
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
    }
    print(f"{'':34}{'value':>14}")
    print(f"{'rollout samples/s':34}{result['rollout_samples_per_s']:>14.2f}")
    print(f"{'rollout tokens/s':34}{result['rollout_tokens_per_s']:>14.1f}")
    print(f"{'critic judgements/s (2 seqs each)':34}{result['judgements_per_s']:>14.2f}")
    print(f"{'critic prompt tokens/s (prefill)':34}{result['critic_prefill_tokens_per_s']:>14.0f}")
    print(f"{'critic tokens per sequence':34}{result['critic_tokens_per_sequence']:>14.0f}")
    print(f"{'critic s / rollout s per prompt':34}{result['critic_over_rollout_per_prompt']:>14.2f}")
    for share, slow in result["sampling_phase_slowdown"].items():
        print(f"{'sampling phase x, share ' + share:34}{slow:>14.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
