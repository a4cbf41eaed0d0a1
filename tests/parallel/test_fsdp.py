"""FSDP2 + DistributedMuonClip on 2 gloo processes equal MuonClip on one process with the same
global batch; bytes held per rank fall as 1/N.

The single-process run is the plain, unsharded model with k2.optim.MuonClip: an independent
reference for the sharded forward/backward (FSDP2's all-gathers and reduce-scatters), the owner
exchange of the distributed Muon step, the sharded AdamW and the row-sharded QK-Clip.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_helpers import free_port
from k2.model import K2Config, K2ForCausalLM
from k2.optim import MuonClip

STEPS, TAU = 20, 0.05  # TAU this low makes QK-Clip act from the first step on (clipping on shards)
OPT = dict(lr=1e-2, qk_clip_tau=TAU, router_bias_rate=0.01)


def small_model() -> K2ForCausalLM:
    config = dataclasses.replace(
        K2Config.from_preset("tiny"), vocab_size=256, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=2, n_routed_experts=4, kv_lora_rank=32,
        q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    torch.manual_seed(0)
    return K2ForCausalLM(config).train()


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, 256, (12, 12), generator=torch.Generator().manual_seed(100 + step))  # splits 1-4 ways


def train(model, opt, rank: int, world: int, steps: int, on_step=None) -> list[float]:  # noqa: ANN001
    """``steps`` steps on this rank's share of each global batch; the global mean losses."""
    from k2.parallel import mean_over_ranks

    losses = []
    for step in range(steps):
        ids = global_batch(step).chunk(world)[rank]
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step)
        opt.zero_grad()
        losses.append(mean_over_ranks(loss.detach()))
    return losses


def _worker(rank: int, world: int, port: int, out: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from k2.optim.distributed import DistributedMuonClip
        from k2.parallel.fsdp import bytes_per_rank, full_model_state, shard_model
        from k2.parallel.mesh import build_mesh

        model = shard_model(small_model(), build_mesh({"dp_shard": world}, world, torch.device("cpu")))
        opt = DistributedMuonClip(model, **OPT)
        record: dict = {}

        def on_step(step: int) -> None:
            if step == 0:
                record["bytes"] = bytes_per_rank(model, opt)  # after a step: gradients and states held
                record["first"] = full_model_state(model)
                record["clipped"] = opt.last_report.clipped_heads

        record["losses"] = train(model, opt, rank, world, steps, on_step)
        record["final"] = full_model_state(model)
        record["owners"] = opt.owners
        torch.save(record, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path: Path, world: int, steps: int) -> list[dict]:
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path), steps), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def reference(steps: int) -> dict:
    """The single process: bare model, MuonClip, the whole global batch each step."""
    from k2.parallel.fsdp import bytes_per_rank

    model = small_model()
    opt = MuonClip(model, **OPT)
    record: dict = {}

    def on_step(step: int) -> None:
        if step == 0:
            record["bytes"] = bytes_per_rank(model, opt)
            record["first"] = {k: v.clone() for k, v in model.state_dict().items()}
            record["clipped"] = opt.last_report.clipped_heads

    record["losses"] = train(model, opt, 0, 1, steps, on_step)
    record["final"] = model.state_dict()
    return record


@pytest.mark.slow
def test_fsdp2_muonclip_two_ranks_equal_one_process(tmp_path: Path) -> None:
    ranks = run_ranks(tmp_path, 2, STEPS)
    single = reference(STEPS)

    assert single["clipped"] > 0, "TAU should make QK-Clip clip heads at the first step"
    for rank in ranks:
        assert rank["clipped"] == single["clipped"]
        for name, value in single["first"].items():  # one step
            torch.testing.assert_close(rank["first"][name], value, rtol=1e-5, atol=1e-5, msg=name)
        assert len(rank["losses"]) == STEPS
        for mine, theirs in zip(rank["losses"], single["losses"]):  # stricter than 1e-3 absolute
            assert mine == pytest.approx(theirs, rel=1e-4)
        for name, value in single["final"].items():  # 20 steps
            torch.testing.assert_close(rank["final"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # Every hidden matrix has one owner, and both ranks do Newton–Schulz work.
    assert ranks[0]["owners"] == ranks[1]["owners"]
    assert set(ranks[0]["owners"].values()) == {0, 1}

    # Memory: each of 2 ranks holds half of the single process's parameters, gradients and
    # optimizer states (within 10 %).
    for kind in ("parameters", "gradients", "optimizer"):
        per_rank = [rank["bytes"][kind] for rank in ranks]
        assert abs(sum(per_rank) - single["bytes"][kind]) <= 0.1 * single["bytes"][kind], kind
        assert all(abs(b * 2 - single["bytes"][kind]) <= 0.1 * single["bytes"][kind] for b in per_rank), kind


def test_bytes_per_rank_counts_what_one_process_holds() -> None:
    """N = 1: fp32 parameters and gradients, one momentum buffer per Muon parameter, two moments
    (and a step count) per AdamW parameter."""
    from k2.parallel.fsdp import bytes_per_rank

    model = small_model()
    opt = MuonClip(model, **OPT)
    ids = global_batch(0)
    model(ids, labels=ids).loss.backward()
    opt.step()
    numel = sum(p.numel() for p in model.parameters())
    muon = sum(p.numel() for _, p in opt.split.muon)
    adamw = sum(p.numel() for _, p in opt.split.adamw)
    assert bytes_per_rank(model, opt) == {
        "parameters": 4 * numel, "gradients": 4 * numel,
        "optimizer": 4 * muon + 8 * adamw + 4 * len(opt.split.adamw)}
    assert bytes_per_rank(model)["optimizer"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("world", [3, 4])
def test_three_and_four_ranks_take_the_same_step_and_split_the_bytes(tmp_path: Path, world: int) -> None:
    """3 ranks cut rows unevenly (64 -> 22, 22, 20) and leave the last rank no expert of the
    4-expert stacks; 4 ranks cut every dimension evenly and hold a quarter each."""
    ranks = run_ranks(tmp_path, world, 1)
    single = reference(1)
    for rank in ranks:
        for name, value in single["first"].items():
            torch.testing.assert_close(rank["first"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert set(ranks[0]["owners"].values()) == set(range(world))
    for kind in ("parameters", "gradients"):  # the shards add up to the whole, nothing twice
        assert sum(rank["bytes"][kind] for rank in ranks) == single["bytes"][kind]
    if world == 4:
        for kind in ("parameters", "gradients", "optimizer"):
            for rank in ranks:
                assert abs(rank["bytes"][kind] * 4 - single["bytes"][kind]) <= 0.1 * single["bytes"][kind], kind
