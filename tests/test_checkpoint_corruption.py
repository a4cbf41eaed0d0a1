"""Corrupt and malformed checkpoints give clear errors that name the file and tensor."""

from __future__ import annotations

import json
import os
import resource
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from k2 import checkpoint
from k2.cli import main
from k2.errors import CheckpointError


class Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Parameter(torch.randn(64, 64))
        self.second = torch.nn.Parameter(torch.randn(64, 64))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return checkpoint.save(tmp_path / "root", Two(), step=1, chunk_bytes=4096)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_byte_names_the_shard_and_the_tensor(saved: Path, capsys: pytest.CaptureFixture) -> None:
    shard = saved / "model-00001-of-00001.safetensors"
    reader = checkpoint.CheckpointReader(saved)
    header = 8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]
    meta = json.loads(shard.read_bytes()[8:header])
    start = header + meta["second"]["data_offsets"][0]
    del reader
    flip_byte(shard, start + 5000)  # chunk 1 of "second"
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(saved, Two())
    message = str(err.value)
    assert "model-00001-of-00001.safetensors" in message and '"second"' in message and "chunk 1" in message
    # The command says the same and exits 1.
    assert main(["ckpt", "verify", str(saved)]) == 1
    assert '"second"' in capsys.readouterr().err
    # The undamaged tensor still reads.
    reader = checkpoint.CheckpointReader(saved)
    assert reader.tensor("first").shape == (64, 64)


def test_a_corrupt_json_file_is_caught(saved: Path) -> None:
    path = saved / "train_state.json"
    path.write_bytes(path.read_bytes().replace(b"{", b"[", 1))
    with pytest.raises(CheckpointError, match="train_state.json"):
        checkpoint.load(saved, Two())


def test_a_truncated_shard_is_a_clear_error(saved: Path) -> None:
    shard = saved / "model-00001-of-00001.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="model-00001-of-00001.safetensors.*truncated"):
        checkpoint.CheckpointReader(saved)


def hub_dir(tmp_path: Path) -> Path:
    """A directory of plain safetensors files (no manifest), as the Hub ships them."""
    hub = tmp_path / "hub"
    hub.mkdir()
    safetensors.torch.save_file({"w": torch.randn(16, 16)}, hub / "model.safetensors")
    return hub


@pytest.mark.parametrize(
    ("length", "message"),
    [(1 << 62, "exceeds the 100000000-byte limit"), (200_000_000, "exceeds"), (50_000, "past the end of the file")],
)
def test_an_absurd_header_length_fails_fast_without_allocating_it(tmp_path: Path, length: int, message: str) -> None:
    hub = hub_dir(tmp_path)
    path = hub / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", length) + data[8:])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=message) as err:
        checkpoint.CheckpointReader(hub)
    assert "model.safetensors" in str(err.value)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 50_000  # nowhere near the claimed header size


def test_files_too_short_for_a_header_are_reported(tmp_path: Path) -> None:
    hub = hub_dir(tmp_path)
    for size in (0, 5):
        (hub / "model.safetensors").write_bytes(b"\x01" * size)
        with pytest.raises(CheckpointError, match="too short"):
            checkpoint.CheckpointReader(hub)


def test_a_hub_directory_reads_but_cannot_be_verified(tmp_path: Path) -> None:
    hub = hub_dir(tmp_path)
    reader = checkpoint.CheckpointReader(hub)
    assert not reader.has_manifest
    assert reader.tensor("w", verify=False).shape == (16, 16)
    with pytest.raises(CheckpointError, match="no manifest"):
        reader.tensor("w")


def test_a_root_without_checkpoints_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        checkpoint.load(tmp_path, Two())
