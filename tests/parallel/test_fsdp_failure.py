"""A sharded run's checkpoint and a rank lost mid-step.

Two gloo ranks train the FSDP2 model with DistributedMuonClip, save a checkpoint (whole tensors,
written by rank 0) after step 1, and rank 1 dies in the middle of step 2 (after its forward,
before its backward). Rank 0 must stop with a RankLostError naming rank 1 (not hang, not a bare
transport error), and the checkpoint must load — at world size 1, into the plain model and the
single-process MuonClip — and continue exactly as an uninterrupted single-process run.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_helpers import free_port
from k2 import checkpoint
from k2.optim import MuonClip
from test_fsdp import OPT, global_batch, small_model

WORLD = 2


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    from k2.errors import RankLostError
    from k2.optim.distributed import DistributedMuonClip
    from k2.parallel.failure import exit_after_rank_lost, named_failures
    from k2.parallel.fsdp import save_checkpoint, shard_model
    from k2.parallel.mesh import build_mesh

    model = shard_model(small_model(), build_mesh({"dp_shard": WORLD}, WORLD, torch.device("cpu")))
    opt = DistributedMuonClip(model, **OPT)
    try:
        for step in range(2):
            with named_failures(f"step {step + 1}", wait_s=3.0):
                ids = global_batch(step).chunk(WORLD)[rank]
                loss = model(ids, labels=ids).loss
                if step == 1 and rank == 1:
                    os._exit(7)  # killed mid-step
                loss.backward()
                opt.step()
                opt.zero_grad()
                if step == 0:
                    save_checkpoint(Path(out) / "ckpt", model, opt, {"step": 1})
    except RankLostError as err:
        (Path(out) / f"error{rank}.txt").write_text(str(err))
        exit_after_rank_lost(0)  # as `k2` does (with 1): no teardown of the broken group


@pytest.mark.slow
def test_rank_killed_mid_step_is_named_and_the_checkpoint_reshards_to_one_process(tmp_path: Path) -> None:
    ctx = mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    for proc in ctx.processes:
        proc.join(timeout=240)
    assert [p.exitcode for p in ctx.processes] == [0, 7]
    message = (tmp_path / "error0.txt").read_text()
    assert "rank 0: step 2 failed: rank 1 stopped responding" in message, message

    # The checkpoint of the 2-rank run loads into one process and continues as if never split.
    model = small_model()
    opt = MuonClip(model, **OPT)
    result = checkpoint.load(tmp_path / "ckpt", model, opt, restore_rng=False)
    assert result.train_state["step"] == 1
    ids = global_batch(1)
    model(ids, labels=ids).loss.backward()
    opt.step()

    reference = small_model()
    ref_opt = MuonClip(reference, **OPT)
    for step in range(2):
        ids = global_batch(step)
        reference(ids, labels=ids).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-5, msg=name)


def _resume_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from k2.optim.distributed import DistributedMuonClip
        from k2.parallel.fsdp import full_model_state, load_checkpoint, shard_model
        from k2.parallel.mesh import build_mesh

        model = shard_model(small_model(), build_mesh({"dp_shard": world}, world, torch.device("cpu")))
        opt = DistributedMuonClip(model, **OPT)
        result = load_checkpoint(Path(out) / "ckpt", model, opt, restore_rng=False)
        ids = global_batch(1).chunk(world)[rank]
        model(ids, labels=ids).loss.backward()
        opt.step()
        torch.save({"step": result.train_state["step"], "state": full_model_state(model)},
                   Path(out) / f"resumed{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_checkpoint_of_one_process_resumes_on_three_ranks(tmp_path: Path) -> None:
    """1 -> 3 ranks: uneven rows, a rank without experts; weights and optimizer state resharded."""
    model = small_model()
    opt = MuonClip(model, **OPT)
    ids = global_batch(0)
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    checkpoint.save(tmp_path / "ckpt", model, opt, {"step": 1})
    model(global_batch(1), labels=global_batch(1)).loss.backward()
    opt.step()  # the uninterrupted single-process run's step 2

    mp.spawn(_resume_worker, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        resumed = torch.load(tmp_path / f"resumed{rank}.pt", weights_only=False)
        assert resumed["step"] == 1
        for name, value in model.state_dict().items():
            torch.testing.assert_close(resumed["state"][name], value, rtol=1e-5, atol=1e-5, msg=name)
