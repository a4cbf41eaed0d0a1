"""Issue 10: the optimizer seam of `k2 train` (--optimizer adamw, max logits logged without
QK-Clip) and the two study drivers (bench/optimizer_compare.py, bench/qk_clip_study.py) end to end
on a toy budget."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from k2.cli import main
from k2.errors import ConfigError
from k2.model import K2Config, K2ForCausalLM
from k2.train.config import TrainConfig
from k2.train.metrics import read_metrics
from k2.train.optimizers import AdamWWithRouterBias, MaxLogitWatch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import optimizer_compare  # noqa: E402
import qk_clip_study  # noqa: E402
from study import Finished, tokens_to_reach  # noqa: E402

FLAGS = ["--seq-len", "64", "--batch-size", "4", "--warmup-steps", "1", "--eval-batches", "1",
         "--log-every", "1", "--num-samples", "0", "--no-progress"]


def train_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


# ------------------------------------------------------------------ the optimizer seam

def test_optimizer_setting_is_checked() -> None:
    assert TrainConfig.resolve(optimizer="adamw").optimizer == "adamw"
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig.resolve(optimizer="sgd")


def test_adamw_is_torch_adamw_plus_the_router_bias_update() -> None:
    torch.manual_seed(0)
    config = K2Config.from_preset("tiny")
    ours = K2ForCausalLM(config)
    reference = copy.deepcopy(ours)
    opt = AdamWWithRouterBias(ours, lr=3e-3, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.1)
    moe_names = [n for n, m in ours.named_modules() if hasattr(m, "pop_expert_load")]
    assert len(moe_names) == 3  # the tiny preset's MoE layers
    watch = MaxLogitWatch(ours)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    for _ in range(2):
        for model, optimizer in ((ours, opt), (reference, ref_opt)):
            model(input_ids=ids, labels=ids).loss.backward()
            if model is reference:  # the update MuonClip and AdamWWithRouterBias both do
                loads = {n: m.pop_expert_load() for n, m in model.named_modules() if n in moe_names}
            optimizer.step()
            optimizer.zero_grad()
        for name, module in reference.named_modules():
            if name in moe_names:
                bias = module.gate.e_score_correction_bias
                bias += 1e-3 * torch.sign(loads[name].mean() - loads[name])
                bias -= bias.mean()
        layers = watch.pop()
        assert [layer.clipped_heads for layer in layers] == [0, 0, 0, 0]
        assert all(layer.max_logit > 0 for layer in layers)
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert opt.last_report.step == 2 and len(opt.last_report.expert_loads) == 3
    assert sum(float(load.sum()) for load in opt.last_report.expert_loads) > 0


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, tau", [("adamw", "100"), ("muonclip", "0")])
def test_runs_without_qk_clip_log_max_logits_per_layer(data_dir, tmp_path, optimizer, tau) -> None:
    run = tmp_path / "run"
    assert main(["train", *FLAGS, "--data-dir", str(data_dir), "--run-dir", str(run), "--steps", "6",
                 "--eval-every", "6", "--save-every", "6", "--optimizer", optimizer,
                 "--qk-clip-tau", tau]) == 0
    records = train_records(run)
    assert len(records) == 6
    for r in records:
        assert len(r["max_logit"]) == 4 and all(v > 0 for v in r["max_logit"])
        assert r["clipped_heads"] == [0, 0, 0, 0]
        assert len(r["expert_balance"]) == 3
    assert records[-1]["loss"] < records[0]["loss"]
    assert json.loads((run / "config.json").read_text())["optimizer"] == optimizer
    assert (run / "max_logit.png").is_file()


# ------------------------------------------------------------------ the drivers

def test_tokens_to_reach_interpolates_the_validation_curve() -> None:
    run = Finished(name="r", config={"seq_len": 10, "batch_size": 2, "grad_accum": 1},
                   final_val_loss=3.0, eval_steps=[10, 20, 30], eval_losses=[5.0, 4.0, 3.0],
                   train_steps=[], train_losses=[], max_logit=[], clipped_heads=[], step_seconds=0.1)
    # 20 tokens a step: 4.0 at 400 tokens, 3.0 at 600; 3.5 is half way
    assert tokens_to_reach(run, 3.5) == pytest.approx(500.0)
    assert tokens_to_reach(run, 4.0) == pytest.approx(400.0)
    assert tokens_to_reach(run, 6.0) == pytest.approx(200.0)
    assert tokens_to_reach(run, 2.9) is None


@pytest.mark.slow
def test_optimizer_compare_runs_end_to_end_and_resumes(data_dir, tmp_path, capsys) -> None:
    out = tmp_path / "compare"
    args = ["--toy", "--out", str(out), "--data-dir", str(data_dir)]
    assert optimizer_compare.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# optimizer_compare")
    final = json.loads(lines[-1])
    assert final["benchmark"] == "optimizer_compare"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sweep"]["muonclip"]) == {"0.006", "0.012"}
    assert set(summary["sweep"]["adamw"]) == {"0.003"}
    for opt in ("muonclip", "adamw"):
        best = summary["best"][opt]
        assert set(best["val_loss_by_seed"]) == {"0", "1"}
        assert best["val_loss_mean"] == pytest.approx(sum(best["val_loss_by_seed"].values()) / 2)
        lr = best["lr"]
        for seed in (0, 1):
            name = f"{opt}-lr{lr:g}-s{seed}"
            config = json.loads((out / name / "config.json").read_text())
            assert config["optimizer"] == opt and config["seed"] == seed and config["steps"] == 4
            assert not (out / name / "checkpoints").exists()
    assert summary["to_adamw_loss"]["adamw_tokens"] == 4 * 4 * 64
    for name in ("optimizer_sweep.png", "optimizer_curves.png"):
        assert (out / name).stat().st_size > 0

    # A second call finds every run finished and trains nothing.
    metrics = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")}
    assert len(metrics) == 5  # 3 sweep runs + 1 more seed of each best rate
    assert optimizer_compare.main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 5
    assert metrics == {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")}


@pytest.mark.slow
def test_qk_clip_study_runs_end_to_end(data_dir, tmp_path, capsys) -> None:
    out = tmp_path / "qk"
    # tau 0.01 is below the max logit of any step, so the clip run must clip at every step
    assert qk_clip_study.main(["--toy", "--tau", "0.01", "--out", str(out), "--data-dir", str(data_dir)]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["benchmark"] == "qk_clip_study" and final["tau"] == 0.01
    summary = json.loads((out / "summary.json").read_text())
    runs = {r["variant"]: r for r in summary["runs"].values()}
    assert runs["no-clip"]["steps_with_clipping"] == 0
    assert runs["clip"]["steps_with_clipping"] == 4
    assert len(runs["clip"]["max_logit_peak_by_layer"]) == 4
    for name in ("qk_max_logit.png", "qk_clipped_heads.png", "qk_loss.png"):
        assert (out / name).stat().st_size > 0
