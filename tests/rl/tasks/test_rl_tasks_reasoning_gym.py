"""reasoning-gym datasets as tasks: gold answers score 1 under the package's own verifiers,
wrong ones less, the split holds, and hostile text never raises."""

from __future__ import annotations

import pytest
from rl_task_helpers import HOSTILE, random_texts

from k2.errors import MissingDependencyError, RLTaskError
from k2.rl.tasks import get_task

reasoning_gym = pytest.importorskip("reasoning_gym")

DATASETS = ["basic_arithmetic", "chain_sum", "leg_counting"]


@pytest.mark.parametrize("name", DATASETS)
def test_gold_scores_1_and_wrong_less(name: str) -> None:
    task = get_task(f"rg:{name}")
    assert task.kind == "reasoning"
    data = reasoning_gym.create_dataset(name, seed=123, size=5)
    for p in task.prompts("train", 6, seed=0) + task.prompts("test", 3, seed=0):
        entry = p.hidden["entry"]
        assert p.messages[-1] == {"role": "user", "content": entry["question"]}
        gold = task.verify(p, f"Let me think.\n<answer>{entry['answer']}</answer>")
        assert (gold.score, gold.correct) == (1.0, True)
        # the package's own scorer agrees on the gold answer
        assert data.score_answer(entry["answer"], entry) == 1.0
        wrong = str(int(entry["answer"]) + 1) if entry["answer"].lstrip("-").isdigit() else entry["answer"] + "7"
        assert task.verify(p, f"<answer>{wrong}</answer>").score < 1.0
        assert task.verify(p, entry["answer"]).score == 0.0  # no tags
        assert task.verify(p, task.gold_response(p)).correct


def test_last_answer_tags_count() -> None:
    task = get_task("rg:chain_sum")
    p = task.prompts("train", 1)[0]
    answer = p.hidden["entry"]["answer"]
    assert task.verify(p, f"<answer>0</answer> no wait <answer>{answer}</answer>").correct
    assert not task.verify(p, f"<answer>{answer}</answer> no wait <answer>{int(answer) + 1}</answer>").correct


def test_split_holds_and_prompts_are_deterministic() -> None:
    task = get_task("rg:chain_sum", test_fraction=0.3)
    train = {p.hidden["entry"]["question"] for s in range(2) for p in task.prompts("train", 150, seed=s)}
    test = {p.hidden["entry"]["question"] for s in range(2) for p in task.prompts("test", 60, seed=s)}
    assert len(train) > 250 and len(test) > 100 and not train & test
    assert [p.id for p in task.prompts("test", 5, seed=3)] == [p.id for p in task.prompts("test", 5, seed=3)]


def test_dataset_without_gold_answers_says_so() -> None:
    task = get_task("rg:graph_color")  # any valid colouring scores 1: entries carry no answer
    p = task.prompts("train", 1)[0]
    assert p.hidden["entry"]["answer"] is None
    with pytest.raises(RLTaskError, match="no gold answer"):
        task.warm_start_examples(2)
    assert task.verify(p, "<answer>None</answer>").score < 1.0


def test_dataset_options_and_errors() -> None:
    task = get_task("rg:chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    for p in task.prompts("train", 10):
        assert p.hidden["entry"]["question"].count("+") + p.hidden["entry"]["question"].count("-") == 1
    with pytest.raises(RLTaskError, match="no dataset 'nope'; it has: .*chain_sum"):
        get_task("rg:nope")
    with pytest.raises(RLTaskError, match="'seed' is set by k2"):
        get_task("rg:chain_sum", seed=3)
    with pytest.raises(RLTaskError, match="bad dataset options"):
        get_task("rg:chain_sum", min_terms=5, max_terms=2)
    with pytest.raises(RLTaskError, match="bad dataset options"):
        get_task("rg:chain_sum", no_such_option=1)


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"reasoning_gym.*k2-train\[rl\]"):
        get_task("rg:chain_sum")


def test_verify_never_raises() -> None:
    for name in DATASETS:
        task = get_task(f"rg:{name}")
        p = task.prompts("train", 1)[0]
        for text in HOSTILE + random_texts(2, 100):
            reward = task.verify(p, text)
            assert 0.0 <= reward.score <= 1.0
