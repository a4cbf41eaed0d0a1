"""A multi-turn sample trained as one row (``episode_rows`` + ``batch_logprobs(keep=...)``) has
exactly the per-token log-probabilities of one row per turn, with gradients; a turn whose context
does not continue the previous one starts its own row; bad keep masks are named."""

from __future__ import annotations

import random

import pytest
import torch

from k2.errors import RLError
from k2.rl.logprobs import batch_logprobs, episode_rows
from k2.rl.rollout import Completion


def turns(seed: int, count: int) -> list[tuple[list[int], Completion]]:
    """``count`` turns chained as play_episodes chains them: context, the turn's tokens, an
    observation, the next turn..."""
    rng = random.Random(seed)
    context = [rng.randrange(1, 256) for _ in range(rng.randrange(3, 9))]
    out = []
    for k in range(count):
        tokens = [rng.randrange(1, 256) for _ in range(rng.randrange(1, 6))]
        out.append((list(context), Completion(k, list(context), tokens)))
        context = context + tokens + [rng.randrange(1, 256) for _ in range(rng.randrange(0, 5))]
    return out


def test_one_row_per_episode_equals_one_row_per_turn(policy) -> None:
    samples = [turns(seed, count) for seed, count in ((0, 3), (1, 1), (2, 4))]
    rows = [episode_rows(s) for s in samples]
    assert [len(r) for r in rows] == [1, 1, 1]
    flat = [r for sample in rows for r in sample]
    merged = batch_logprobs(policy, [p for p, _, _ in flat], [t for _, t, _ in flat], 0.7,
                            keep=[k for _, _, k in flat])
    for sample, row in zip(samples, merged):
        per_turn = batch_logprobs(policy, [ids for ids, _ in sample], [c.token_ids for _, c in sample], 0.7)
        assert row.shape == (sum(len(c.token_ids) for _, c in sample),)
        torch.testing.assert_close(row, torch.cat(per_turn), atol=1e-5, rtol=0)
    # gradients flow through the kept positions only, as through the per-turn rows
    policy.zero_grad()
    merged_sum = sum(x.sum() for x in batch_logprobs(policy, [p for p, _, _ in flat], [t for _, t, _ in flat],
                                                      0.7, keep=[k for _, _, k in flat]))
    merged_sum.backward()
    grads = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
    policy.zero_grad()
    per_turn_sum = sum(x.sum() for s in samples for x in batch_logprobs(
        policy, [ids for ids, _ in s], [c.token_ids for _, c in s], 0.7))
    per_turn_sum.backward()
    for g, p in zip(grads, [p for p in policy.parameters() if p.grad is not None]):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)


def test_a_turn_that_does_not_continue_starts_a_row() -> None:
    sample = turns(5, 3)
    ids, completion = sample[2]
    sample[2] = ([ids[0] + 1, *ids[1:]], completion)  # the third context rewrites its first token
    rows = episode_rows(sample)
    assert len(rows) == 2
    prompt, tokens, keep = rows[0]
    assert prompt == sample[0][0] and sum(keep) == len(sample[0][1].token_ids) + len(sample[1][1].token_ids)
    assert [t for t, k in zip(tokens, keep) if k] == sample[0][1].token_ids + sample[1][1].token_ids
    assert rows[1] == (sample[2][0], completion.token_ids, [True] * len(completion.token_ids))


def test_bad_keep_masks_are_named(policy) -> None:
    with pytest.raises(RLError, match="2 prompts but 1 keep masks"):
        batch_logprobs(policy, [[1], [2]], [[3], [4]], 1.0, keep=[[True]])
    with pytest.raises(RLError, match="pair 1: keep has 2 flags for 1 completion tokens"):
        batch_logprobs(policy, [[1], [2]], [[3], [4]], 1.0, keep=[[True], [True, False]])


def test_a_turn_gets_the_budget_or_what_is_left_of_the_context() -> None:
    """Turns run while at least MIN_TURN_TOKENS positions remain, each up to the per-turn budget
    or the end of the context; an episode that never ends scores 0."""
    from types import SimpleNamespace

    from k2.rl.episodes import MIN_TURN_TOKENS, play_episodes
    from k2.rl.tasks.base import Prompt

    class Env:
        tools: list = []

        def reset(self):  # noqa: ANN202
            return SimpleNamespace(ids=[1] * 40)

        def step(self, ids):  # noqa: ANN001, ANN202
            return SimpleNamespace(ids=[2] * 5), 0.0, False, {}

    task = SimpleNamespace(name="fake", make_env=lambda p, tokenizer: Env(), verify=None)
    asked: list[int] = []

    class Engine:
        def generate(self, requests, seed):  # noqa: ANN001, ANN202
            out = []
            for k, r in enumerate(requests):
                asked.append(r.max_new_tokens)
                n = min(r.max_new_tokens, 20)  # a turn writes 20 tokens or stops at its limit
                out.append(Completion(k, list(r.prompt_ids), [3] * n, [0.0] * n, [0] * n,
                                      "stop" if n == 20 else "length"))
            return out

    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: "x")
    prompt = Prompt(id="p", messages=[], hidden={})
    [episode] = play_episodes(task, [prompt], Engine(), tokenizer, budget=32, temperature=1.0, top_p=1.0,
                              stop_id=0, seed=0, max_context=120)
    # contexts: 40, 65, 90, 115 -> turns of 32, 32, 30 (to the end); then 5 left < 8: over
    assert asked == [32, 32, 30] and MIN_TURN_TOKENS == 8
    assert not episode.done and episode.reward.score == 0.0 and "3 turns" in episode.reward.reason
    with pytest.raises(RLError, match="prompt 'p' is 40 tokens; with a turn of at least 8 it exceeds"):
        play_episodes(task, [prompt], Engine(), tokenizer, budget=32, temperature=1.0, top_p=1.0, stop_id=0,
                      seed=0, max_context=45)
