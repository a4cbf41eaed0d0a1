"""bench/rl_trl.py: TRL's reward is k2 rl's shaped reward, TRL sees k2 rl's prompt ids, and
(slow) both sides of the benchmark run one step each (docs/rl.md, "Speed")."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from k2.rl.job import IM_END, render_prompt
from k2.rl.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import rl_trl  # noqa: E402


@pytest.fixture(scope="module")
def task_tokenizer(tmp_path_factory):  # noqa: ANN201
    task = get_task("arithmetic", level=1)
    directory = tmp_path_factory.mktemp("tok")
    return task, rl_trl.train_task_tokenizer(task, 512, directory), directory


def test_the_trl_reward_is_the_verifier_score_less_the_truncation_penalty(task_tokenizer) -> None:  # noqa: ANN001
    task, tokenizer, _ = task_tokenizer
    prompts = task.prompts("train", 4, seed=1)
    trace = rl_trl.Trace("trl")
    reward = rl_trl.make_reward(task, tokenizer, prompts, penalty=0.5, trace=trace)
    gold = [task.gold_response(p) for p in prompts]
    wrong = f"Answer: {10**6 + 7}"  # an integer no level-1 expression reaches: format credit only

    def ids(text: str, end: bool) -> list[int]:
        return tokenizer.encode(text + (IM_END if end else ""), add_special_tokens=False).ids

    completions = [ids(gold[0], True), ids(gold[1], False), ids(wrong, True), ids("no answer here", False)]
    got = reward(completion_ids=completions, index=[0, 1, 2, 3], prompts=None, completions=None)
    # hand-computed: right and ended 1.0; right but cut at the budget 1.0 - 0.5; a wrong integer 0.1
    # (the format credit); no answer line and cut 0.0 - 0.5.
    assert got == pytest.approx([1.0, 0.5, 0.1, -0.5])
    assert trace.reward == [pytest.approx(sum(got) / 4)]
    assert trace.accuracy == [0.5] and trace.truncation == [0.5] and trace.score == [pytest.approx(2.1 / 4)]


def test_trl_tokenizes_the_prompts_to_k2_rl_ids_and_stops_at_im_end(task_tokenizer) -> None:  # noqa: ANN001
    pytest.importorskip("transformers")
    from k2.data.chat import render_chat

    task, tokenizer, directory = task_tokenizer
    hf = rl_trl.hf_tokenizer(directory)
    assert hf.eos_token_id == tokenizer.token_to_id(IM_END)
    for prompt in task.prompts("train", 8, seed=2):
        text = render_chat(prompt.messages, prompt.tools, add_generation_prompt=True)
        assert hf(text)["input_ids"] == render_prompt(tokenizer, prompt)


@pytest.mark.slow
def test_both_sides_run_one_step(capsys) -> None:  # noqa: ANN001
    pytest.importorskip("trl")
    result = rl_trl.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith('{"bench": "rl_trl"')
    assert result["prompts"] == 2 and result["samples"] == 2 and result["budget"] == 8
    for side in ("k2", "trl"):
        s = result[side]
        assert s["steps"] == 1 and s["threads"] == 1 and s["s_per_step"] > 0, s
        assert -0.5 <= s["tail_reward"] <= 1.0 and 0 < s["tail_response_len"] <= 8, s
    assert result["speedup_vs_trl"] > 0


def test_k2_side_with_trl_optimizer_and_the_curves(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    pytest.importorskip("transformers")
    pytest.importorskip("trl")
    plot = tmp_path / "curves.png"
    result = rl_trl.main(["--quick", "--threads", "1", "--only", "k2", "--optimizer", "adamw", "--plot", str(plot)])
    assert result["optimizer"] == "adamw" and result["k2"]["steps"] == 1 and "trl" not in result
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
