"""``k2 sft``: the loss is the mean cross-entropy over the assistant's tokens only, nothing else
gets gradient, the run lives on the shared harness (resume is bit-identical), and bad input or
missing arguments fail with clear errors (docs/sft.md)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import small_config

from k2 import checkpoint
from k2.cli import main
from k2.data import TokenLoader
from k2.data.loader import Batch
from k2.data.sft import prepare_sft
from k2.data.tokenizer import save_tokenizer, train_tokenizer
from k2.model import K2ForCausalLM
from k2.parallel.setup import Dist
from k2.train.metrics import read_metrics
from k2.train.sft import SFTConfig, SFTJob, masked_targets, resolve_init

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sft"
GOOD, BAD = FIXTURES / "chat_good.jsonl", FIXTURES / "chat_bad.jsonl"
SEQ = 256
VOCAB = 512


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    text = [GOOD.read_text(encoding="utf-8"), BAD.read_text(encoding="utf-8")] * 4
    save_tokenizer(train_tokenizer(text, 400), out)
    return out


@pytest.fixture(scope="module")
def data_dir(tokenizer_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft-data")
    prepare_sft([GOOD], out, tokenizer_dir, SEQ, val_fraction=0.0)
    return out


def tiny_model(seed: int = 0) -> K2ForCausalLM:
    torch.manual_seed(seed)
    return K2ForCausalLM(small_config(vocab_size=VOCAB, max_position_embeddings=1024))


def job_for(data_dir: Path, model: K2ForCausalLM, **overrides) -> SFTJob:
    settings = dict(init="unused", data=[str(GOOD)], data_dir=str(data_dir), seq_len=SEQ,
                    batch_size=2, steps=4, warmup_steps=1, device="cpu")
    config = SFTConfig(**{**settings, **overrides})
    return SFTJob(config, Dist(0, 1, torch.device("cpu")), model, log=lambda _: None)


@torch.no_grad()
def hand_masked_ce(model: K2ForCausalLM, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the masked targets, from the logits, written out."""
    from k2.train.pretrain import sample_positions

    ids = torch.from_numpy(batch.inputs)
    positions = sample_positions(torch.from_numpy(batch.positions))
    logits = model(input_ids=ids, position_ids=positions).logits.double()
    logp = logits.log_softmax(-1).gather(-1, torch.from_numpy(batch.targets)[..., None])[..., 0]
    mask = torch.from_numpy(batch.loss_mask).double()
    return -(logp * mask).sum() / mask.sum()


def test_the_step_loss_is_the_masked_cross_entropy(data_dir: Path) -> None:
    model = tiny_model()
    before = copy.deepcopy(model)
    job = job_for(data_dir, model)
    fields = job.train_step(0, log=True)
    batch = TokenLoader(data_dir, SEQ, 2, seed=0, threads=1).next_batch()  # the same first batch
    assert 0 < batch.loss_mask.sum() < batch.loss_mask.size  # the mask really selects
    expected = float(hand_masked_ce(before, batch))
    assert fields["loss"] == pytest.approx(expected, rel=1e-5)
    assert fields["masked_share"] == pytest.approx(batch.loss_mask.mean())
    with torch.no_grad():
        unmasked = torch.nn.functional.cross_entropy(
            before(input_ids=torch.from_numpy(batch.inputs)).logits.reshape(-1, VOCAB),
            torch.from_numpy(batch.targets).reshape(-1))
    assert abs(float(unmasked) - expected) > 1e-3  # the mask changes the number


def test_grad_accum_weights_micro_batches_by_their_masked_tokens(data_dir: Path) -> None:
    model = tiny_model()
    before = copy.deepcopy(model)
    job = job_for(data_dir, model, grad_accum=2, batch_size=1)
    fields = job.train_step(0, log=True)
    loader = TokenLoader(data_dir, SEQ, 1, seed=0, threads=1)
    a, b = loader.next_batch(), loader.next_batch()
    na, nb = a.loss_mask.sum(), b.loss_mask.sum()
    expected = (float(hand_masked_ce(before, a)) * na + float(hand_masked_ce(before, b)) * nb) / (na + nb)
    assert fields["loss"] == pytest.approx(expected, rel=1e-5)


def gradients(model: K2ForCausalLM, job: SFTJob, batch: Batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    ids, targets, positions, _ = job._tensors(batch, non_blocking=False)
    loss = model(input_ids=ids, position_ids=positions, targets=targets).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_only_assistant_targets_get_gradient(data_dir: Path) -> None:
    model = tiny_model()
    job = job_for(data_dir, model)
    batch = TokenLoader(data_dir, SEQ, 2, seed=0, threads=1).next_batch()
    loss, grads = gradients(model, job, batch)
    rng = np.random.default_rng(0)
    off = batch.loss_mask == 0
    # Any other targets where the mask is 0 (system, user, tool text, headers, padding).
    noisy = batch.targets.copy()
    noisy[off] = rng.integers(0, VOCAB, size=int(off.sum()))
    assert (noisy != batch.targets).any()
    loss2, grads2 = gradients(model, job, batch._replace(targets=noisy))
    assert loss2 == loss
    assert grads.keys() == grads2.keys()
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name
    # A changed assistant target does change the loss (the check above could fail).
    on = np.flatnonzero(batch.loss_mask.reshape(-1))
    changed = batch.targets.copy().reshape(-1)
    changed[on[0]] = (changed[on[0]] + 1) % VOCAB
    loss3, _ = gradients(model, job, batch._replace(targets=changed.reshape(batch.targets.shape)))
    assert loss3 != loss


def test_masked_targets_ignore_exactly_the_zeros() -> None:
    targets = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 0]])
    assert masked_targets(targets, mask).tolist() == [[-100, 6, 7, -100]]


# ---------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def init_run(tokenizer_dir: Path, tmp_path_factory) -> Path:
    """A k2-run-shaped directory: config.json with a data_dir, and a checkpoint of a small model
    (saved with the tokenizer, as `k2 train` saves them)."""
    run = tmp_path_factory.mktemp("init") / "pre"
    model = tiny_model(seed=1)
    checkpoint.save(run / "checkpoints", model, None, {"step": 3}, tokenizer_dir=tokenizer_dir)
    (run / "config.json").write_text(json.dumps({"preset": "custom", "data_dir": str(tokenizer_dir)}))
    return run


FLAGS = ["--seq-len", str(SEQ), "--batch-size", "2", "--warmup-steps", "1", "--eval-batches", "1",
         "--log-every", "1", "--eval-every", "4", "--save-every", "2", "--keep-last", "3",
         "--no-progress", "--device", "cpu"]


def sft(*args: str) -> int:
    return main(["sft", *FLAGS, *args])


def test_init_resolves_a_run_and_a_checkpoint(init_run: Path) -> None:
    from_run = resolve_init(init_run)
    assert from_run.checkpoint.name == "step-00000003"
    assert from_run.preset == "custom"  # a shape that is no preset
    assert (from_run.tokenizer_dir / "tokenizer.json").is_file()
    assert resolve_init(from_run.checkpoint).checkpoint == from_run.checkpoint


@pytest.mark.slow  # two short runs of a small model on the CPU
def test_resume_is_bit_identical(init_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "sft"
    assert sft("--init", str(init_run), "--data", str(GOOD), str(BAD), "--run-dir", str(run),
               "--steps", "4") == 0
    assert (run / "data" / "manifest.json").is_file() and (run / "loss.png").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "custom" and config["qk_clip_tau"] > 0 and config["optimizer"] == "muonclip"
    full = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    # Cut the run back to its step-2 checkpoint, as a kill after that save would leave it.
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    (cut / "checkpoints" / "latest").write_text("step-00000002\n")
    assert main(["sft", "--resume", "--run-dir", str(cut), "--no-progress"]) == 0
    resumed = [r for r in read_metrics(cut / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        assert (a["loss"], a["grad_norm"], a["max_logit"]) == (b["loss"], b["grad_norm"], b["max_logit"])
    x = checkpoint.CheckpointReader(run / "checkpoints" / "step-00000004")
    y = checkpoint.CheckpointReader(cut / "checkpoints" / "step-00000004")
    names = x.names("model")
    assert names == y.names("model")
    for name in names:
        assert torch.equal(x.tensor(name), y.tensor(name)), name


def test_missing_data_and_init_are_clear_errors(init_run: Path, tmp_path: Path, capsys) -> None:
    assert sft("--init", str(init_run), "--run-dir", str(tmp_path / "r")) == 1
    assert "data is missing: give --data FILE.jsonl" in capsys.readouterr().err
    assert sft("--data", str(GOOD), "--run-dir", str(tmp_path / "r")) == 1
    assert "init is missing" in capsys.readouterr().err
    assert sft("--init", str(tmp_path / "nope"), "--data", str(GOOD), "--run-dir", str(tmp_path / "r")) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_data_with_nothing_to_train_on_is_refused_naming_the_line(init_run: Path, tmp_path: Path,
                                                                  capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"},'
                   ' {"role": "tool", "tool_call_id": "c1", "content": "x"},'
                   ' {"role": "assistant", "content": "ok"}]}\n')
    assert sft("--init", str(init_run), "--data", str(bad), "--run-dir", str(tmp_path / "r")) == 1
    err = capsys.readouterr().err
    assert f"{bad}:1" in err and "tool_call_id 'c1' names no earlier tool call" in err


def test_sft_config_keeps_train_validation() -> None:
    from k2.errors import ConfigError

    with pytest.raises(ConfigError, match="lr must be a positive number"):
        SFTConfig.resolve(None, init="x", data=[str(GOOD)], lr=-1.0)
    config = SFTConfig.resolve(None, init="x", data=[str(GOOD)])
    assert dataclasses.asdict(config)["qk_clip_tau"] == 100.0 and config.optimizer == "muonclip"
