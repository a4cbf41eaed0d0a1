"""The task interface's shared pieces: the hash split, the answer line, rewards, the registry."""

from __future__ import annotations

import hashlib

import pytest

from k2.errors import RLTaskError
from k2.rl.tasks import DEFAULT_TOKEN_BUDGETS, Reward, answer_line, get_task, split_of, task_names
from k2.rl.tasks.base import sample_pool, split_ids, split_point


def test_split_point_is_sha256_of_task_and_key() -> None:
    digest = hashlib.sha256(b"arithmetic\x001 + 2").digest()
    assert split_point("arithmetic", "1 + 2") == int.from_bytes(digest[:8], "big") / 2**64
    keys = [str(i) for i in range(4000)]
    share = sum(split_of("t", k, 0.25) == "test" for k in keys) / len(keys)
    assert 0.22 < share < 0.28


def test_split_ids_never_leaves_a_split_empty() -> None:
    for n in range(2, 8):
        ids = [f"task-{i}" for i in range(n)]
        for fraction in (0.01, 0.5, 0.99):
            s = split_ids("x", ids, fraction)
            assert s["train"] and s["test"] and not set(s["train"]) & set(s["test"])
            assert sorted(s["train"] + s["test"]) == sorted(ids)
    assert split_ids("x", ["only"], 0.01) == {"train": ["only"], "test": []}


def test_sample_pool_uses_each_before_repeating() -> None:
    got = sample_pool("t", "train", 7, 3, ["a", "b", "c"])
    assert sorted(got[:3]) == ["a", "b", "c"] and sorted(got[3:6]) == ["a", "b", "c"] and len(got) == 7
    assert got == sample_pool("t", "train", 7, 3, ["a", "b", "c"])
    with pytest.raises(RLTaskError, match="test split is empty"):
        sample_pool("t", "test", 1, 0, [])
    with pytest.raises(RLTaskError, match="split must be one of train, test"):
        sample_pool("t", "dev", 1, 0, ["a"])
    with pytest.raises(RLTaskError, match="number of prompts"):
        sample_pool("t", "train", -1, 0, ["a"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 42", "42"),
        ("work...\nanswer:   -7  \n", "-7"),
        ("**Answer:** 12.", "12"),
        ("> ANSWER: 3", "3"),
        ("Answer: 1\nAnswer: 2", "2"),  # the last one counts
        ("The answer: 5", None),  # must start the line
        ("Answer: 9<|im_end|>Answer: 1", "9"),  # nothing after the turn's end
        ("no answer here", None),
    ],
)
def test_answer_line(text: str, expected: str | None) -> None:
    assert answer_line(text) == expected


def test_reward_must_be_in_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Reward(1.5, True, "x")
    with pytest.raises(ValueError):
        Reward(float("nan"), False, "x")


def test_registry_names_and_errors() -> None:
    names = task_names()
    assert {"arithmetic", "countdown", "code:humaneval", "agentic:bank", "agentic:shop", "rg:chain_sum"} <= set(names)
    task = get_task("arithmetic", level=3, token_budget=16)
    assert (task.name, task.kind, task.token_budget) == ("arithmetic", "arithmetic", 16)
    assert get_task("countdown").token_budget == DEFAULT_TOKEN_BUDGETS["countdown"]
    with pytest.raises(RLTaskError, match=r"unknown task 'arith'.*rg:NAME.*available: arithmetic"):
        get_task("arith")
    with pytest.raises(RLTaskError, match=r"unknown task 'rg:'"):
        get_task("rg:")
    with pytest.raises(RLTaskError, match="bad option.*lvl"):
        get_task("arithmetic", lvl=2)
    with pytest.raises(RLTaskError, match="token_budget must be a positive integer"):
        get_task("countdown", token_budget=0)
    with pytest.raises(RLTaskError, match="test_fraction"):
        get_task("arithmetic", test_fraction=1.0)
    with pytest.raises(RLTaskError, match="no agentic domain 'zoo'; there are: bank"):
        get_task("agentic:zoo")
    with pytest.raises(RLTaskError, match="unknown code source 'mbpp'"):
        get_task("code:mbpp")
    with pytest.raises(RLTaskError, match="must be a string"):
        get_task(3)  # type: ignore[arg-type]
