"""Partial rollouts across RL steps (``k2 rl --partial-rollout-steps N``; docs/rl.md, "Partial
rollouts"): with unchanged weights the carried-over samples are exactly the uninterrupted ones;
a sample's tokens change version only at step boundaries; the loss takes the per-token sampling
log-probabilities, whatever their version, as π_old; the buffer is bounded, checkpointed and
resumed exactly; a run trains."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_rl_job import full_forward_logprob, init_run, make_job, rl, tokenizer_dir  # noqa: F401

from k2 import checkpoint
from k2.errors import RLError
from k2.rl.objective import k2_loss
from k2.train.metrics import read_metrics

PARTIAL = dict(partial_rollout_steps=2, partial_max_age=2)


def partial_state(directory: Path) -> dict:
    """The partial-rollout buffer a checkpoint holds."""
    from k2.checkpoint.state_tree import decode

    reader = checkpoint.CheckpointReader(directory)
    return decode(reader.read_json("train_state.json"), reader.tensor)["user"]["partial_rollouts"]


def test_unchanged_weights_give_the_uninterrupted_samples(tokenizer_dir: Path) -> None:
    full, part = make_job(tokenizer_dir), make_job(tokenizer_dir, **PARTIAL)
    reference = {s: full.rollouts(s).completions for s in range(3)}
    seen = 0
    carried = 0
    for step in range(4):  # no optimizer step: the weights stay, only the version tag moves
        part.rollouts(step)
        for g in part.partial.last_trained:
            want = reference[g.origin][g.slot * 4:(g.slot + 1) * 4]
            assert [c.token_ids for c in g.completions] == [c.token_ids for c in want]
            assert [c.finish_reason for c in g.completions] == [c.finish_reason for c in want]
            for got, ref in zip(g.completions, want):
                assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
            seen += 1
            carried += sum(len(set(c.versions)) > 1 for c in g.completions)
    assert seen >= 3 and carried > 0  # samples were paused and resumed across steps


def test_versions_change_only_at_step_boundaries_and_the_buffer_is_bounded(tokenizer_dir: Path) -> None:
    job = make_job(tokenizer_dir, **PARTIAL)
    held: dict[tuple[int, int, int], int] = {}  # sample -> tokens it held after the previous step
    mixed = 0
    for step in range(4):
        job.train_step(step, log=True)
        for g in [*job.partial.last_trained, *job.partial.buffer]:
            for j, c in enumerate(g.completions):
                had = held.get((g.origin, g.slot, j), 0)
                assert set(c.versions[had:]) <= {step}  # tokens of this step: its version only
                assert all(v < step for v in c.versions[:had])  # earlier tokens: earlier versions
                assert c.versions == sorted(c.versions) and all(v >= g.origin for v in c.versions)
                held[(g.origin, g.slot, j)] = len(c.token_ids)
                mixed += g in job.partial.last_trained and len(set(c.versions)) > 1
        for g in job.partial.last_trained:
            assert step - g.origin <= 2  # partial_max_age: finished by origin + 2 at the latest
        assert all(step - g.origin < 2 for g in job.partial.buffer)
        assert len(job.partial.buffer) <= 2 * 2  # partial_max_age x P groups at most
    assert mixed > 0  # across steps, a sample's tokens do carry several versions


def test_a_version_published_mid_step_is_refused(tokenizer_dir: Path) -> None:
    job = make_job(tokenizer_dir, rollout_batch=2, **PARTIAL)
    engine = job.engine

    class MidStepPublish:
        weight_version = 0

        def generate(self, requests, seed, max_steps=None):  # noqa: ANN001, ANN202
            engine.weight_version = self.weight_version

            def publish(done, total):  # noqa: ANN001, ANN202
                engine.weight_version += 1  # new weights land while the batch still decodes

            return engine.generate(requests, seed=seed, progress=publish, max_steps=max_steps)

    job.engine = MidStepPublish()
    with pytest.raises(RLError, match="this step's tokens must all be 0"):
        job.train_step(0, log=True)


def test_mixed_version_samples_enter_the_k2_loss_with_their_sampling_logprobs(tokenizer_dir: Path) -> None:
    job = make_job(tokenizer_dir, tau=0.7, **PARTIAL)
    job.train_step(0, log=True)
    import copy

    before = copy.deepcopy(job.model)  # θ of step 1: differs from the version-0 tokens' sampler
    fields = job.train_step(1, log=True)
    groups = job.partial.last_trained
    assert any(len(set(c.versions)) > 1 for g in groups for c in g.completions)
    rewards = torch.tensor(job.last.rewards, dtype=torch.float64).view(len(groups), 4)
    new = torch.tensor([[float(full_forward_logprob(before, g.prompt_ids, c.token_ids,
                                                    job.config.temperature(g.origin)).sum())
                         for c in g.completions] for g in groups], dtype=torch.float64)
    old = torch.tensor([[math.fsum(c.logprobs) for c in g.completions] for g in groups], dtype=torch.float64)
    expected = float(k2_loss(new, old, rewards, 0.7))
    assert fields["loss"] == pytest.approx(expected, rel=1e-4)
    lags = [1 - v for g in groups for c in g.completions for v in c.versions]
    assert fields["version_lag"] == max(lags) == 1
    assert fields["version_lag_mean"] == pytest.approx(sum(lags) / len(lags))
    assert 0 < fields["resumed_share"] <= 1 and fields["groups_trained"] == len(groups)


@pytest.mark.slow  # two short RL runs
def test_a_partial_rollout_run_trains_and_resumes_exactly_with_a_full_buffer(init_run: Path,  # noqa: F811
                                                                               tmp_path: Path) -> None:
    run = tmp_path / "rl"
    flags = ("--partial-rollout-steps", "2", "--partial-max-age", "2", "--steps", "4")
    assert rl("--init", str(init_run), "--run-dir", str(run), *flags) == 0
    full = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    for r in full:
        assert math.isfinite(r["loss"]) and math.isfinite(r["reward"])
        assert {"version_lag", "version_lag_mean", "resumed_share", "groups_trained"} <= set(r)
    assert max(r["version_lag"] for r in full) >= 1 and max(r["resumed_share"] for r in full) > 0
    state = partial_state(run / "checkpoints" / "step-00000002")
    assert state["groups"], "the step-2 checkpoint should hold paused groups"
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    (cut / "checkpoints" / "latest").write_text("step-00000002\n")
    assert rl("--resume", "--run-dir", str(cut)) == 0
    resumed = [r for r in read_metrics(cut / "metrics.jsonl") if r["kind"] == "train"]
    keys = ("loss", "grad_norm", "reward", "response_len", "entropy", "log_ratio", "version_lag_mean",
            "resumed_share", "partial_buffer_tokens")
    assert [[r[k] for k in keys] for r in full] == [[r[k] for k in keys] for r in resumed]
    x = checkpoint.CheckpointReader(run / "checkpoints" / "step-00000004")
    y = checkpoint.CheckpointReader(cut / "checkpoints" / "step-00000004")
    for name in x.names("model"):
        assert torch.equal(x.tensor(name), y.tensor(name)), name
    assert json.dumps(partial_state(run / "checkpoints" / "step-00000004")) == json.dumps(
        partial_state(cut / "checkpoints" / "step-00000004"))


def test_partial_rollouts_and_worker_options_refuse_what_they_cannot_do(init_run: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    assert rl("--init", str(init_run), "--run-dir", str(tmp_path / "a"), "--partial-rollout-steps", "2",
              "--partial-max-age", "0") == 1
    assert "partial_max_age must be at least 1" in capsys.readouterr().err
    assert rl("--init", str(init_run), "--run-dir", str(tmp_path / "b"), "--weight-transport", "carrier") == 1
    assert "unknown weight_transport 'carrier'" in capsys.readouterr().err
    assert rl("--init", str(init_run), "--run-dir", str(tmp_path / "c"), "--rollout-remote-workers", "1") == 1
    assert "rollout_remote_workers needs weight_transport dist" in capsys.readouterr().err
    assert rl("--init", str(init_run), "--run-dir", str(tmp_path / "d"), "--rollout-remote-workers", "1",
              "--weight-transport", "dist") == 1
    assert "rollout_remote_workers needs rollout_store HOST:PORT" in capsys.readouterr().err
    assert rl("--init", str(init_run), "--run-dir", str(tmp_path / "e"), "--weight-transport", "dist",
              "--rollout-store", "nohost") == 1
    assert "rollout_store 'nohost' is not HOST:PORT" in capsys.readouterr().err


@pytest.mark.slow  # spawns two rollout worker processes
def test_partial_rollouts_on_gloo_rank_workers_train(init_run: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    run = tmp_path / "dist"
    assert rl("--init", str(init_run), "--run-dir", str(run), "--steps", "3", "--rollout-workers", "2",
              "--weight-transport", "dist", "--partial-rollout-steps", "2") == 0
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["weight_version"] for r in records] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) and r["weight_sync_s"] > 0 for r in records)
    assert max(r["version_lag"] for r in records) >= 1
    assert "rollout workers: rollout-0, rollout-1 (weights by torch.distributed gloo group" in capsys.readouterr().out
