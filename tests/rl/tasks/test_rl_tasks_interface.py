"""Every kind of task honours the interface the same way: OpenAI-format prompts (checked with the
openai package's own message and tool types), deterministic and picklable prompts, disjoint
splits, the documented budgets, and warm-start pairs whose gold responses score 1."""

from __future__ import annotations

import pickle

import pytest

from k2.rl.tasks import DEFAULT_TOKEN_BUDGETS, Prompt, Reward, Task, get_task

openai_chat = pytest.importorskip("openai.types.chat")
pydantic = pytest.importorskip("pydantic")

MESSAGES = pydantic.TypeAdapter(list[openai_chat.ChatCompletionMessageParam])
TOOLS = pydantic.TypeAdapter(list[openai_chat.ChatCompletionToolParam])

NAMES = ["arithmetic", "countdown", "rg:basic_arithmetic", "code:humaneval", "agentic:device"]


@pytest.fixture(scope="module", params=NAMES)
def task(request) -> Task:
    if request.param.startswith("rg:"):
        pytest.importorskip("reasoning_gym")
    return get_task(request.param)


def test_prompts_are_openai_chat(task: Task) -> None:
    for split in ("train", "test"):
        prompts = task.prompts(split, 4, seed=11)
        assert len(prompts) == 4 and all(isinstance(p, Prompt) for p in prompts)
        for p in prompts:
            MESSAGES.validate_python(p.messages, strict=True)
            assert p.messages[0]["role"] == "system" and p.messages[-1]["role"] in ("user", "tool")
            if task.multi_turn:
                TOOLS.validate_python(p.tools, strict=True)
                assert p.tools
            else:
                assert p.tools is None


def test_prompts_are_deterministic_picklable_and_split(task: Task) -> None:
    a, b = task.prompts("train", 6, seed=3), task.prompts("train", 6, seed=3)
    assert a == b and pickle.loads(pickle.dumps(a)) == a
    strip = (lambda i: i.split("@")[0]) if task.multi_turn else (lambda i: i)  # noqa: E731
    train = {strip(p.id) for s in range(3) for p in task.prompts("train", 20, seed=s)}
    test = {strip(p.id) for s in range(3) for p in task.prompts("test", 5, seed=s)}
    assert train and test and not train & test


def test_budget_and_kind(task: Task) -> None:
    assert task.token_budget == DEFAULT_TOKEN_BUDGETS[task.kind]
    assert task.kind in DEFAULT_TOKEN_BUDGETS


def test_warm_start_gold_scores_1(task: Task) -> None:
    if task.multi_turn:  # pairs are per turn: the whole gold transcript is what scores
        prompts = task.prompts("train", 2, seed=1)
        rewards = task.verify_many(prompts, [task.gold_response(p) for p in prompts])
    else:
        examples = task.warm_start_examples(4, seed=1)
        prompts = task.prompts("train", 4, seed=1)
        assert [m for m, _ in examples] == [p.messages for p in prompts]
        rewards = task.verify_many(prompts, [gold for _, gold in examples])
    assert all(isinstance(r, Reward) and r.correct and r.score == 1.0 for r in rewards), rewards
    with pytest.raises(ValueError, match="prompts but"):
        task.verify_many(prompts, [])
