"""Joining the ``torchrun`` process group and choosing this rank's device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from k2.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank, the number of ranks and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes files and prints."""
        return self.rank == 0


def parse_device(device: str) -> torch.device:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a ``torch.device`` (``auto``: this
    rank's GPU when CUDA is available, else the CPU).

    Raises:
        ConfigError: the string is not a device torch knows, or CUDA was asked for and is missing.
    """
    if device == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"device: {device!r} is not a device (use auto, cpu, cuda or cuda:N)") from err
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {device!r}: k2 trains on cpu or cuda devices")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for, but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def init_distributed(device: str) -> Dist:
    """Join the ``torchrun`` process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU).

    Args:
        device: as :func:`parse_device` takes it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = parse_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank, world, dev)
