"""MuonClip under DDP: 2 gloo processes on the CPU equal one process with the same global batch.

Exercises the three agreements: max logits (MAX: the ranks see different halves of the batch but
clip the same heads), expert loads (SUM, before the router-bias update) and the skip of a step
that is non-finite on one rank only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from dist_helpers import free_port
from k2.model import K2Config, K2ForCausalLM
from k2.optim import MuonClip

WORLD, STEPS, POISONED_STEP, TAU = 2, 4, 2, 0.05  # at step 0 each rank alone sees a different hot head


def small_model() -> K2ForCausalLM:
    config = dataclasses.replace(
        K2Config.from_preset("tiny"), vocab_size=256, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=2, n_routed_experts=4, kv_lora_rank=32,
        q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    torch.manual_seed(0)
    return K2ForCausalLM(config).train()


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, 256, (2 * WORLD, 12), generator=torch.Generator().manual_seed(100 + step))


def train(model: torch.nn.Module, opt: MuonClip, rank: int, world: int, poison_rank: int) -> list:
    """STEPS steps on this rank's share of each global batch; returns the step reports."""
    reports = []
    for step in range(STEPS):
        ids = global_batch(step).chunk(world)[rank]
        model(ids, labels=ids).loss.backward()
        if step == POISONED_STEP and rank == poison_rank:  # a fault on one rank, after the gradient all-reduce
            next(p for p in model.parameters() if p.ndim == 2).grad[0, 0] = float("nan")
        opt.step()
        opt.zero_grad()
        reports.append(opt.last_report)
    return reports


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(small_model())
        opt = MuonClip(model, lr=1e-2, qk_clip_tau=TAU, router_bias_rate=0.01)
        reports = train(model, opt, rank, WORLD, poison_rank=1)
        torch.save({"state": model.module.state_dict(), "reports": reports}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    single = small_model()
    opt = MuonClip(single, lr=1e-2, qk_clip_tau=TAU, router_bias_rate=0.01)
    reports = train(single, opt, rank=0, world=1, poison_rank=0)

    for rank in ranks:
        assert [r.skipped for r in rank["reports"]] == [s == POISONED_STEP for s in range(STEPS)]
        for mine, theirs in zip(rank["reports"], reports):
            assert [(l.name, l.clipped_heads) for l in mine.layers] == [(l.name, l.clipped_heads) for l in theirs.layers]
        for name, value in single.state_dict().items():
            torch.testing.assert_close(rank["state"][name], value, rtol=2e-4, atol=2e-6, msg=name)
    assert ranks[0]["reports"][POISONED_STEP].nonfinite == ()  # rank 0 was fine, and skipped anyway
    assert ranks[1]["reports"][POISONED_STEP].nonfinite != ()
    assert reports[0].layers[0].clipped_heads == 2, "TAU should make QK-Clip act where the ranks disagree"
    biases = [v for n, v in single.state_dict().items() if n.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)
