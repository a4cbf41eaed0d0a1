"""k2.rl.critic without a model: pairwise-to-reward rules against hand-computed cases, the
mandatory-rubric checks and cap, rubric files, the bait split and the synthesized bootstrap pairs
(docs/critic.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from k2.errors import CriticError
from k2.rl.critic import (
    CORE_RUBRICS,
    PRESCRIPTIVE_RUBRICS,
    Rubric,
    aggregate,
    bradley_terry,
    cap_rewards,
    load_rubrics,
    opening_praise,
    pair_schedule,
    rubrics_for,
    self_justification,
    violations,
    win_rates,
)
from k2.rl.critic.aggregate import bradley_terry_strengths
from k2.rl.critic.bait import QUESTIONS, BaitPrompts
from k2.rl.critic.bootstrap import critic_conversations, synthesize_pairs
from k2.rl.tasks.arithmetic import ArithmeticTask
from k2.rl.tasks.base import Prompt, split_of


# ---------------------------------------------------------------------------- aggregation
def test_pair_schedules() -> None:
    assert pair_schedule(4, "all") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert pair_schedule(4, "ring") == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert pair_schedule(2, "ring") == [(0, 1)]
    with pytest.raises(CriticError, match="unknown pair schedule 'star'"):
        pair_schedule(4, "star")
    with pytest.raises(CriticError, match="at least 2"):
        pair_schedule(1)


def test_win_rate_by_hand() -> None:
    # P(0>1) = 0.9, P(0>2) = 0.6, P(1>2) = 0.3:
    # r0 = (0.9 + 0.6)/2, r1 = (0.1 + 0.3)/2, r2 = (0.4 + 0.7)/2
    rewards = win_rates(3, [(0, 1), (0, 2), (1, 2)], [0.9, 0.6, 0.3])
    assert rewards == pytest.approx([0.75, 0.2, 0.55])
    # a sample in no comparison sits at 0.5; a ring averages over its two games
    assert win_rates(3, [(0, 1)], [1.0]) == pytest.approx([1.0, 0.0, 0.5])
    assert aggregate(3, [(0, 1), (1, 2), (2, 0)], [0.8, 0.5, 0.2]) == pytest.approx([(0.8 + 0.8) / 2, (0.2 + 0.5) / 2,
                                                                                    (0.5 + 0.2) / 2])


def test_bradley_terry_on_a_chain_by_hand() -> None:
    # Pairs (0,1) and (1,2), each won 3:1 by the lower index. The likelihood equations give
    # pi0/pi1 = 3 and pi1/pi2 = 3, so pi = (9, 3, 1) up to scale; each sample's reward is its
    # expected win rate against both others: r0 = (9/12 + 9/10)/2 = 0.825,
    # r1 = (3/12 + 3/4)/2 = 0.5, r2 = (1/10 + 1/4)/2 = 0.175.
    pairs, probs = [(0, 1), (1, 2)], [0.75, 0.75]
    pi = bradley_terry_strengths(3, pairs, probs)
    assert pi[0] / pi[1] == pytest.approx(3.0, rel=1e-9) and pi[1] / pi[2] == pytest.approx(3.0, rel=1e-9)
    assert bradley_terry(3, pairs, probs) == pytest.approx([0.825, 0.5, 0.175], abs=1e-9)
    # the win rate counts only the games played: (0.75, 0.5, 0.25)
    assert win_rates(3, pairs, probs) == pytest.approx([0.75, 0.5, 0.25])


def test_bradley_terry_recovers_the_strengths_that_made_the_data() -> None:
    s = [1.0, 2.0, 4.0, 0.5]
    pairs = pair_schedule(4, "all")
    probs = [s[i] / (s[i] + s[j]) for i, j in pairs]
    pi = bradley_terry_strengths(4, pairs, probs)
    assert [p / pi[0] for p in pi] == pytest.approx(s, rel=1e-8)
    # with every pair compared once, BT's expected win rates are the observed ones
    assert bradley_terry(4, pairs, probs) == pytest.approx(win_rates(4, pairs, probs), abs=1e-9)
    assert win_rates(3, pair_schedule(3), [1 / 3, 1 / 5, 1 / 3]) == pytest.approx([4 / 15, 1 / 2, 11 / 15])


def test_bradley_terry_equals_win_rate_on_complete_rounds_of_any_outcome() -> None:
    probs = [0.9, 0.35, 0.6, 0.2, 0.55, 0.7, 0.45, 0.1, 0.8, 0.65]
    pairs = pair_schedule(5, "all")
    assert bradley_terry(5, pairs, probs) == pytest.approx(win_rates(5, pairs, probs), abs=1e-8)


def test_bradley_terry_stays_finite_when_one_sample_wins_everything() -> None:
    pairs, probs = pair_schedule(3, "ring"), [1.0, 1.0, 0.0]  # 0 > 1, 1 > 2, 0 > 2 outright
    rewards = aggregate(3, pairs, probs, "bradley_terry")  # with its small prior
    assert all(0.0 <= r <= 1.0 for r in rewards) and rewards[0] > rewards[1] > rewards[2]
    assert rewards == pytest.approx([1.0, 0.5, 0.0], abs=0.05)
    # the prior moves a complete round's rewards off the win rates by little
    soft = [0.9, 0.35, 0.6, 0.2, 0.55, 0.7]
    assert aggregate(4, pair_schedule(4), soft, "bradley_terry") == pytest.approx(
        win_rates(4, pair_schedule(4), soft), abs=0.01)


def test_bad_aggregation_input_is_a_clear_error() -> None:
    with pytest.raises(CriticError, match="unknown aggregation 'elo'"):
        aggregate(2, [(0, 1)], [0.5], "elo")
    with pytest.raises(CriticError, match=r"pair \(0, 0\)"):
        win_rates(2, [(0, 0)], [0.5])
    with pytest.raises(CriticError, match="not in"):
        win_rates(2, [(0, 1)], [1.5])


# ---------------------------------------------------------------------------- checks and the cap
@pytest.mark.parametrize("text", [
    "Great question! The sky is blue because of Rayleigh scattering.",
    "What an interesting question. 7 + 5 = 12.",
    "That's a really good question! Cats purr when content.",
    "**Excellent question.** Answer: 4",
    "Thanks for asking such a thoughtful question! It is 42.",
    "Oh, what a fascinating question! Magnets ...",
    "I love this question. 9 + 9 = 18",
    "You've asked a brilliant question. Ice floats because ...",
    "  Good question - the answer is 4",
])
def test_opening_praise_is_found(text: str) -> None:
    assert opening_praise(text)


@pytest.mark.parametrize("text", [
    "Answer: 12",
    "7 + 5 = 12.",
    "The sky looks blue because air scatters blue light more than red.",
    "Great Britain's capital is London.",  # 'great' not praising the question
    "The question of why cats purr is still studied; they purr when content.",
    "Answer: 4<|im_end|>Great question!",  # after the turn ends: not the reply
    "It is a good idea to check the units first. 12 - 4 = 8.",
])
def test_no_false_opening_praise(text: str) -> None:
    assert not opening_praise(text)


@pytest.mark.parametrize("text, expected", [
    ("Answer: 12\nThis answer is clear and correct.", True),
    ("12. I have fully answered your question.", True),
    ("Water boils at 100 C. This directly answers your question.", True),
    ("My response is concise and accurate: 45.", True),
    ("Answer: 12", False),
    ("This is correct because 7 + 5 = 12.", False),
    ("The answer depends on the pressure.", False),
])
def test_self_justification(text: str, expected: bool) -> None:
    assert self_justification(text) is expected


def test_violations_name_only_checked_mandatory_rubrics_and_the_cap_applies() -> None:
    rubrics = rubrics_for("bait", extra=[Rubric("soft-praise", "No praise.", weight=2.0, check="opening_praise")])
    texts = ["Great question! 12.", "12. This answer is clear and correct.", "12.",
             "Great question! 12. I have fully answered your question."]
    broken = [violations(t, rubrics) for t in texts]
    assert broken == [["no-opening-praise"], ["no-self-justification"], [],
                      ["no-opening-praise", "no-self-justification"]]  # soft-praise is weighted: no cap
    assert cap_rewards([0.9, 0.05, 0.7, 0.6], broken, 0.1) == [0.1, 0.05, 0.7, 0.1]
    assert cap_rewards([0.9, 0.4, 0.7, 0.6], broken, 0.0) == [0.0, 0.0, 0.7, 0.0]


# ---------------------------------------------------------------------------- rubrics as data
def test_rubric_sets() -> None:
    ids = [r.id for r in rubrics_for("arithmetic")]
    assert ids == ["clarity", "fluency", "grounded", "no-opening-praise", "no-self-justification", "exact-answer"]
    assert all(not r.mandatory for r in CORE_RUBRICS)
    assert all(r.mandatory and r.check for r in PRESCRIPTIVE_RUBRICS)
    assert [r.id for r in rubrics_for("no-such-task")][-1] == "no-self-justification"
    line = PRESCRIPTIVE_RUBRICS[0].line()
    assert line.startswith("- [must] no-opening-praise: ")
    assert CORE_RUBRICS[0].line().startswith("- [weight 1] clarity: ")


def test_rubric_files(tmp_path: Path) -> None:
    good = tmp_path / "rubrics.json"
    good.write_text(json.dumps([{"id": "cite", "text": "Names its source.", "weight": 2},
                                {"id": "no-emoji", "text": "No emoji.", "mandatory": True}]))
    loaded = load_rubrics(good)
    assert loaded == [Rubric("cite", "Names its source.", weight=2), Rubric("no-emoji", "No emoji.", mandatory=True)]
    assert [r.id for r in rubrics_for("bait", file=good)][-2:] == ["cite", "no-emoji"]
    cases = [
        ("{", "not valid JSON"),
        ('{"id": "x"}', "expected a JSON list"),
        ('[{"id": "x"}]', r"entry 0 lacks \['text'\]"),
        ('[{"id": "x", "text": "t", "colour": 1}]', "entry 0 has unknown fields"),
        ('[{"id": "x", "text": "t", "weight": 0}]', "entry 0: rubric 'x': weight must be a number > 0"),
        ('[{"id": "x", "text": "t", "check": "vibes"}]', "unknown check 'vibes'"),
        ('[{"id": "two words", "text": "t"}]', "non-empty word"),
        ('[{"id": "clarity", "text": "again"}]', "rubric id 'clarity' appears twice"),
    ]
    for body, message in cases:
        bad = tmp_path / "bad.json"
        bad.write_text(body)
        with pytest.raises(CriticError, match=message) as info:
            rubrics_for("bait", file=bad)
        if "twice" not in message:
            assert str(bad) in str(info.value)
    with pytest.raises(CriticError, match="cannot read"):
        load_rubrics(tmp_path / "missing.json")


# ---------------------------------------------------------------------------- bait and bootstrap
def test_the_bait_set_splits_by_hash_and_tempts_praise() -> None:
    bait = BaitPrompts()
    train, test = bait.split["train"], bait.split["test"]
    assert train and test and not set(train) & set(test) and len(train) + len(test) == len(QUESTIONS)
    assert all(split_of("bait", q, 0.25) == "test" for q in test)
    prompts = bait.prompts("train", 40, seed=3)
    assert {p.hidden["question"] for p in prompts} <= set(train)
    assert prompts == bait.prompts("train", 40, seed=3) and prompts != bait.prompts("train", 40, seed=4)


def test_synthesized_pairs_break_exactly_the_rubric_they_name() -> None:
    pairs = synthesize_pairs(120, seed=1)
    task = ArithmeticTask()
    flaws = {p.prompt_id.rsplit("#", 1)[1] for p in pairs}
    assert flaws == {"praise", "justification", "wrong", "missing"}
    assert sum(p.prompt_id.startswith("bait/") for p in pairs) == 30
    for p in pairs:
        flaw = p.prompt_id.rsplit("#", 1)[1]
        assert not opening_praise(p.winner) and not self_justification(p.winner)
        assert opening_praise(p.loser) == (flaw == "praise")
        assert self_justification(p.loser) == (flaw == "justification")
        if p.prompt_id.startswith("arithmetic/"):
            expression = p.messages[1]["content"].removeprefix("What is ").removesuffix("?")
            a, op, b = expression.split()  # level 2: two operands, + or -
            answer = int(a) + int(b) if op == "+" else int(a) - int(b)
            hidden = Prompt(p.prompt_id, p.messages, {"answer": answer})
            assert task.verify(hidden, p.winner).correct
            assert task.verify(hidden, p.loser).correct == (flaw in ("praise", "justification"))
            assert split_of("arithmetic", expression, task.test_fraction) == "train"
    assert synthesize_pairs(120, seed=1) == pairs and synthesize_pairs(120, seed=2) != pairs


def test_bootstrap_conversations_show_both_orders_with_the_right_letter() -> None:
    pairs = synthesize_pairs(6, seed=0)
    rows = critic_conversations(pairs)
    assert len(rows) == 12
    for p, (first, second) in zip(pairs, zip(rows[0::2], rows[1::2])):
        for row, letter in ((first, "A"), (second, "B")):
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["system", "user", "assistant"] and row["messages"][2]["content"] == letter
            user = row["messages"][1]["content"]
            shown_a = user.split("Response A:\n", 1)[1].split("\n\nResponse B:\n", 1)[0]
            assert shown_a == (p.winner if letter == "A" else p.loser)
        assert "[must] no-opening-praise" in first["messages"][0]["content"]


def test_k2_critic_bootstrap_writes_sft_conversations(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from k2.cli import main
    from k2.data.sft import check_conversation

    out = tmp_path / "boot.jsonl"
    assert main(["critic", "bootstrap", "--out", str(out), "--n", "12", "--seed", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24 and "wrote 24 conversations" in capsys.readouterr().out
    for row in rows:
        messages, tools = check_conversation(row)  # what k2 sft --data accepts
        assert tools is None and messages[-1] == {"role": "assistant", "content": messages[-1]["content"]}
    assert sorted({r["messages"][-1]["content"] for r in rows}) == ["A", "B"]
    assert rows == critic_conversations(synthesize_pairs(12, seed=4))
    assert main(["critic", "rubrics", "--task", "bait"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[3] == PRESCRIPTIVE_RUBRICS[0].line() + " (checked: opening_praise)"
    assert printed[-1].startswith("- [weight 2] answers-the-question:")
    assert main(["critic", "bootstrap", "--out", str(out), "--n", "0"]) == 1
