"""Training with expert parallelism equals one process on the same global batch (MuonClip).

Two gloo ranks each hold half of every MoE layer's experts and read half of each global batch;
DDP averages the replicated gradients, the expert gradients come through the all_to_all backward
and are scaled to the same mean, the gradient norm is clipped globally, and MuonClip's QK-Clip and
router-bias update agree over the ranks. The reference is one process with the whole model and the
whole batch: weights after one step within 1e-5 and after 20 steps within 1e-4 (relative
error of each tensor), the 20 losses within 1e-3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_helpers import free_port
from k2 import checkpoint
from k2.model import K2Config, K2ForCausalLM
from k2.optim import MuonClip
from k2.parallel.agree import mean_over_ranks
from k2.parallel.expert import clip_grad_norm_, full_state_dict, parallelize_experts
from k2.train.metrics import read_metrics
from test_expert import moe_model

WORLD, STEPS, TAU, MAX_NORM = 2, 20, 0.05, 0.5


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, 256, (2 * WORLD, 12), generator=torch.Generator().manual_seed(100 + step))


def train(model: torch.nn.Module, step_fn, rank: int, world: int) -> dict:
    """STEPS MuonClip steps on this rank's share of each global batch."""
    opt = MuonClip(model, lr=1e-2, qk_clip_tau=TAU, router_bias_rate=0.01)
    losses, norms, clipped, after_one = [], [], [], None
    for step in range(STEPS):
        ids = global_batch(step).chunk(world)[rank]
        loss = model(ids, labels=ids).loss
        loss.backward()
        norms.append(float(step_fn(model)))
        opt.step()
        opt.zero_grad()
        losses.append(mean_over_ranks(loss.detach()))
        clipped.append(opt.last_report.clipped_heads)
        if step == 0:
            after_one = snapshot(model, world)
    return {"losses": losses, "norms": norms, "clipped": clipped, "after_one": after_one,
            "final": snapshot(model, world), "loads": [l.clone() for l in opt.last_report.expert_loads]}


def snapshot(model: torch.nn.Module, world: int) -> dict:
    bare = getattr(model, "module", model)
    return full_state_dict(bare) if world > 1 else {k: v.clone() for k, v in bare.state_dict().items()}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = parallelize_experts(moe_model())
        result = train(model, lambda m: clip_grad_norm_(m, MAX_NORM), rank, WORLD)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def assert_weights(got: dict, want: dict, rel: float) -> None:
    """Every tensor within ``rel`` relative error, ||got - want|| / ||want|| (Frobenius): an
    element-wise bound would fail on AdamW's first step, where a gradient entry near AdamW's eps
    turns a 1e-7 difference into a visible one in that entry alone."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        error = float((got[name] - value).norm() / value.norm().clamp_min(1e-12))
        assert error <= rel, f"{name}: relative error {error:.2e} > {rel:.0e}"


@pytest.mark.slow
def test_expert_parallel_training_equals_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = train(moe_model(), lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM),
                   rank=0, world=1)

    for rank in ranks:
        assert rank["clipped"] == single["clipped"]
        assert rank["norms"] == pytest.approx(single["norms"], rel=1e-5)
        assert_weights(rank["after_one"], single["after_one"], rel=1e-5)
        assert rank["losses"] == pytest.approx(single["losses"], abs=1e-3)
        assert_weights(rank["final"], single["final"], rel=1e-4)
        for mine, theirs in zip(rank["loads"], single["loads"]):
            assert torch.equal(mine, theirs)  # the router bias saw the global loads
    # The run exercised what it claims to: clipping by the global norm, QK-Clip, bias moves.
    assert max(single["norms"]) > MAX_NORM and sum(single["clipped"]) > 0
    biases = [v for n, v in single["final"].items() if n.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)


def k2_train(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                 str(ranks)] if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "-m", "k2", "train", *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    model = K2ForCausalLM(K2Config.from_preset("tiny"))
    checkpoint.load(path, model, restore_rng=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_k2_train_ep2_resumes_a_one_process_run_on_its_curve(data_dir, tmp_path) -> None:
    """`k2 train` on one process (4 sequences per step) saves at step 2; `k2 train --ep 2` on two
    torchrun ranks (each with 8 of the tiny preset's 16 experts per layer and 2 of the 4
    sequences) resumes that checkpoint and must continue the one-process curve: steps 3-4 losses
    within 1e-3 and final weights within 1e-4 relative, read back from the ep run's checkpoint,
    which holds every expert in the single-process layout. (--allow-changes: resume compares the
    per-rank batch size, 4 vs 2, though the global batch is the same.)"""
    steps = 4
    common = ["--data-dir", str(data_dir), "--steps", str(steps), "--eval-every", str(steps),
              "--save-every", "2", "--seq-len", "64", "--warmup-steps", "1", "--eval-batches", "1",
              "--log-every", "1", "--no-progress", "--num-samples", "1", "--sample-tokens", "4"]
    one = tmp_path / "one"
    k2_train(*common, "--batch-size", "4", "--run-dir", str(one))
    cut = tmp_path / "cut"  # the one-process run cut back to its step-2 checkpoint
    shutil.copytree(one, cut, symlinks=True)
    shutil.rmtree(cut / "checkpoints" / f"step-{steps:08d}")
    (cut / "checkpoints" / "latest").unlink(missing_ok=True)
    k2_train(*common, "--batch-size", "2", "--run-dir", str(cut), "--ep", "2", "--resume",
             "--allow-changes", ranks=2)

    a, c = losses(one), losses(cut)
    assert a.keys() == c.keys() == set(range(1, steps + 1))
    for step in (3, 4):
        assert c[step] == pytest.approx(a[step], abs=1e-3), step
    assert json.loads((cut / "config.json").read_text())["ep"] == 2
    assert json.loads((cut / "environment.json").read_text())["world_size"] == 2
    assert (cut / "samples.txt").read_text().startswith("--- sample 0 ---")  # drawn on rank 0
    want = checkpoint_weights(one / "checkpoints")
    got = checkpoint_weights(cut / "checkpoints")  # whole expert stacks
    # The ep run saved per rank (each rank its experts; docs/checkpoints.md, sharded checkpoints).
    meta = json.loads((cut / "checkpoints" / f"step-{steps:08d}" / "checkpoint.json").read_text())
    assert meta["written_by_ranks"] == 2
    assert sorted(p.name for p in (cut / "checkpoints").glob("step-*")) == ["step-00000002",
                                                                          "step-00000004"]
    for name, value in want.items():
        error = float((got[name] - value).norm() / value.norm().clamp_min(1e-12))
        assert error <= 1e-4, f"{name}: relative error {error:.2e}"
