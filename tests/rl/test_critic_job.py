"""``k2 rl`` with critic-rewarded prompts: the critic's rewards are the capped aggregate of its
own judgements and enter the step's loss; the closed-loop pairs come only from verifiable train
prompts with different verifier scores; the critic's state survives a checkpoint and the run goes
on exactly; the command runs end to end (docs/critic.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_helpers import small_config
from rl_helpers import LengthTask

from k2 import checkpoint
from k2.cli import main
from k2.data import load_tokenizer
from k2.data.chat import render_chat
from k2.data.tokenizer import save_tokenizer, train_tokenizer
from k2.model import K2ForCausalLM
from k2.parallel.setup import Dist
from k2.rl.config import RLConfig
from k2.rl.critic.aggregate import pair_schedule, win_rates
from k2.rl.critic.bootstrap import critic_conversations, synthesize_pairs
from k2.rl.critic.checks import cap_rewards, opening_praise, violations
from k2.rl.critic.closed_loop import preference_pairs
from k2.rl.critic.critic import Comparison
from k2.rl.critic.job import CriticRLJob
from k2.rl.tasks import get_task
from k2.rl.tasks.base import split_of
from k2.train.metrics import read_metrics

VOCAB = 600
BUDGET = 8




@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    task = get_task("arithmetic")
    texts = [render_chat([*m, {"role": "assistant", "content": g}]) for m, g in task.warm_start_examples(100)]
    texts += [render_chat(r["messages"]) for r in critic_conversations(synthesize_pairs(40, seed=9))]
    save_tokenizer(train_tokenizer(texts, VOCAB), out)
    return out


def tiny_model(seed: int = 1) -> K2ForCausalLM:
    torch.manual_seed(seed)
    return K2ForCausalLM(small_config(vocab_size=VOCAB, max_position_embeddings=1024))


def make_job(tokenizer_dir: Path, model=None, **overrides) -> CriticRLJob:  # noqa: ANN001
    settings = dict(init="unused", preset="custom", prompts_per_step=2, samples_per_prompt=3,
                    token_budget=BUDGET, device="cpu", steps=4, seed=3, critic_share=0.5,
                    critic_eval_prompts=2, critic_eval_every=0, critic_batch=6)
    config = RLConfig(**{**settings, **overrides})
    return CriticRLJob(config, Dist(0, 1, torch.device("cpu")), model or tiny_model(),
                       load_tokenizer(tokenizer_dir), LengthTask(), log=lambda _: None)


def test_critic_rewards_are_the_capped_aggregate_of_its_judgements(tokenizer_dir: Path) -> None:
    job = make_job(tokenizer_dir, critic_update_every=0)
    fields = job.train_step(0, log=True)
    r = job.last
    assert r is not None and len(r.texts) == 6
    assert [p.id.split("/")[0] for p in r.prompts] == ["arithmetic"] * 3 + ["bait"] * 3
    penalty = job.config.truncation_penalty
    cut = [c.finish_reason == "length" for c in r.completions]
    for i in range(3):  # verifiable: the verifier's score
        assert r.rewards[i] == pytest.approx(min(1.0, len(r.texts[i]) / 40) - (penalty if cut[i] else 0.0))
    texts = r.texts[3:]
    pairs = pair_schedule(3, "all")
    judged = job.critic.judge([Comparison(r.prompts[3].messages, job.judge_rubrics, texts[i], texts[j])
                               for i, j in pairs])
    expected = cap_rewards(win_rates(3, pairs, [j.p_first for j in judged]),
                           [violations(t, job.judge_rubrics) for t in texts], 0.0)
    for i in range(3):
        assert r.rewards[3 + i] == pytest.approx(expected[i] - (penalty if cut[3 + i] else 0.0), abs=1e-6)
    assert fields["critic_reward"] == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert fields["position_bias_rate"] == pytest.approx(sum(j.biased for j in judged) / 3)
    assert fields["opening_praise_rate"] == sum(opening_praise(t) for t in texts) / 3
    assert fields["critic_judgements"] == 3 and fields["critic_updates"] == 0
    assert set(fields["reward_by_task"]) == {"arithmetic", "critic:bait"}
    assert fields["reward"] == pytest.approx(sum(r.rewards) / 6)


def test_closed_loop_pairs_are_verifiable_train_pairs_with_different_scores(tokenizer_dir: Path) -> None:
    job = make_job(tokenizer_dir, prompts_per_step=3, critic_share=0.34, critic_pairs_per_prompt=0)
    critic_before = {k: v.clone() for k, v in job.critic.model.state_dict().items()}
    samples: dict[str, list[str]] = {}
    for step in range(2):
        fields = job.train_step(step, log=True)
        r = job.last
        for p, t in zip(r.prompts[:6], r.texts[:6]):
            samples.setdefault(p.id, []).append(t)
        assert fields["critic_new_pairs"] > 0
    pairs = job.learner.buffer.pairs
    assert pairs and job.learner.updates == 2
    for p in pairs:
        assert p.prompt_id.startswith("arithmetic/") and p.prompt_id not in job.held_out_ids
        expression = p.messages[1]["content"].removeprefix("What is ").removesuffix("?")
        assert split_of("arithmetic", expression, 0.1) == "train"
        assert p.winner_score > p.loser_score
        assert p.winner_score == min(1.0, len(p.winner) / 40) and p.loser_score == min(1.0, len(p.loser) / 40)
        assert p.winner in samples[p.prompt_id] and p.loser in samples[p.prompt_id]
    # the critic (a copy of the policy) was updated by its own optimizer
    changed = [k for k, v in job.critic.model.state_dict().items() if not torch.equal(v, critic_before[k])]
    assert changed and job.critic.model is not job.model
    # held-out prompts never give pairs, whatever their scores
    test = LengthTask().prompts("test", 2, seed=0)
    assert preference_pairs(LengthTask(), [p for p in test for _ in range(2)], ["a", "bb"] * 2, [0.0, 1.0] * 2, 2) == []
    train = LengthTask().prompts("train", 1, seed=0)
    assert preference_pairs(LengthTask(), train * 2, ["a", "bb"], [0.0, 1.0], 2, held_out_ids={train[0].id}) == []
    assert len(preference_pairs(LengthTask(), train * 3, ["a", "bb", "c"], [0.0, 1.0, 0.0], 3)) == 2


@pytest.mark.slow  # three RL steps of two jobs
def test_the_critic_state_round_trips_and_the_run_goes_on_exactly(tokenizer_dir: Path, tmp_path: Path) -> None:
    a = make_job(tokenizer_dir, critic_eval_every=1, critic_bootstrap_steps=1, critic_bootstrap_pairs=8)
    a.train_step(0, log=True)
    a.train_step(1, log=True)
    checkpoint.save(tmp_path / "ckpt", a.model, a.optimizer, {"step": 2, **a.state_dict()})
    b = make_job(tokenizer_dir, model=tiny_model(seed=5), critic_eval_every=1, critic_bootstrap_steps=1,
                 critic_bootstrap_pairs=8)
    result = checkpoint.load(tmp_path / "ckpt", b.model, b.optimizer)
    b.load_state_dict(result.train_state)
    assert b.learner.buffer.pairs == a.learner.buffer.pairs and b.learner.updates == a.learner.updates == 2
    assert b.bootstrapped
    for (name, x), y in zip(a.critic.model.state_dict().items(), b.critic.model.state_dict().values()):
        assert torch.equal(x, y), name
    fa, fb = a.train_step(2, log=True), b.train_step(2, log=True)
    for key in ("loss", "reward", "critic_reward", "critic_loss", "critic_agreement", "position_bias_rate"):
        assert fa[key] == fb[key], key
    for (name, x), y in zip(a.critic.model.state_dict().items(), b.critic.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_the_policy_itself_as_critic_on_the_task_prompts(tokenizer_dir: Path) -> None:
    job = make_job(tokenizer_dir, critic_source="policy", critic_prompts="task")
    assert job.critic.model is job.model
    fields = job.train_step(0, log=True)
    r = job.last
    assert all(p.id.startswith("arithmetic/") for p in r.prompts)
    assert [v.reason.startswith("critic") for v in r.verdicts] == [False] * 3 + [True] * 3
    assert "critic_prompt_accuracy" in fields and set(fields["reward_by_task"]) == {"arithmetic", "critic:arithmetic"}
    state = job.state_dict()["critic"]
    assert "model" not in state and state["updates"] == 1 and state["optimizer"]["state"]


# ---------------------------------------------------------------------------- the command
FLAGS = ["--prompts-per-step", "2", "--samples-per-prompt", "3", "--token-budget", str(BUDGET),
         "--eval-prompts", "2", "--log-every", "1", "--eval-every", "2", "--save-every", "2",
         "--no-progress", "--device", "cpu", "--critic-share", "0.5", "--critic-eval-prompts", "2",
         "--critic-batch", "6"]


@pytest.fixture(scope="module")
def init_run(tokenizer_dir: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("init") / "pre"
    checkpoint.save(run / "checkpoints", tiny_model(), None, {"step": 3}, tokenizer_dir=tokenizer_dir)
    (run / "config.json").write_text(json.dumps({"preset": "custom", "data_dir": str(tokenizer_dir)}))
    return run


@pytest.mark.slow  # a two-step k2 rl run with its evaluations
def test_k2_rl_with_a_critic_share_runs_and_logs_the_critic(init_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "rl"
    assert main(["rl", *FLAGS, "--init", str(init_run), "--run-dir", str(run), "--steps", "2",
                 "--critic-aggregation", "bradley_terry", "--critic-pairs", "ring", "--critic-bootstrap-steps", "2",
                 "--critic-bootstrap-pairs", "8"]) == 0
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    for r in train:
        for key in ("critic_reward", "position_bias_rate", "opening_praise_rate", "critic_response_len",
                    "critic_agreement_pairs", "critic_judgements_per_s", "critic_updates", "critic_buffer"):
            assert key in r, key
        assert r["critic_judgements"] == 3  # ring of 3 samples, one critic prompt
    assert "critic_agreement_pairs" in evals[0]
    state = checkpoint.load(run / "checkpoints", tiny_model()).train_state
    assert state["critic"]["bootstrapped"] and "model" in state["critic"]
    assert state["critic"]["updates"] == train[-1]["critic_updates"]
    assert len(state["critic"]["buffer"]["pairs"]) == train[-1]["critic_buffer"]
    config = json.loads((run / "config.json").read_text())
    assert config["critic_share"] == 0.5 and config["critic_aggregation"] == "bradley_terry"


@pytest.mark.parametrize("args, message", [
    (("--critic-share", "2"), "critic_share must lie in"),
    (("--critic-source", "checkpoint"), "needs --critic-init"),
    (("--critic-aggregation", "elo"), "unknown critic_aggregation 'elo'"),
    (("--critic-prompts", "poems"), "unknown critic_prompts 'poems'"),
    (("--critic-share", "0.1"), "rounds to no critic-rewarded prompt"),
])
def test_bad_critic_options_are_clear_errors(init_run: Path, tmp_path: Path, capsys, args, message) -> None:  # noqa: ANN001
    assert main(["rl", *FLAGS, "--init", str(init_run), "--run-dir", str(tmp_path / "x"), *args]) == 1
    assert message in capsys.readouterr().err
