"""Agentic domains as multi-turn tasks: the scripted gold agent earns the grader's reward 1 on
every example task of every domain, through both the policy interface and transcript replay;
a do-nothing policy earns less; the split is by task id."""

from __future__ import annotations

import pytest
from rl_task_helpers import HOSTILE, random_texts

from k2.agentic import domains, example_tasks, find_task, make_env
from k2.agentic.scripted import GoldAgent
from k2.errors import RLTaskError
from k2.rl.tasks import get_task
from k2.rl.tasks.agentic import AgenticTask, split_turns


def gold_policy(task: AgenticTask, prompt):
    agent = GoldAgent(task.tasks[prompt.hidden["task_id"]])
    return lambda messages, tools: agent.act()


def all_prompts(task: AgenticTask, seed: int = 0):
    return task.prompts("train", len(task.splits["train"]), seed) + task.prompts("test", len(task.splits["test"]), seed)


@pytest.mark.parametrize("domain", domains())
def test_gold_agent_scores_1_and_doing_nothing_less(domain: str) -> None:
    task = get_task(f"agentic:{domain}")
    assert task.multi_turn and task.kind == "agentic"
    prompts = all_prompts(task)
    assert sorted(p.hidden["task_id"] for p in prompts) == sorted(t.id for t in example_tasks(domain))
    for p in prompts:
        episode = task.episode(p, gold_policy(task, p))
        assert (episode.reward.score, episode.reward.correct) == (1.0, True), episode.reward
        assert episode.grade is not None and episode.grade.reward == 1.0
        assert episode.termination == "user_stop"
        # the transcript of the same turns replays to the same reward
        assert task.verify(p, "".join(episode.turns)).correct
        assert task.verify(p, task.gold_response(p)).correct
        idle = task.episode(p, lambda messages, tools: "I am not able to help with that.")
        assert idle.reward.score < 1.0 and not idle.reward.correct
        assert idle.reward.score == 0.0


def test_prompt_is_the_environments_first_observation() -> None:
    task = get_task("agentic:bank")
    (p,) = task.prompts("test", 1, seed=5)
    original = find_task(example_tasks("bank"), p.hidden["task_id"])
    obs = make_env("bank", original, seed=p.hidden["env_seed"]).reset()
    assert p.messages == obs.messages and p.messages[0]["role"] == "system" and p.messages[-1]["role"] == "user"
    assert p.id == f"{p.hidden['task_id']}@{p.hidden['env_seed']}"
    env = task.make_env(p)
    assert env.reset().messages == p.messages  # the RL loop can step this itself
    assert p.tools == env.tools and {t["function"]["name"] for t in p.tools} >= {"transfer"}


def test_policy_sees_the_trajectory_so_far() -> None:
    task = get_task("agentic:shop")
    p = task.prompts("train", 1)[0]
    seen = []
    agent = GoldAgent(task.tasks[p.hidden["task_id"]])

    def policy(messages, tools):
        seen.append(messages)
        assert tools == p.tools
        return agent.act()

    episode = task.episode(p, policy)
    assert seen[0] == p.messages
    assert all(len(a) < len(b) for a, b in zip(seen, seen[1:]))
    assert episode.messages[: len(seen[-1])] == seen[-1]


def test_limits_and_unfinished_transcripts_score_0() -> None:
    task = get_task("agentic:notes", max_turns=2)
    p = task.prompts("train", 1)[0]
    chatty = task.episode(p, lambda messages, tools: "Could you tell me more?")
    assert chatty.termination == "max_turns" and chatty.reward.score == 0.0
    gold = task.gold_response(p)
    first = split_turns(gold)[0]
    unfinished = get_task("agentic:notes").verify(p, first)
    assert unfinished.score == 0.0 and "did not end" in unfinished.reason
    assert get_task("agentic:notes").verify(p, gold + "extra turn<|im_end|>").correct  # ignored after the end


def test_split_turns() -> None:
    assert split_turns("a<|im_end|>b<|im_end|>") == ["a<|im_end|>", "b<|im_end|>"]
    assert split_turns("a<|im_end|>b") == ["a<|im_end|>", "b"]
    assert split_turns("a<|im_end|>  ") == ["a<|im_end|>"]
    assert split_turns("") == []


def test_split_by_task_id() -> None:
    for domain in domains():
        task = get_task(f"agentic:{domain}")
        train, test = set(task.splits["train"]), set(task.splits["test"])
        assert train and test and not train & test and train | test == set(task.tasks)
        assert {p.hidden["task_id"] for p in task.prompts("test", 10, seed=2)} <= test
        assert {p.hidden["task_id"] for p in task.prompts("train", 10, seed=2)} <= train


def test_warm_start_examples_are_gold_turns_of_train_tasks() -> None:
    task = get_task("agentic:calendar")
    examples = task.warm_start_examples(6, seed=0)
    assert len(examples) == 6
    test_openings = {p.messages[-1]["content"] for p in task.prompts("test", 5)}
    for messages, turn in examples:
        assert messages[0]["role"] == "system" and messages[-1]["role"] in ("user", "tool")
        assert not turn.endswith("<|im_end|>")
        assert messages[1]["content"] not in test_openings
    assert any("<|tool_call_begin|>" in turn for _, turn in examples)


def test_errors() -> None:
    with pytest.raises(RLTaskError, match="no agentic domain 'zoo'"):
        AgenticTask("zoo")
    with pytest.raises(RLTaskError, match="no tasks"):
        AgenticTask("bank", tasks=[])
    task = get_task("agentic:bank")
    other = get_task("agentic:shop").prompts("train", 1)[0]
    with pytest.raises(RLTaskError, match="names no task of this domain"):
        task.verify(other, "hello")
    p = task.prompts("train", 1)[0]
    with pytest.raises(RLTaskError, match="policy returned NoneType"):
        task.episode(p, lambda messages, tools: None)


def test_tasks_from_a_file(tmp_path) -> None:
    from k2.agentic import save_tasks

    path = tmp_path / "bank.json"
    save_tasks(example_tasks("bank")[:2], path)
    task = get_task("agentic:bank", tasks=str(path))
    assert sorted(task.tasks) == sorted(t.id for t in example_tasks("bank")[:2])
    assert len(task.splits["train"]) == len(task.splits["test"]) == 1


def test_verify_never_raises() -> None:
    task = get_task("agentic:contacts")
    p = task.prompts("train", 1)[0]
    for text in HOSTILE + random_texts(4, 100):
        reward = task.verify(p, text)
        assert 0.0 <= reward.score <= 1.0 and not reward.correct
