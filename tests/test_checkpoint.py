"""k2.checkpoint: round trips, interop with the safetensors package, slices, strictness, pruning."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from k2 import _native, checkpoint
from k2.errors import CheckpointError


class Tiny(torch.nn.Module):
    """Parameters of several dtypes and ranks, a buffer, and stacked 'experts'."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 12)
        self.proj = torch.nn.Linear(12, 12)
        self.experts = torch.nn.Parameter(torch.randn(4, 6, 12))
        self.scale = torch.nn.Parameter(torch.tensor(1.5))
        self.small = torch.nn.Parameter(torch.randn(7, 3).to(torch.bfloat16))
        self.register_buffer("counts", torch.arange(5, dtype=torch.int64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.embed(ids)) * self.scale
        return torch.einsum("btd,eid->btei", x, self.experts).sum() + self.small.float().sum()


def trained(seed: int = 0) -> tuple[Tiny, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randint(0, 50, (2, 5))).backward()
        optimizer.step()
    return model, optimizer


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_model_optimizer_and_train_state_come_back_bit_identical(tmp_path: Path) -> None:
    model, optimizer = trained(0)
    state = {"step": 3, "loader": {"epoch": 1, "order": np.arange(6, dtype=np.int64), "pos": (2, 5)},
             "lr": 1e-2 / 3, "tokens": torch.tensor([1, 2, 3])}
    random.seed(7)
    np.random.seed(7)
    path = checkpoint.save(tmp_path, model, optimizer, state)
    assert path == tmp_path / "step-00000003"
    after_save = (torch.rand(3), np.random.rand(), random.random())

    fresh, fresh_opt = trained(1)
    torch.manual_seed(99)
    result = checkpoint.load(tmp_path, fresh, fresh_opt)
    assert_same_tensors(model.state_dict(), fresh.state_dict())
    saved, loaded = optimizer.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys()
    for index in saved["state"]:
        assert_same_tensors(saved["state"][index], loaded["state"][index])
    assert result.train_state["step"] == 3 and result.train_state["lr"] == state["lr"]
    assert result.train_state["loader"]["pos"] == (2, 5)
    np.testing.assert_array_equal(result.train_state["loader"]["order"], np.arange(6))
    assert torch.equal(result.train_state["tokens"], state["tokens"])
    # The RNG states were restored: the same draws follow as right after the save.
    assert torch.equal(torch.rand(3), after_save[0])
    assert (np.random.rand(), random.random()) == after_save[1:]
    # The next training step is identical too.
    ids = torch.randint(0, 50, (2, 5))
    for m, o in ((model, optimizer), (fresh, fresh_opt)):
        o.zero_grad()
        m(ids).backward()
        o.step()
    assert_same_tensors(model.state_dict(), fresh.state_dict())


def test_shards_are_read_identically_by_the_safetensors_package(tmp_path: Path) -> None:
    model, optimizer = trained()
    path = checkpoint.save(tmp_path, model, optimizer, max_shard_bytes=512)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    reference = {}
    for file in files:
        reference.update(safetensors.torch.load_file(path / file))
    assert_same_tensors(reference, model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference.values())


def test_a_checkpoint_loads_whatever_shard_count_saved_it(tmp_path: Path) -> None:
    model, _ = trained()
    for max_shard in (256, 1 << 30):
        checkpoint.save(tmp_path / str(max_shard), model, step=1, max_shard_bytes=max_shard)
        fresh, _ = trained(5)
        checkpoint.load(tmp_path / str(max_shard), fresh)
        assert_same_tensors(model.state_dict(), fresh.state_dict())


def test_latest_and_keep_last(tmp_path: Path) -> None:
    model, _ = trained()
    for step in range(1, 5):
        checkpoint.save(tmp_path, model, train_state={"step": step}, keep_last=2)
    assert _native.list_checkpoints(tmp_path) == ["step-00000003", "step-00000004"]
    assert checkpoint.resolve(tmp_path) == tmp_path / "step-00000004"
    assert checkpoint.load(tmp_path, model).train_state == {"step": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003", "step-00000004"]
    assert checkpoint.save(tmp_path, model).name == "step-00000005"  # no step given: the next one


def test_an_existing_checkpoint_is_not_overwritten(tmp_path: Path) -> None:
    model, _ = trained()
    checkpoint.save(tmp_path, model, step=1)
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.save(tmp_path, model, step=1)


def test_save_order_makes_every_file_durable_before_the_rename(tmp_path: Path) -> None:
    model, optimizer = trained()
    checkpoint.save(tmp_path, model, optimizer, keep_last=1, step=1)
    events: list = []
    final = checkpoint.save(tmp_path, model, optimizer, keep_last=1, step=2, events=events)
    ops = [(e.op, Path(e.path), e.target and Path(e.target)) for e in events]
    rename = next(i for i, (op, _, to) in enumerate(ops) if op == "rename" and to == final)
    tmp = ops[rename][1]
    for file in final.iterdir():
        written = ops.index(("write", tmp / file.name, None))
        synced = ops.index(("fsync", tmp / file.name, None))
        assert written < synced < rename, file.name
    assert ops.index(("dir_fsync", tmp, None)) < rename
    root_syncs = [i for i, e in enumerate(ops) if e == ("dir_fsync", tmp_path, None)]
    latest = next(i for i, (op, _, to) in enumerate(ops) if op == "rename" and to == tmp_path / "latest")
    assert root_syncs[0] == rename + 1 and any(i > latest for i in root_syncs)
    pruned = ops.index(("remove", tmp_path / ".k2-trash-step-00000001", None))
    assert pruned > latest  # the old checkpoint goes only after the new one is published


def test_strict_load_lists_missing_unexpected_and_misshapen_tensors(tmp_path: Path) -> None:
    model, _ = trained()
    checkpoint.save(tmp_path, model, step=1)

    class Other(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(12, 8)  # wrong shape
            self.extra = torch.nn.Parameter(torch.zeros(2))  # missing from the checkpoint
            del self.small  # in the checkpoint, not in the model

    other = Other()
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(tmp_path, other)
    message = str(err.value)
    for name in ("extra", "small", "proj.weight", "proj.bias"):
        assert name in message
    before = other.embed.weight.clone()
    result = checkpoint.load(tmp_path, other, strict=False)
    assert result.missing == ["extra"] and result.unexpected == ["small"]
    assert set(result.mismatched) == {"proj.weight", "proj.bias"}
    assert result.mismatched["proj.weight"] == ([12, 12], [8, 12])
    assert not torch.equal(before, other.embed.weight)
    assert torch.equal(other.embed.weight, model.embed.weight)


def test_a_missing_optimizer_state_is_an_error_only_when_strict(tmp_path: Path) -> None:
    model, optimizer = trained()
    checkpoint.save(tmp_path, model, step=1)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        checkpoint.load(tmp_path, model, optimizer)
    checkpoint.load(tmp_path, model, optimizer, strict=False)


def test_a_row_slice_reads_and_verifies_only_its_chunks(tmp_path: Path) -> None:
    class Wide(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(1024, 256))  # 1 KiB rows, 1 MiB

    model = Wide()
    checkpoint.save(tmp_path, model, step=1, chunk_bytes=16 << 10)
    reader = checkpoint.CheckpointReader(tmp_path)
    rows = reader.rows("table", 100, 110)
    assert torch.equal(rows, model.table.detach()[100:110])
    # Rows 100..110 are bytes 102400..112640: chunks 6 (98304..114688) only.
    assert reader.bytes_read == 16 << 10
    whole = reader.tensor("table")
    assert torch.equal(whole, model.table.detach())
    assert reader.bytes_read == (16 << 10) + (1 << 20)


def test_a_subset_of_experts_is_read_without_the_others(tmp_path: Path) -> None:
    class Experts(torch.nn.Module):
        """Per-expert tensors under Hub names, like k2's to_hf_state_dict gives."""

        def __init__(self) -> None:
            super().__init__()
            self.stack = torch.nn.Parameter(torch.randn(8, 64, 32))

        def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
            return {f"model.layers.1.mlp.experts.{e}.up_proj.weight": self.stack[e] for e in range(8)}

    model = Experts()
    checkpoint.save(tmp_path, model, step=1, chunk_bytes=4096)
    reader = checkpoint.CheckpointReader(tmp_path)
    picked = reader.experts(layer=1, experts=[2, 5])
    assert sorted(picked) == [f"model.layers.1.mlp.experts.{e}.up_proj.weight" for e in (2, 5)]
    for e in (2, 5):
        assert torch.equal(picked[f"model.layers.1.mlp.experts.{e}.up_proj.weight"], model.stack[e].detach())
    assert reader.bytes_read == 2 * 64 * 32 * 4


def test_loaded_tensors_share_the_memory_map(tmp_path: Path) -> None:
    model, _ = trained()
    checkpoint.save(tmp_path, model, step=1)
    reader = checkpoint.CheckpointReader(tmp_path)
    a = reader.tensor("embed.weight")
    b = reader.tensor("embed.weight", verify=False)
    assert a.data_ptr() == b.data_ptr()  # both views of the same mapped bytes: no copy
    a.zero_()  # private mapping: the file is untouched, a re-verification sees the change
    fresh = checkpoint.CheckpointReader(tmp_path)
    assert torch.equal(fresh.tensor("embed.weight"), model.embed.weight.detach())
    with pytest.raises(CheckpointError, match="embed.weight"):
        reader.tensor("embed.weight")


def test_an_optimizer_state_for_other_parameters_is_a_checkpoint_error(tmp_path: Path) -> None:
    model, optimizer = trained()
    checkpoint.save(tmp_path, model, optimizer, step=1)
    other = torch.optim.AdamW(list(model.parameters())[:2])
    with pytest.raises(CheckpointError, match="AdamW"):
        checkpoint.load(tmp_path, model, other)
