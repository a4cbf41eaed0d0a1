"""Per-rank checkpoints of a sharded run (k2.parallel.sharded_checkpoint; docs/checkpoints.md).

Every rank writes its own rows, rank 0 commits one manifest; loading at another world size reads
only the rows a rank owns. The reference is one plain process with k2.optim.MuonClip on the same
global batches: a run saved on 2 FSDP2 ranks, resumed on 3, saved again and resumed in one
plain process through k2.checkpoint.load continues the uninterrupted run's losses; the same for
expert parallelism 2 -> 1. A rank killed between its writes and the commit leaves the previous
checkpoint the newest and loadable.
"""

from __future__ import annotations

import datetime
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dist_helpers import free_port
from k2 import _native, checkpoint
from k2.checkpoint.tensors import TORCH_DTYPES
from k2.cli import main
from k2.errors import CheckpointError, K2Error
from k2.optim import MuonClip
from test_fsdp import OPT, global_batch, small_model

CHUNK = 256  # small checksum chunks, so what a slice read hashes is close to what it asks for


def _init(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _fsdp(world: int):  # noqa: ANN202
    from k2.optim.distributed import DistributedMuonClip
    from k2.parallel.fsdp import shard_model
    from k2.parallel.mesh import build_mesh

    model = shard_model(small_model(), build_mesh({"dp_shard": world}, world, torch.device("cpu")))
    return model, DistributedMuonClip(model, **OPT)


def _step(model, opt, step: int, rank: int, world: int) -> float:  # noqa: ANN001
    from k2.parallel import mean_over_ranks

    ids = global_batch(step).chunk(world)[rank]
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return mean_over_ranks(loss.detach())


def _two_ranks(rank: int, port: int, out: str) -> None:
    """Steps 1-2 on 2 FSDP2 ranks, then a per-rank checkpoint (and a gathered one of the same
    weights, for the Hub export comparison)."""
    _init(rank, 2, port)
    try:
        from k2.parallel.fsdp import save_checkpoint, unsharded_copy

        model, opt = _fsdp(2)
        losses = [_step(model, opt, s, rank, 2) for s in range(2)]
        path = save_checkpoint(Path(out) / "two", model, opt, {"step": 2}, per_rank=True, chunk_bytes=CHUNK)
        bare = unsharded_copy(model, on_rank=0)
        if rank == 0:
            checkpoint.save(Path(out) / "gathered", bare, None, {"step": 2})
            torch.save({"losses": losses, "path": str(path)}, Path(out) / "two.pt")
    finally:
        dist.destroy_process_group()


def _three_ranks(rank: int, port: int, out: str) -> None:
    """Resume the 2-rank checkpoint on 3 ranks (each reads only its rows), step 3, save again."""
    _init(rank, 3, port)
    try:
        from k2.parallel.fsdp import bytes_per_rank, save_checkpoint
        from k2.parallel.sharded_checkpoint import load_sharded

        model, opt = _fsdp(3)
        result = load_sharded(Path(out) / "two", model, opt, restore_rng=False)
        held = bytes_per_rank(model, opt)
        loss = _step(model, opt, 2, rank, 3)
        save_checkpoint(Path(out) / "three", model, opt, {"step": 3}, per_rank=True, chunk_bytes=CHUNK)
        torch.save({"loss": loss, "step": result.train_state["step"], "bytes_read": result.bytes_read,
                    "held": held["parameters"] + held["optimizer"]}, Path(out) / f"three{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference(steps: int) -> tuple[torch.nn.Module, list[float]]:
    model = small_model()
    opt = MuonClip(model, **OPT)
    losses = [_step(model, opt, s, 0, 1) for s in range(steps)]
    return model, losses


@pytest.mark.slow
def test_fsdp_two_to_three_to_one_rank_continues_the_single_process_run(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    mp.spawn(_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    mp.spawn(_three_ranks, args=(free_port(), str(tmp_path)), nprocs=3, join=True)
    reference, ref_losses = _reference(4)

    two = torch.load(tmp_path / "two.pt", weights_only=False)
    threes = [torch.load(tmp_path / f"three{r}.pt", weights_only=False) for r in range(3)]
    assert two["losses"] == pytest.approx(ref_losses[:2], rel=1e-4)
    assert all(t["step"] == 2 for t in threes)
    assert threes[0]["loss"] == pytest.approx(ref_losses[2], rel=1e-4)

    # The 2-rank checkpoint is one checkpoint: one manifest whose pieces come from both ranks.
    reader = checkpoint.CheckpointReader(tmp_path / "two")
    reader.verify()
    files = {t.name: t.file for t in reader._native.tensors()}
    q = "model.layers.0.self_attn.q_b_proj.weight"
    rows = reader.info(q)[1][0]
    pieces = reader.pieces(q)
    assert [p[1:] for p in pieces] == [(0, rows // 2), (rows // 2, rows)]
    assert len({files[p[0]] for p in pieces}) == 2  # one shard file per rank
    assert _native.read_latest(tmp_path / "two") == "step-00000002"

    # Each of the 3 ranks read (and hashed) what it holds — its rows of the parameters and optimizer
    # states, torch.chunk's uneven thirds — plus what every rank reads whole (training state, JSON):
    # slice reads of its rows only. Measured: 0.39, 0.39 and 0.29 of the tensor bytes.
    total = sum(_nbytes(reader, n) for n in reader.names())
    read = [t["bytes_read"] for t in threes]
    for rank, three in enumerate(threes):
        assert three["held"] <= three["bytes_read"] <= three["held"] + 0.1 * total / 3, (rank, three, total)
    assert sum(read) < 1.1 * total

    # 3 -> 1: the 3-rank checkpoint loads in one plain process (k2.checkpoint.load) and continues.
    model = small_model()
    opt = MuonClip(model, **OPT)
    result = checkpoint.load(tmp_path / "three", model, opt, restore_rng=False)
    assert result.train_state["step"] == 3
    last = _step(model, opt, 3, 0, 1)
    assert last == pytest.approx(ref_losses[3], rel=1e-4)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)

    # `k2 ckpt` reads it as any checkpoint: every byte verifies, inspect lists whole tensors.
    assert main(["ckpt", "verify", str(tmp_path / "two")]) == 0
    assert main(["ckpt", "inspect", str(tmp_path / "two"), "--tensors"]) == 0
    listing = capsys.readouterr().out
    assert f"{q} " in listing and "#rows=" not in listing
    # The Hub export of the sharded checkpoint holds exactly the tensors of the gathered one.
    assert main(["ckpt", "export-hf", str(tmp_path / "two"), str(tmp_path / "hub-sharded")]) == 0
    checkpoint.export_hf(tmp_path / "gathered", tmp_path / "hub-gathered", log=lambda _: None)
    sharded, gathered = _hub_tensors(tmp_path / "hub-sharded"), _hub_tensors(tmp_path / "hub-gathered")
    assert sharded.keys() == gathered.keys() and len(sharded) > 20
    for name, value in gathered.items():
        assert torch.equal(sharded[name], value), name


def _nbytes(reader: checkpoint.CheckpointReader, name: str) -> int:
    dtype, shape, _ = reader.info(name)
    return math.prod(shape) * TORCH_DTYPES[dtype].itemsize


def _hub_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _expert_ranks(rank: int, port: int, out: str) -> None:
    """Steps 1-2 with the experts split over 2 ranks, then a per-rank checkpoint."""
    _init(rank, 2, port)
    try:
        from k2.parallel.expert import parallelize_experts
        from k2.parallel.sharded_checkpoint import load_sharded, save_sharded

        wrapped = parallelize_experts(small_model())
        model = wrapped.module
        opt = MuonClip(wrapped, **OPT)
        losses = [_step(wrapped, opt, s, rank, 2) for s in range(2)]
        save_sharded(Path(out) / "ep", model, opt, {"step": 2}, chunk_bytes=CHUNK)
        # Read back at the same layout: each rank gets exactly its experts and moments.
        again = parallelize_experts(small_model()).module
        opt_again = MuonClip(again, **OPT)
        load_sharded(Path(out) / "ep", again, opt_again, restore_rng=False)
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
        moments = [(s["momentum_buffer"] if "momentum_buffer" in s else s["exp_avg"])
                   for s in opt.state.values()]
        moments_again = [(s["momentum_buffer"] if "momentum_buffer" in s else s["exp_avg"])
                         for s in opt_again.state.values()]
        same = same and all(torch.equal(a, b) for a, b in zip(moments, moments_again))
        torch.save({"losses": losses, "same": same}, Path(out) / f"ep{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_expert_parallel_two_ranks_to_one_process(tmp_path: Path) -> None:
    mp.spawn(_expert_ranks, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    reference, ref_losses = _reference(4)
    for rank in range(2):
        got = torch.load(tmp_path / f"ep{rank}.pt", weights_only=False)
        assert got["same"], rank
        assert got["losses"] == pytest.approx(ref_losses[:2], abs=1e-3)

    reader = checkpoint.CheckpointReader(tmp_path / "ep")
    reader.verify()
    files = {t.name: t.file for t in reader._native.tensors()}
    # Each expert is a whole Hub tensor written by the rank that holds it (experts 0-1: rank 0's
    # shard file, 2-3: rank 1's); the momentum of a stack is stored in two row pieces.
    expert = "model.layers.1.mlp.experts.{}.gate_proj.weight"
    assert reader.pieces(expert.format(3)) == [(expert.format(3), 0, reader.info(expert.format(3))[1][0])]
    assert files[expert.format(0)] == files[expert.format(1)] != files[expert.format(2)] == files[expert.format(3)]
    pieced = [n for n in reader.names("optimizer") if len(reader.pieces(n)) > 1]
    assert pieced and all(reader.info(n)[1][0] == 4 for n in pieced)  # [E, ...] stacks

    model = small_model()
    opt = MuonClip(model, **OPT)
    checkpoint.load(tmp_path / "ep", model, opt, restore_rng=False)
    losses = [_step(model, opt, s, 0, 1) for s in (2, 3)]
    assert losses == pytest.approx(ref_losses[2:], abs=1e-3)
    for name, value in reference.state_dict().items():
        error = float((model.state_dict()[name] - value).norm() / value.norm().clamp_min(1e-12))
        assert error <= 1e-4, (name, error)


def _killed_before_commit(rank: int, port: int, out: str) -> None:
    """A per-rank checkpoint at step 1; at step 2 rank 1 dies once its shards are written and
    fsynced, before rank 0 could commit."""
    _init(rank, 2, port, timeout_s=20)
    from k2.errors import RankLostError
    from k2.parallel.failure import exit_after_rank_lost, named_failures
    from k2.parallel.fsdp import save_checkpoint

    model, opt = _fsdp(2)
    _step(model, opt, 0, rank, 2)
    # A value rank 0 cannot save fails the save on every rank (none waits in a collective).
    try:
        save_checkpoint(Path(out) / "ckpt", model, opt, {"step": 1, "bad": {1, 2}}, per_rank=True)
    except CheckpointError as err:
        (Path(out) / f"refused{rank}.txt").write_text(str(err))
    save_checkpoint(Path(out) / "ckpt", model, opt, {"step": 1}, per_rank=True)
    _step(model, opt, 1, rank, 2)
    if rank == 1:
        os.environ["K2_CKPT_FAULT"] = "shards_synced"  # SIGKILL inside the native writer
    try:
        with named_failures("step 2", wait_s=3.0):  # as the training loop wraps its saves
            save_checkpoint(Path(out) / "ckpt", model, opt, {"step": 2}, per_rank=True)
    except RankLostError as err:  # the survivor names the lost rank
        (Path(out) / f"error{rank}.txt").write_text(str(err))
        exit_after_rank_lost(0)  # as `k2` does (with 1): no teardown of the broken group


@pytest.mark.slow
def test_a_rank_killed_between_its_writes_and_the_commit_leaves_the_last_checkpoint(tmp_path: Path) -> None:
    ctx = mp.spawn(_killed_before_commit, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    for proc in ctx.processes:
        proc.join(timeout=120)
    assert ctx.processes[1].exitcode == -9  # SIGKILL
    assert ctx.processes[0].exitcode == 0
    message = (tmp_path / "error0.txt").read_text()
    assert "rank 0: step 2 failed: rank 1 stopped responding" in message, message

    for rank in range(2):
        refused = (tmp_path / f"refused{rank}.txt").read_text()
        assert "rank 0 cannot save: CheckpointError: cannot save 'train_state/user/bad'" in refused, refused
    root = tmp_path / "ckpt"
    assert _native.read_latest(root) == "step-00000001"
    assert _native.list_checkpoints(root) == ["step-00000001"]
    staged = [p.name for p in root.iterdir() if p.name.startswith(".k2-tmp-")]
    assert staged == [".k2-tmp-step-00000002"]  # rank 1's shards, never published
    model = small_model()
    opt = MuonClip(model, **OPT)
    result = checkpoint.load(root, model, opt, restore_rng=False)  # verified, whole
    assert result.train_state["step"] == 1
    reference, _ = _reference(1)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------------- bad input (one process)


def _write_pieced(final: Path, pieces: list[tuple[str, str, int, int]], rows: torch.Tensor) -> None:
    """A checkpoint holding ``w`` [4, 3] in two pieces, one shard each, with the pieces given."""
    from k2.checkpoint.tensors import entry

    writer = _native.CheckpointWriter(final, chunk_bytes=16)
    writer.write_shards([
        ("model-00001-of-00002.safetensors", "model", [entry("w#rows=0:2", rows[:2].contiguous())]),
        ("model-00002-of-00002.safetensors", "model", [entry("w#rows=2:4", rows[2:].contiguous())]),
    ])
    writer.add_pieces("w", "F32", [4, 3], pieces)
    writer.commit(publish_latest=True)


GOOD = [("model-00001-of-00002.safetensors", "w#rows=0:2", 0, 2),
        ("model-00002-of-00002.safetensors", "w#rows=2:4", 2, 4)]


def test_a_pieced_tensor_reads_whole_and_by_rows_across_pieces(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    rows = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    _write_pieced(tmp_path / "step-1", GOOD, rows)
    reader = checkpoint.CheckpointReader(tmp_path)
    assert reader.names() == ["w"] and reader.info("w")[:2] == ("F32", [4, 3])
    assert torch.equal(reader.tensor("w"), rows)
    assert torch.equal(reader.rows("w", 1, 3), rows[1:3])  # across the two pieces
    assert torch.equal(reader.rows("w", 2, 4), rows[2:])
    assert reader.rows("w", 2, 2).shape == (0, 3)
    before = reader.bytes_read
    reader.rows("w", 2, 3)  # bytes 0..12 of the second piece
    assert reader.bytes_read - before == 16  # its first 16-byte chunk, nothing of the first piece
    with pytest.raises(CheckpointError, match="out of range"):
        reader.rows("w", 3, 5)
    assert main(["ckpt", "inspect", str(tmp_path), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "2 shard file(s)" in out and "1 tensors stored in row pieces" in out
    assert re.search(r"\n    w +F32 +\[4, 3\] +2 row pieces\n", out), out


@pytest.mark.parametrize("pieces, message", [
    (GOOD[:1], r'tensor "w": rows 2..4 are in no piece'),
    ([GOOD[0], ("model-00002-of-00002.safetensors", "w#rows=2:4", 1, 3)],
     r'tensor "w": piece "w#rows=2:4" \(rows 1..3\) in model-00002-of-00002.safetensors overlaps piece '
     r'"w#rows=0:2" \(rows 0..2\) in model-00001-of-00002.safetensors'),
    ([GOOD[0], ("model-00003-of-00003.safetensors", "w#rows=2:4", 2, 4)],
     r'no shard "model-00003-of-00003.safetensors"'),
])
def test_a_manifest_whose_pieces_overlap_leave_a_gap_or_name_no_shard_is_refused(
        tmp_path: Path, pieces: list, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as err:
        _write_pieced(tmp_path / "step-1", pieces, torch.zeros(4, 3))
    assert isinstance(err.value, K2Error)
    assert not (tmp_path / "latest").exists()  # nothing was published


def test_a_missing_piece_file_is_named_with_its_tensor(tmp_path: Path) -> None:
    _write_pieced(tmp_path / "step-1", GOOD, torch.zeros(4, 3))
    (tmp_path / "step-1" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r'model-00002-of-00002.safetensors: the shard is missing: .*'
                                              r'"w#rows=2:4" \(rows of "w"\)'):
        checkpoint.CheckpointReader(tmp_path)


def _mesh_ranks(rank: int, port: int, out: str) -> None:
    """dp_shard 2 x ep 2: two steps, then the same state saved per rank and gathered; the per-rank
    checkpoint read back on a fresh mesh must hold exactly the state that was saved."""
    _init(rank, 4, port)
    try:
        from test_expert import moe_model

        from k2.optim.distributed import DistributedMuonClip
        from k2.parallel import fsdp
        from k2.parallel.fsdp_ep import parallelize
        from k2.parallel.mesh import build_mesh
        from k2.parallel.sharded_checkpoint import load_sharded, save_sharded

        mesh = build_mesh({"dp_shard": 2, "ep": 2}, 4, torch.device("cpu"))
        model = parallelize(moe_model(), mesh)
        opt = DistributedMuonClip(model, **OPT)
        for step in range(2):
            ids = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(step)).chunk(4)[rank]
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        saved = (fsdp.full_model_state(model), fsdp.full_optimizer_state(opt)["state"])
        save_sharded(Path(out) / "per-rank", model, opt, {"step": 2}, chunk_bytes=CHUNK)
        fsdp.save_checkpoint(Path(out) / "gathered", model, opt, {"step": 2})

        again = parallelize(moe_model(), mesh)
        opt_again = DistributedMuonClip(again, **OPT)
        load_sharded(Path(out) / "per-rank", again, opt_again, restore_rng=False)
        model_same = all(torch.equal(saved[0][k], v) for k, v in fsdp.full_model_state(again).items())
        state = fsdp.full_optimizer_state(opt_again)["state"]
        opt_same = all(torch.equal(saved[1][i][k], v) for i, s in state.items() for k, v in s.items()
                       if isinstance(v, torch.Tensor))
        torch.save({"model_same": model_same, "opt_same": opt_same}, Path(out) / f"mesh{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_x_ep_mesh_per_rank_checkpoint_equals_the_gathered_one(tmp_path: Path) -> None:
    from test_expert import moe_model

    mp.spawn(_mesh_ranks, args=(free_port(), str(tmp_path)), nprocs=4, join=True)
    for rank in range(4):
        assert torch.load(tmp_path / f"mesh{rank}.pt", weights_only=False) == {"model_same": True,
                                                                                "opt_same": True}, rank
    # In one plain process both checkpoints give exactly the same model and optimizer state.
    loaded = []
    for name in ("per-rank", "gathered"):
        model = moe_model()
        opt = MuonClip(model, **OPT)
        checkpoint.load(tmp_path / name, model, opt, restore_rng=False)
        loaded.append((model.state_dict(), opt.state_dict()["state"]))
    (m1, s1), (m2, s2) = loaded
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert s1.keys() == s2.keys()
    for i in s1:
        for k, v in s1[i].items():
            assert torch.equal(v, s2[i][k]), (i, k)
    # Every expert is a whole tensor written by one of the 4 ranks; dense rows come in 4 pieces.
    reader = checkpoint.CheckpointReader(tmp_path / "per-rank")
    assert len(reader.shard_files()) >= 4
    assert max(len(reader.pieces(n)) for n in reader.names()) == 4
