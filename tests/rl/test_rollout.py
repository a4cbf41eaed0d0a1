"""The rollout engine: log-probabilities, continuous batching, stopping, versions, errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from k2.errors import RLError
from k2.model.generate import generate
from k2.rl import Request, RolloutEngine, request_seed, sequence_logprobs
from k2.rl.sampling import UNIFORMS_PER_TOKEN, nucleus_mask, sample_tokens


def mixed_requests(count: int = 9, seed: int = 1) -> list[Request]:
    """Prompts of 1..8 tokens, budgets of 1..12, greedy and sampled, with and without top-p."""
    g = torch.Generator().manual_seed(seed)
    settings = [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0), (1.3, 0.5)]
    requests = []
    for i in range(count):
        length = int(torch.randint(1, 9, (1,), generator=g))
        prompt = torch.randint(0, 256, (length,), generator=g).tolist()
        temperature, top_p = settings[i % len(settings)]
        budget = int(torch.randint(1, 13, (1,), generator=g))
        requests.append(Request(prompt, budget, temperature, top_p, stop_ids=(3, 5, 7, 11, 13)))
    return requests


def test_logprobs_equal_a_full_forward(policy):
    requests = mixed_requests()
    completions = RolloutEngine(policy, max_batch=3).generate(requests, seed=3)
    assert [c.index for c in completions] == list(range(len(requests)))
    with torch.no_grad():
        for request, completion in zip(requests, completions):
            assert completion.prompt_ids == list(request.prompt_ids)
            reference = sequence_logprobs(policy, request.prompt_ids, completion.token_ids, request.temperature)
            got = torch.tensor(completion.logprobs)
            assert got.shape == reference.shape == (len(completion.token_ids),)
            torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)
            assert math.isclose(completion.logprob, float(reference.sum()), abs_tol=1e-4)


def test_continuous_batching_gives_the_samples_of_one_at_a_time_generation(policy):
    requests = mixed_requests(10, seed=2)
    batched = RolloutEngine(policy, max_batch=3).generate(requests, seed=11)
    engine = RolloutEngine(policy, max_batch=3)
    stats = engine.last_stats
    for index, request in enumerate(requests):
        alone_request = dataclasses.replace(request, seed=request_seed(11, index))
        alone = RolloutEngine(policy, max_batch=1).generate([alone_request])[0]
        assert alone.token_ids == batched[index].token_ids, index
        assert alone.finish_reason == batched[index].finish_reason
        torch.testing.assert_close(
            torch.tensor(alone.logprobs), torch.tensor(batched[index].logprobs), atol=1e-5, rtol=0
        )
    # A larger batch and the reverse order (own seeds) give the same samples too.
    seeded = [dataclasses.replace(r, seed=request_seed(11, i)) for i, r in enumerate(requests)]
    reverse = engine.generate(seeded[::-1])
    assert [c.token_ids for c in reverse[::-1]] == [c.token_ids for c in batched]
    wide = RolloutEngine(policy, max_batch=8).generate(requests, seed=11)
    assert [c.token_ids for c in wide] == [c.token_ids for c in batched]
    assert stats is not engine.last_stats


def test_sampling_differs_between_seeds_and_requests(policy):
    request = Request([1, 2, 3], 12, temperature=1.0)
    engine = RolloutEngine(policy, max_batch=4)
    out = engine.generate([request] * 4, seed=0)
    assert len({tuple(c.token_ids) for c in out}) > 1  # K samples of one prompt differ
    again = engine.generate([request] * 4, seed=0)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]
    other = engine.generate([request] * 4, seed=1)
    assert [c.token_ids for c in other] != [c.token_ids for c in out]


def test_greedy_rows_match_model_generate(policy):
    prompts = [[5, 9, 200, 17], [44], [1, 2, 3, 4, 5, 6, 7, 8, 9], [250, 251]]
    stops = [3, 5, 7]
    expected = generate(policy, prompts, max_new_tokens=10, temperature=0.0, stop_tokens=stops)
    requests = [Request(p, 10, temperature=0.0, stop_ids=stops) for p in prompts]
    got = RolloutEngine(policy, max_batch=2).generate(requests)
    assert [c.token_ids for c in got] == expected
    for completion, tokens in zip(got, expected):
        stopped = tokens[-1] in stops
        assert completion.finish_reason == ("stop" if stopped else "length")
        if not stopped:
            assert len(tokens) == 10


def test_stop_tokens_and_budgets(policy):
    prompt = [10, 20, 30]
    free = RolloutEngine(policy).generate([Request(prompt, 8, temperature=0.0)])[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    # Stopping on the greedy path's fourth token ends the sequence there, stop token kept.
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    stopped = RolloutEngine(policy).generate([Request(prompt, 8, temperature=0.0, stop_ids=(stop,))])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first + 1]
    # Sampled requests respect their budgets and stop at their first stop token.
    requests = [Request(prompt, budget, temperature=1.0, stop_ids=(3, 5)) for budget in (1, 2, 5, 17)]
    for request, completion in zip(requests, RolloutEngine(policy, max_batch=2).generate(requests, seed=5)):
        assert 1 <= len(completion.token_ids) <= request.max_new_tokens
        assert all(t not in (3, 5) for t in completion.token_ids[:-1])
        if completion.finish_reason == "stop":
            assert completion.token_ids[-1] in (3, 5)
        else:
            assert completion.finish_reason == "length" and len(completion.token_ids) == request.max_new_tokens


def test_finished_rows_are_refilled(policy):
    # Two slots: one runs a 12-token request while the other serves four 1-token requests and a
    # second 12-token one, so the whole call takes 11 decode steps (a static batch of two would
    # take 22), and every decode step runs both rows except the ones after the first long one ends.
    budgets = [12, 1, 1, 1, 1, 12]
    requests = [Request([7, 8, 9][: 1 + i % 3], b, temperature=1.0) for i, b in enumerate(budgets)]
    engine = RolloutEngine(policy, max_batch=2)
    out = engine.generate(requests, seed=0)
    assert [len(c.token_ids) for c in out] == budgets
    stats = engine.last_stats
    assert stats.tokens == sum(budgets)
    assert stats.row_steps == sum(budgets) - len(budgets)  # each first token comes from a prefill
    assert stats.decode_steps == 11
    assert stats.requests == 6 and stats.seconds > 0


def test_refill_into_a_wider_cache(policy):
    # A long prompt joins after short ones have grown the cache: the rows are shifted right to
    # make room, and the samples stay those of one-at-a-time generation.
    requests = [
        Request([1], 2, temperature=0.0),
        Request([2, 3], 20, temperature=1.0, top_p=0.8, seed=4),
        Request(list(range(40, 70)), 5, temperature=1.0, seed=5),
        Request([9] * 3, 6, temperature=0.5, seed=6),
    ]
    together = RolloutEngine(policy, max_batch=2).generate(requests)
    for request, completion in zip(requests, together):
        alone = RolloutEngine(policy, max_batch=1).generate([request])[0]
        assert alone.token_ids == completion.token_ids


def test_every_token_carries_the_weight_version_of_its_step(policy):
    engine = RolloutEngine(policy, max_batch=2, weight_version=7)
    requests = [Request([1, 2], b, temperature=1.0) for b in (2, 9, 3, 9)]
    bumped = []

    def progress(done: int, total: int) -> None:
        assert total == len(requests)
        bumped.append(done)
        if done == 1:
            engine.weight_version = 8  # as if new weights had been loaded mid-call

    out = engine.generate(requests, seed=0, progress=progress)
    assert bumped == [1, 2, 3, 4]
    assert out[0].versions == [7, 7]
    for completion in out:
        assert len(completion.versions) == len(completion.token_ids)
        assert completion.versions == sorted(completion.versions)
    assert out[1].versions[0] == 7 and out[1].versions[-1] == 8
    assert set(out[3].versions) == {8}
    engine.weight_version = 9
    assert set(v for c in engine.generate(requests) for v in c.versions) == {9}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(prompt_ids=[]), "prompt_ids"),
        (dict(prompt_ids=[1, 256]), "prompt_ids"),
        (dict(prompt_ids="abc"), "prompt_ids"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=200), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(stop_ids=(-1,)), "stop_ids"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_requests_name_the_request_and_field(policy, change, field):
    good = Request([1, 2, 3], 4)
    with pytest.raises(RLError, match=rf"request 1: {field}"):
        RolloutEngine(policy).generate([good, dataclasses.replace(good, **change)])


def test_engine_arguments_and_empty_calls(policy):
    with pytest.raises(RLError, match="max_batch"):
        RolloutEngine(policy, max_batch=0)
    with pytest.raises(RLError, match="pad_token_id"):
        RolloutEngine(policy, pad_token_id=256)
    assert RolloutEngine(policy).generate([]) == []
    assert policy.training is False
    policy.train()
    try:
        RolloutEngine(policy).generate([Request([1], 2)])
        assert policy.training is True  # the caller's mode is restored
    finally:
        policy.eval()


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.6, 1.0), (1.4, 0.7), (1.0, 0.35), (1.0, 0.05)])
def test_sampler_frequencies_follow_the_tempered_nucleus(temperature, top_p):
    # (1.0, 0.35) and (1.0, 0.05) make the candidates miss the nucleus often, so the fallback
    # path is exercised too.
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(0)) * 2
    n = 40000
    uniforms = torch.rand(n, UNIFORMS_PER_TOKEN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tokens, logprobs = sample_tokens(
        logits.expand(n, -1), torch.full((n,), temperature), torch.full((n,), top_p, dtype=torch.float64), uniforms
    )
    full = torch.softmax(logits[0].double() / temperature, dim=-1)
    order = full.argsort(descending=True)
    before = full[order].cumsum(0) - full[order]  # the nucleus by sorting, as k2.model.generate does
    keep = torch.zeros_like(full, dtype=torch.bool)
    keep[order[before < top_p]] = True
    expected = torch.where(keep, full, 0.0)
    expected = expected / expected.sum()
    counts = torch.bincount(tokens, minlength=12).double() / n
    assert torch.all(counts[~keep] == 0)
    sigma = (expected * (1 - expected) / n).sqrt()
    assert torch.all((counts - expected).abs() <= 5 * sigma + 1e-12), (counts, expected)
    # log-probabilities are the tempered ones, without truncation
    torch.testing.assert_close(logprobs, full.log()[tokens].float(), atol=1e-5, rtol=0)


def test_sampler_greedy_rows_and_the_nucleus_mask():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.9]])
    one = torch.rand(1, UNIFORMS_PER_TOKEN, dtype=torch.float64)
    token, logprob = sample_tokens(logits, torch.zeros(1), torch.ones(1, dtype=torch.float64), one)
    assert int(token) == 1
    torch.testing.assert_close(logprob, torch.log_softmax(logits, -1)[0, 1:2], atol=1e-6, rtol=0)
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    # 0.4 + 0.3 reaches 0.65; 0.4 alone reaches 0.4; all four equal tokens are ties, all kept
    assert nucleus_mask(probs[:1], torch.tensor([0.65], dtype=torch.float64)).tolist() == [[0, 1, 0, 1]]
    assert nucleus_mask(probs[:1], torch.tensor([0.4], dtype=torch.float64)).tolist() == [[0, 1, 0, 0]]
    assert nucleus_mask(probs[1:], torch.tensor([0.3], dtype=torch.float64)).tolist() == [[1, 1, 1, 1]]


def test_sampler_edges_and_mixed_rows():
    # uniforms at the top of the range (the largest below 1, and 1 itself, where the search runs
    # past the end), with impossible tokens after the last possible one, give that last
    # possible token, never one of probability zero
    logits = torch.tensor([[0.3, 1.0, 0.2, float("-inf"), float("-inf")]] * 2)
    top = torch.ones(2, dtype=torch.float64)
    uniforms = torch.full((2, UNIFORMS_PER_TOKEN), 1.0 - 2.0**-53, dtype=torch.float64)
    uniforms[1] = 1.0
    tokens, _ = sample_tokens(logits, torch.ones(2), top, uniforms)
    assert tokens.tolist() == [2, 2]
    uniforms[:, 0] = 0.0
    assert sample_tokens(logits, torch.ones(2), top, uniforms)[0].tolist() == [0, 0]
    # a batch of greedy, plain and nucleus rows gives each row what it gives alone
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=gen) * 3
    temperature = torch.tensor([0.0, 1.0, 0.7, 0.0, 1.3, 1.0])
    top_p = torch.tensor([1.0, 1.0, 0.8, 0.5, 0.3, 0.95], dtype=torch.float64)
    uniforms = torch.rand(6, UNIFORMS_PER_TOKEN, generator=gen, dtype=torch.float64)
    together = sample_tokens(logits, temperature, top_p, uniforms)
    for row in range(6):
        alone = sample_tokens(logits[row:row + 1], temperature[row:row + 1], top_p[row:row + 1],
                              uniforms[row:row + 1])
        assert int(alone[0]) == int(together[0][row])
        assert float(alone[1]) == float(together[1][row])
    assert together[0][0] == logits[0].argmax() and together[0][3] == logits[3].argmax()


def test_long_sequences_grow_and_compact_the_cache(policy):
    # Budgets past the initial capacity (longest prompt + 64) make the cache grow; a greedy long
    # request must still decode exactly what k2.model.generate does on its own fixed cache.
    prompt = [3, 1, 4, 1, 5]
    expected = generate(policy, [prompt], max_new_tokens=110, temperature=0.0, stop_tokens=[])[0]
    requests = [
        Request([9, 9], 3, temperature=1.0),
        Request(prompt, 110, temperature=0.0),
        Request(list(range(100, 120)), 70, temperature=1.0, seed=3),
        Request([7], 40, temperature=0.9, top_p=0.9, seed=4),
    ]
    engine = RolloutEngine(policy, max_batch=2)
    out = engine.generate(requests)
    assert out[1].token_ids == expected and out[1].finish_reason == "length"
    for request, completion in zip(requests[2:], out[2:]):
        assert completion.token_ids == RolloutEngine(policy, max_batch=1).generate([request])[0].token_ids
        assert len(completion.token_ids) == request.max_new_tokens


@pytest.mark.gpu
def test_the_engine_on_cuda_matches_the_cpu_and_a_full_forward(policy):
    import copy

    requests = mixed_requests(8, seed=5)
    cuda_policy = copy.deepcopy(policy).cuda()
    on_cuda = RolloutEngine(cuda_policy, max_batch=3).generate(requests, seed=1)
    for index, (request, completion) in enumerate(zip(requests, on_cuda)):
        alone = RolloutEngine(cuda_policy, max_batch=1).generate(
            [dataclasses.replace(request, seed=request_seed(1, index))]
        )[0]
        assert alone.token_ids == completion.token_ids
        with torch.no_grad():
            reference = sequence_logprobs(cuda_policy, request.prompt_ids, completion.token_ids, request.temperature)
        torch.testing.assert_close(torch.tensor(completion.logprobs), reference.cpu(), atol=1e-4, rtol=0)


def test_numpy_numbers_are_accepted(policy):
    import numpy as np

    plain = Request([5, 6, 7], 6, temperature=0.8, stop_ids=(255,), seed=2)
    numpy_request = Request(
        list(np.array([5, 6, 7])), np.int64(6), temperature=np.float64(0.8), stop_ids=(np.int64(255),), seed=np.int64(2)
    )
    expected, got = RolloutEngine(policy).generate([plain, numpy_request])
    assert all(type(t) is int for t in got.prompt_ids + got.token_ids)
    assert got.token_ids == expected.token_ids and got.finish_reason == expected.finish_reason


@pytest.mark.parametrize("trial", range(3))
def test_random_workloads_match_one_at_a_time_generation(policy, trial):
    # Random prompt lengths (1..40), budgets (1..40), sampling settings, stop sets and slot
    # counts exercise admission, right shifts, compaction, growth and row removal together.
    g = torch.Generator().manual_seed(100 + trial)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=g))

    requests = []
    for _ in range(draw(5, 14)):
        prompt = torch.randint(0, 256, (draw(1, 40),), generator=g).tolist()
        temperature = [0.0, 0.7, 1.0, 1.5][draw(0, 3)]
        top_p = [1.0, 0.95, 0.6][draw(0, 2)]
        stops = tuple(torch.randint(0, 256, (draw(0, 6),), generator=g).tolist())
        requests.append(Request(prompt, draw(1, 40), temperature, top_p, stops, seed=draw(0, 10**6)))
    engine = RolloutEngine(policy, max_batch=draw(1, 5))
    together = engine.generate(requests)
    assert engine.last_stats.tokens == sum(len(c.token_ids) for c in together)
    for request, completion in zip(requests, together):
        alone = RolloutEngine(policy, max_batch=1).generate([request])[0]
        assert alone.token_ids == completion.token_ids
        assert alone.finish_reason == completion.finish_reason
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(completion.logprobs), atol=1e-5, rtol=0)


def test_paused_rollouts_resume_on_the_same_random_stream(policy):
    requests = mixed_requests(7, seed=9)
    whole = RolloutEngine(policy, max_batch=3).generate(requests, seed=4)
    engine = RolloutEngine(policy, max_batch=3, weight_version=0)
    pending = list(requests)
    results = engine.generate(pending, seed=4, max_steps=2)
    rounds = 1
    while any(c.finish_reason is None for c in results):
        engine.weight_version += 1  # as if the trainer had published new weights in between
        paused = [i for i, c in enumerate(results) if c.finish_reason is None]
        resumed = engine.generate(
            [dataclasses.replace(requests[i], prefix=results[i]) for i in paused], max_steps=2
        )
        for i, completion in zip(paused, resumed):
            results[i] = completion
        rounds += 1
    assert rounds > 2  # the calls really were cut short
    for request, done, paused_run in zip(requests, whole, results):
        # Same weights throughout, so pausing changes nothing but the version tags.
        assert paused_run.token_ids == done.token_ids and paused_run.finish_reason == done.finish_reason
        assert paused_run.seed == done.seed
        torch.testing.assert_close(torch.tensor(paused_run.logprobs), torch.tensor(done.logprobs), atol=1e-5, rtol=0)
        assert paused_run.versions == sorted(paused_run.versions)
    assert max(v for c in results for v in c.versions) > 0
    # max_steps=0 returns everything paused and untouched
    untouched = engine.generate(requests[:2], max_steps=0)
    assert all(c.finish_reason is None and c.token_ids == [] for c in untouched)


def test_bad_prefixes_are_named(policy):
    request = Request([1, 2, 3], 4, seed=1)
    done = RolloutEngine(policy).generate([request])[0]
    paused = RolloutEngine(policy).generate([request], max_steps=1)[0]
    assert paused.finish_reason is None and len(paused.token_ids) == 2
    cases = [
        (dataclasses.replace(request, prefix=done), "is finished"),
        (dataclasses.replace(request, prompt_ids=[1, 2], prefix=paused), "another prompt"),
        (dataclasses.replace(request, max_new_tokens=2, prefix=paused), "not fewer than max_new_tokens"),
        (dataclasses.replace(request, stop_ids=(paused.token_ids[0],), prefix=paused), "stop token"),
        (dataclasses.replace(request, prefix="tokens"), "paused Completion"),
    ]
    for bad, message in cases:
        with pytest.raises(RLError, match=rf"request 0: prefix .*{message}"):
            RolloutEngine(policy).generate([bad])
    with pytest.raises(RLError, match="max_steps"):
        RolloutEngine(policy).generate([request], max_steps=-1)
