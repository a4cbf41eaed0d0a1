"""``k2 rl``: the step's loss is the K2 loss (or GRPO) of its own samples and rewards, written out
independently; samples carry one weight version; resume is bit-identical; bad options fail
clearly; the command runs end to end (docs/rl.md, "The RL loop")."""

from __future__ import annotations

import copy
import json
import shutil
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
from k2.errors import RLError
from k2.model import K2ForCausalLM
from k2.parallel.setup import Dist
from k2.rl.config import RLConfig
from k2.rl.job import RLJob
from k2.rl.tasks import get_task
from k2.train.metrics import read_metrics

VOCAB = 512
BUDGET = 8




@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    task = get_task("arithmetic")
    texts = [render_chat([*m, {"role": "assistant", "content": g}]) for m, g in task.warm_start_examples(200)]
    save_tokenizer(train_tokenizer(texts, 400), out)
    return out


def tiny_model(seed: int = 1) -> K2ForCausalLM:
    torch.manual_seed(seed)
    return K2ForCausalLM(small_config(vocab_size=VOCAB, max_position_embeddings=256))


@pytest.fixture(scope="module")
def init_run(tokenizer_dir: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("init") / "pre"
    checkpoint.save(run / "checkpoints", tiny_model(), None, {"step": 3}, tokenizer_dir=tokenizer_dir)
    (run / "config.json").write_text(json.dumps({"preset": "custom", "data_dir": str(tokenizer_dir)}))
    return run


def make_job(tokenizer_dir: Path, task=None, model=None, **overrides) -> RLJob:  # noqa: ANN001
    settings = dict(init="unused", preset="custom", prompts_per_step=2, samples_per_prompt=4,
                    token_budget=BUDGET, device="cpu", steps=4, seed=3)
    config = RLConfig(**{**settings, **overrides})
    return RLJob(config, Dist(0, 1, torch.device("cpu")), model or tiny_model(),
                 load_tokenizer(tokenizer_dir), task or LengthTask(), log=lambda _: None)


@torch.no_grad()
def full_forward_logprob(model: K2ForCausalLM, prompt: list[int], tokens: list[int], t: float) -> torch.Tensor:
    """Per-token log π(y_t | x, y_<t) at temperature t, from the logits of one full forward."""
    ids = torch.tensor([prompt + tokens])
    logits = model(input_ids=ids).logits[0].double() / t
    logp = logits.log_softmax(-1)
    return torch.stack([logp[len(prompt) - 1 + i, tok] for i, tok in enumerate(tokens)])


def shaped_rewards(job: RLJob, rollouts) -> list[float]:  # noqa: ANN001
    """The verifier's score of each decoded response, minus the penalty for the ones cut at the
    budget (no stop token at the end, budget reached)."""
    tokenizer, end = job.tokenizer, job.im_end
    out = []
    for prompt, c in zip(rollouts.prompts, rollouts.completions):
        truncated = len(c.token_ids) == BUDGET and c.token_ids[-1] != end
        score = job.task.verify(prompt, tokenizer.decode(c.token_ids, skip_special_tokens=False)).score
        out.append(score - (job.config.truncation_penalty if truncated else 0.0))
    return out


def test_the_step_loss_is_the_k2_loss_of_its_samples(tokenizer_dir: Path) -> None:
    job = make_job(tokenizer_dir, tau=0.7)
    before = copy.deepcopy(job.model)
    fields = job.train_step(0, log=True)
    r = job.last
    assert r is not None and len(r.completions) == 8 and r.temperature == 1.0
    assert all(c.versions == [0] * len(c.token_ids) for c in r.completions)
    rewards = shaped_rewards(job, r)
    assert rewards == pytest.approx(r.rewards, abs=1e-12)
    assert len(set(rewards)) > 1  # the loss is not trivially zero
    new = torch.tensor([float(full_forward_logprob(before, p, c.token_ids, 1.0).sum())
                        for p, c in zip(r.prompt_ids, r.completions)], dtype=torch.float64)
    old = torch.tensor([sum(c.logprobs) for c in r.completions], dtype=torch.float64)
    assert torch.allclose(new, old, atol=1e-4)  # π_θ = π_old at the first step
    rw = torch.tensor(rewards, dtype=torch.float64).view(2, 4)
    residual = rw - rw.mean(1, keepdim=True) - 0.7 * (new - old).view(2, 4)
    expected = float((residual ** 2).sum(1).div(4).mean())
    assert fields["loss"] == pytest.approx(expected, rel=1e-4)
    assert fields["reward"] == pytest.approx(sum(rewards) / 8)
    assert fields["weight_version"] == 0 and fields["phase"] == "rl"
    assert fields["truncation_rate"] == pytest.approx(sum(c.finish_reason == "length" for c in r.completions) / 8)
    expected_entropy = -sum(sum(c.logprobs) for c in r.completions) / sum(len(c.token_ids) for c in r.completions)
    assert fields["entropy"] == pytest.approx(expected_entropy)
    changed = any(not torch.equal(a, b) for a, b in zip(before.parameters(), job.model.parameters()))
    assert changed  # MuonClip stepped


def test_the_grpo_step_at_the_old_policy_is_minus_the_mean_token_advantage(tokenizer_dir: Path) -> None:
    job = make_job(tokenizer_dir, objective="grpo")
    fields = job.train_step(0, log=True)
    r = job.last
    rw = torch.tensor(r.rewards, dtype=torch.float64).view(2, 4)
    adv = ((rw - rw.mean(1, keepdim=True)) / (rw.std(1, keepdim=True) + 1e-4)).flatten()
    lengths = torch.tensor([len(c.token_ids) for c in r.completions], dtype=torch.float64)
    expected = float(-(adv * lengths).sum() / lengths.sum())  # ratio 1 at θ = θ_old: no clipping
    assert fields["loss"] == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_each_step_samples_from_seeds_of_its_own(tokenizer_dir: Path) -> None:
    a, b = make_job(tokenizer_dir), make_job(tokenizer_dir)
    first = a.rollouts(0)
    again = b.rollouts(0)
    assert [c.token_ids for c in first.completions] == [c.token_ids for c in again.completions]
    other = b.rollouts(1)
    assert [c.token_ids for c in first.completions] != [c.token_ids for c in other.completions]


def test_a_version_published_mid_step_is_refused(tokenizer_dir: Path) -> None:
    job = make_job(tokenizer_dir, rollout_batch=2)  # requests run in waves: later ones see the bump
    engine = job.engine

    class MidStepPublish:
        weight_version = 0

        def generate(self, requests, seed):  # noqa: ANN001, ANN202
            engine.weight_version = self.weight_version

            def publish(done, total):  # noqa: ANN001, ANN202
                engine.weight_version += 1  # new weights land while the batch still decodes

            return engine.generate(requests, seed=seed, progress=publish)

    job.engine = MidStepPublish()
    with pytest.raises(RLError, match="weight versions"):
        job.train_step(0, log=True)


def test_temperature_decays_linearly_then_holds() -> None:
    config = RLConfig(init="x", steps=5, temperature_start=1.0, temperature_end=0.5)
    assert [config.temperature(s) for s in range(6)] == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.5])
    short = RLConfig(init="x", steps=10, temperature_start=1.2, temperature_end=0.4, temperature_decay_steps=3)
    assert [short.temperature(s) for s in (0, 1, 2, 7)] == pytest.approx([1.2, 0.8, 0.4, 0.4])


def test_warm_start_trains_on_the_gold_answer_tokens_only(tokenizer_dir: Path) -> None:
    job = make_job(tokenizer_dir, task=get_task("arithmetic"), warm_start_steps=2, warm_start_examples=3,
                   batch_size=2)
    inputs, targets, _ = job.warm_batch(1)  # examples 2, 0 (cycling)
    tokenizer = job.tokenizer
    golds = [job.task.gold_response(p) for p in job.task.prompts("train", 3, seed=3)]
    for row, example in enumerate((2, 0)):
        kept = [int(t) for t in targets[row] if t != -100]
        assert tokenizer.decode(kept, skip_special_tokens=False) == golds[example] + "<|im_end|>"
    fields = job.train_step(0, log=True)
    assert fields["phase"] == "warm_start" and fields["loss"] > 0


def test_ptx_adds_gamma_times_the_language_model_loss(tokenizer_dir: Path, tmp_path: Path) -> None:
    from k2.data import TokenLoader
    from k2.data.sft import prepare_sft

    chat = Path(__file__).resolve().parents[1] / "fixtures" / "sft" / "chat_good.jsonl"
    prepare_sft([chat], tmp_path / "ptx", tokenizer_dir, 128, val_fraction=0.0)
    job = make_job(tokenizer_dir, ptx_data=str(tmp_path / "ptx"), ptx_weight=0.25, seq_len=128, batch_size=2)
    before = copy.deepcopy(job.model)
    batch = TokenLoader(tmp_path / "ptx", 128, 2, seed=3, threads=1).next_batch()
    with torch.no_grad():
        from k2.train.pretrain import sample_positions
        from k2.train.sft import masked_targets

        targets = masked_targets(torch.from_numpy(batch.targets), torch.from_numpy(batch.loss_mask))
        expected = before(input_ids=torch.from_numpy(batch.inputs), targets=targets,
                          position_ids=sample_positions(torch.from_numpy(batch.positions))).loss
    fields = job.train_step(0, log=True)
    assert fields["ptx_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert job.state_dict()["ptx_loader"]


def test_ptx_batches_take_their_own_length_and_size(tokenizer_dir: Path, tmp_path: Path) -> None:
    """SFT conversations as PTX data want their own context: ptx_seq_len / ptx_batch_size."""
    from k2.data.sft import prepare_sft

    chat = Path(__file__).resolve().parents[1] / "fixtures" / "sft" / "chat_good.jsonl"
    prepare_sft([chat], tmp_path / "ptx", tokenizer_dir, 64, val_fraction=0.0)
    job = make_job(tokenizer_dir, ptx_data=str(tmp_path / "ptx"), ptx_weight=0.5, seq_len=16, batch_size=4,
                   ptx_seq_len=64, ptx_batch_size=2)
    batch = job.ptx.next_batch()
    assert batch.inputs.shape == (2, 64) and batch.loss_mask is not None
    default = make_job(tokenizer_dir, ptx_data=str(tmp_path / "ptx"), ptx_weight=0.5, seq_len=16, batch_size=4)
    assert default.ptx.next_batch().inputs.shape == (4, 16)
    # The warm start (supervised steps on the task) mixes the PTX loss in as well.
    warm = make_job(tokenizer_dir, task=get_task("arithmetic"), warm_start_steps=1, warm_start_examples=2,
                    batch_size=2, ptx_data=str(tmp_path / "ptx"), ptx_weight=0.5, ptx_seq_len=64)
    fields = warm.train_step(0, log=True)
    assert fields["phase"] == "warm_start" and fields["ptx_loss"] > 0


# ---------------------------------------------------------------------------- the command
FLAGS = ["--prompts-per-step", "2", "--samples-per-prompt", "3", "--token-budget", str(BUDGET),
         "--eval-prompts", "3", "--log-every", "1", "--eval-every", "4", "--save-every", "2",
         "--keep-last", "3", "--no-progress", "--device", "cpu", "--seq-len", "128",
         "--batch-size", "2"]


def rl(*args: str) -> int:
    return main(["rl", *FLAGS, *args])


def test_the_command_runs_and_writes_metrics(init_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "rl"
    assert rl("--init", str(init_run), "--run-dir", str(run), "--steps", "1", "--warm-start-steps", "1") == 0
    records = read_metrics(run / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in evals] == [0, 2] and {"accuracy", "reward"} <= set(evals[0])
    assert [r["phase"] for r in train] == ["warm_start", "rl"]
    assert train[1]["weight_version"] == 1 and train[1]["reward_by_task"].keys() == {"arithmetic"}
    for key in ("rollout_tokens_per_s", "trainer_tokens_per_s", "entropy", "log_ratio", "response_len"):
        assert train[1][key] == train[1][key]  # present and not NaN
    assert (run / "rl_reward.png").is_file() and (run / "checkpoints" / "step-00000002").is_dir()
    config = json.loads((run / "config.json").read_text())
    assert config["objective"] == "k2" and config["qk_clip_tau"] > 0 and config["optimizer"] == "muonclip"


def test_steps_zero_with_a_warm_start_is_a_supervised_only_run(init_run: Path, tmp_path: Path) -> None:
    # The continued-SFT baseline of bench/rl_study.py: warm-start steps and no RL step.
    run = tmp_path / "sft"
    assert rl("--init", str(init_run), "--run-dir", str(run), "--steps", "0", "--warm-start-steps", "2") == 0
    records = read_metrics(run / "metrics.jsonl")
    assert [r["phase"] for r in records if r["kind"] == "train"] == ["warm_start", "warm_start"]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2]


def test_steps_zero_without_a_warm_start_is_refused(init_run: Path, tmp_path: Path, capsys) -> None:
    assert rl("--init", str(init_run), "--run-dir", str(tmp_path / "r"), "--steps", "0") == 1
    assert "steps must be" in capsys.readouterr().err


@pytest.mark.slow  # two short RL runs
def test_resume_is_bit_identical(init_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "rl"
    assert rl("--init", str(init_run), "--run-dir", str(run), "--steps", "3", "--warm-start-steps", "1") == 0
    full = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    (cut / "checkpoints" / "latest").write_text("step-00000002\n")
    assert main(["rl", "--resume", "--run-dir", str(cut), "--no-progress"]) == 0
    resumed = [r for r in read_metrics(cut / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    keys = ("loss", "grad_norm", "max_logit", "reward", "response_len", "entropy", "log_ratio")
    for a, b in zip(full[1:], resumed[1:]):
        assert [a[k] for k in keys] == [b[k] for k in keys]
    x = checkpoint.CheckpointReader(run / "checkpoints" / "step-00000004")
    y = checkpoint.CheckpointReader(cut / "checkpoints" / "step-00000004")
    names = x.names("model")
    assert names == y.names("model")
    for name in names:
        assert torch.equal(x.tensor(name), y.tensor(name)), name


@pytest.mark.parametrize("args, message", [
    ((), "init is missing"),
    (("--objective", "ppo"), "unknown objective 'ppo'"),
    (("--samples-per-prompt", "1"), "samples_per_prompt must be at least 2"),
    (("--ptx-weight", "0.5"), "ptx_weight > 0 needs --ptx-data"),
    (("--temperature-end", "0"), "temperature_end must be > 0"),
    (("--task", "nosuch"), "unknown task 'nosuch'"),
])
def test_bad_options_are_clear_errors(init_run: Path, tmp_path: Path, capsys, args, message) -> None:
    init = () if args == () else ("--init", str(init_run))
    assert rl(*init, "--run-dir", str(tmp_path / "r"), *args) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_an_agentic_prompt_longer_than_the_context_is_a_clear_error(init_run: Path, tmp_path: Path,
                                                                     capsys) -> None:
    assert rl("--init", str(init_run), "--run-dir", str(tmp_path / "r"), "--task", "agentic:bank") == 1
    assert "exceeds the model's context of 256" in capsys.readouterr().err


def test_constrained_agentic_episodes_on_rollout_workers_are_refused(init_run: Path, tmp_path: Path,
                                                                       capsys) -> None:
    assert rl("--init", str(init_run), "--run-dir", str(tmp_path / "r"), "--task", "agentic:bank",
              "--rollout-workers", "1") == 1
    err = capsys.readouterr().err
    assert "cannot be sent to a worker process" in err and "--no-agent-constraints" in err


@pytest.mark.slow  # spawns two rollout worker processes
def test_rollout_workers_train_exactly_as_colocated(init_run: Path, tmp_path: Path, capsys) -> None:
    for workers in ("0", "2"):
        assert rl("--init", str(init_run), "--run-dir", str(tmp_path / workers), "--steps", "2",
                  "--rollout-workers", workers) == 0
    here, there = ([r for r in read_metrics(tmp_path / w / "metrics.jsonl") if r["kind"] == "train"]
                   for w in ("0", "2"))
    keys = ("entropy", "reward", "response_len", "weight_version")  # entropy: of the samples
    assert [r[k] for r in here for k in keys] == pytest.approx([r[k] for r in there for k in keys], rel=1e-4)
    # When a step's rewards are (nearly) constant its gradient comes only from the log-ratio
    # term, i.e. from the rounding differences between the workers' and the trainer's
    # log-probabilities, so grad norms agree to an absolute 1e-3 rather than relatively.
    assert [r["grad_norm"] for r in here] == pytest.approx([r["grad_norm"] for r in there], rel=1e-4, abs=1e-3)
    assert all(r["weight_sync_s"] == 0 for r in here)
    assert all(r["weight_sync_s"] > 0 and 0 < r["weight_sync_share"] < 1 for r in there)
    assert "rollout workers: rollout-0, rollout-1" in capsys.readouterr().out


# ---------------------------------------------------------------------------- multi-turn tasks
@pytest.mark.slow  # prefills of 2,000-token agentic prompts on the CPU
def test_a_multi_turn_step_trains_on_the_agent_turns_of_each_episode(tokenizer_dir: Path) -> None:
    task = get_task("agentic:bank", max_turns=2, max_steps=3)
    torch.manual_seed(1)
    model = K2ForCausalLM(small_config(vocab_size=VOCAB, max_position_embeddings=3072))
    job = make_job(tokenizer_dir, task=task, model=model, prompts_per_step=1, samples_per_prompt=2,
                   token_budget=6, truncation_penalty=0.25)
    before = copy.deepcopy(job.model)
    fields = job.train_step(0, log=True)
    r = job.last
    assert len(r.segments) == 2 and all(len(s) >= 1 for s in r.segments)
    new, old = [], []
    for segments in r.segments:
        # Each turn's context is the previous context, the turn's tokens and the observation.
        for (ids, c), (next_ids, _) in zip(segments, segments[1:]):
            assert next_ids[: len(ids) + len(c.token_ids)] == ids + c.token_ids
            assert len(next_ids) > len(ids) + len(c.token_ids)
        new.append(sum(float(full_forward_logprob(before, ids, c.token_ids, 1.0).sum()) for ids, c in segments))
        old.append(sum(lp for _, c in segments for lp in c.logprobs))
        assert all(c.versions == [0] * len(c.token_ids) for _, c in segments)
    assert new == pytest.approx(old, abs=1e-3)
    # The reward is the task's verdict on the transcript of the turns, less the truncation penalty.
    for prompt, text, reward, segments in zip(r.prompts, r.texts, r.rewards, r.segments):
        cut = any(c.finish_reason == "length" for _, c in segments)
        assert reward == task.verify(prompt, text).score - (0.25 if cut else 0.0)
    rw = torch.tensor(r.rewards, dtype=torch.float64)
    residual = rw - rw.mean() - (torch.tensor(new, dtype=torch.float64) - torch.tensor(old, dtype=torch.float64))
    assert fields["loss"] == pytest.approx(float((residual ** 2).mean()), abs=1e-6)
    assert fields["turns"] == pytest.approx(sum(len(s) for s in r.segments) / 2)


def test_episodes_chain_turns_and_observations_and_score_the_transcript(tokenizer_dir: Path) -> None:
    """An engine that plays the scripted gold agent: several turns, each context the previous
    one plus the turn and the environment's observation, and the gold reward (1)."""
    from k2.agentic.scripted import GoldAgent
    from k2.rl.episodes import play_episodes
    from k2.rl.rollout import Completion
    from k2.rl.sampling import request_seed

    task = get_task("agentic:bank")
    tokenizer = load_tokenizer(tokenizer_dir)
    prompts = task.prompts("train", 2, seed=0)
    agents = [GoldAgent(task.tasks[p.hidden["task_id"]]) for p in prompts]
    who = {request_seed(9, t * 2 + i): i for t in range(20) for i in range(2)}
    end = tokenizer.token_to_id("<|im_end|>")

    class GoldEngine:
        def generate(self, requests, seed):  # noqa: ANN001, ANN202
            out = []
            for k, request in enumerate(requests):
                text = agents[who[request.seed]].act().removesuffix("<|im_end|>")
                ids = tokenizer.encode(text, add_special_tokens=False).ids + [end]
                out.append(Completion(k, list(request.prompt_ids), ids, [0.0] * len(ids), [0] * len(ids), "stop"))
            return out

    episodes = play_episodes(task, prompts, GoldEngine(), tokenizer, budget=64, temperature=1.0, top_p=1.0,
                             stop_id=end, seed=9, max_context=100_000)
    for episode, agent in zip(episodes, agents):
        assert episode.done and episode.reward.correct and episode.reward.score == 1.0
        assert len(episode.segments) >= 2
        for (ids, c), (next_ids, _) in zip(episode.segments, episode.segments[1:]):
            assert next_ids[: len(ids) + len(c.token_ids)] == ids + c.token_ids
            observation = tokenizer.decode(next_ids[len(ids) + len(c.token_ids):], skip_special_tokens=False)
            assert observation.endswith("<|im_assistant|>assistant<|im_middle|>")
        assert episode.transcript.count("<|im_end|>") == len(episode.segments)


@pytest.mark.parametrize("objective", ["k2", "grpo"])
def test_a_step_raises_the_log_probability_of_the_better_samples(tokenizer_dir: Path, objective: str) -> None:
    job = make_job(tokenizer_dir, objective=objective, prompts_per_step=4, lr=2e-4, adamw_lr=1e-4)
    job.train_step(0, log=True)
    r = job.last
    after = torch.tensor([float(full_forward_logprob(job.model, p, c.token_ids, 1.0).sum())
                          for p, c in zip(r.prompt_ids, r.completions)], dtype=torch.float64)
    before = torch.tensor([sum(c.logprobs) for c in r.completions], dtype=torch.float64)
    rw = torch.tensor(r.rewards, dtype=torch.float64).view(4, 4)
    advantage = (rw - rw.mean(1, keepdim=True)).flatten()
    assert float((advantage * (after - before)).sum()) > 0


@pytest.mark.parametrize("objective", ["k2", "grpo"])
def test_groups_with_equal_rewards_are_not_forwarded_and_change_nothing(tokenizer_dir: Path,
                                                                       objective: str) -> None:
    """A group whose rewards are all equal has zero advantage: skipping its forward (version given)
    gives the loss and the gradient of forwarding every group (version None), with fewer tokens;
    samples of another version are always forwarded."""
    job = make_job(tokenizer_dir, objective=objective, prompts_per_step=3)
    r = job.rollouts(0)
    r.rewards = [0.5] * 4 + [1.0, 0.0, 0.1, 1.0] + [0.0, 0.0, 0.0, 0.0]  # groups 0 and 2 are still

    def loss_and_grads(version):  # noqa: ANN001, ANN202
        job.model.zero_grad(set_to_none=True)
        loss, extra = job.rl_loss(r, version=version)
        loss.backward()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in job.model.parameters()]
        return float(loss.detach()), grads, extra

    full, full_grads, full_extra = loss_and_grads(None)
    skipped, skipped_grads, skipped_extra = loss_and_grads(0)
    assert full_extra["still_groups"] == 0 and skipped_extra["still_groups"] == pytest.approx(2 / 3)
    assert skipped_extra["forward_tokens"] < full_extra["forward_tokens"]
    assert skipped == pytest.approx(full, rel=1e-5, abs=1e-8)
    scale = max(float(g.abs().max()) for g in full_grads)
    assert scale > 0
    for a, b in zip(full_grads, skipped_grads):
        assert torch.allclose(a, b, atol=1e-5 * scale, rtol=1e-4)
    # tokens sampled by another version than π_θ's: the still groups' log-ratio is not zero
    _, _, other = loss_and_grads(1)
    assert other["still_groups"] == 0 and other["forward_tokens"] == full_extra["forward_tokens"]
    job.model.zero_grad(set_to_none=True)
