"""The device mesh: how a run's ranks are arranged into named parallel dimensions.

A run's ranks form one ``torch.distributed.device_mesh.DeviceMesh`` built once, from the run's
settings, and passed down to whatever spreads the model (``k2.parallel.fsdp``) and to the
optimizer. Its dimensions are named:

* ``"dp_shard"``: sharded data parallelism (FSDP2): each rank of the dimension holds 1/N of every
  parameter, gradient and optimizer state and reads its own share of the global batch.
* ``"ep"``: expert parallelism: the routed experts of each MoE layer are split over the ranks of
  this dimension (innermost, so an expert-parallel group is a block of consecutive ranks).

The product of all sizes is the world size. Only dimensions larger than 1 enter the mesh. With
both, the dense parameters are sharded over every rank (:func:`flat_mesh`) and each expert block
over ``dp_shard`` (``k2.parallel.fsdp_ep``). When every dimension has size 1 there is no mesh and a
multi-rank run is plain data parallelism (DDP over the default group), as before.
Design: ``docs/parallel.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from k2.errors import ConfigError

MESH_DIMS: tuple[str, ...] = ("dp_shard", "ep")
"""The mesh dimensions k2 knows, outermost first."""

FLAGS = {"dp_shard": "--dp-shard", "ep": "--ep"}
"""The ``k2 train`` option that sets each dimension (for error messages)."""


def mesh_sizes(config: object) -> dict[str, int]:
    """The size of each mesh dimension from a run's settings (``TrainConfig`` or alike; a missing
    setting is 1).

    Args:
        config: an object with one integer attribute per dimension (``dp_shard``, ...).
    """
    return {dim: int(getattr(config, dim, 1)) for dim in MESH_DIMS}


def check_sizes(sizes: Mapping[str, int], world: int) -> None:
    """Check that ``sizes`` fit ``world`` ranks.

    Raises:
        ConfigError: a size below 1, an unknown dimension, or sizes (any above 1) whose product
            is not the world size; the message names the options.
    """
    for dim, size in sizes.items():
        if dim not in MESH_DIMS:
            raise ConfigError(f"unknown mesh dimension {dim!r}; k2 knows {', '.join(MESH_DIMS)}")
        if size < 1:
            raise ConfigError(f"{FLAGS.get(dim, dim)} must be at least 1, got {size}")
    if all(size == 1 for size in sizes.values()):
        return
    product = math.prod(sizes.values())
    if product != world:
        given = " x ".join(f"{FLAGS.get(d, d)} {s}" for d, s in sizes.items())
        raise ConfigError(f"{given} = {product} ranks, but this run has {world} (the product of the "
                          f"mesh sizes must be the world size: launch with torchrun --nproc_per_node "
                          f"{product}, or change the sizes)")


def build_mesh(sizes: Mapping[str, int], world: int, device: torch.device) -> DeviceMesh | None:
    """The run's device mesh, or None when no dimension is larger than 1 (one process, or DDP).

    Its dimensions are those of ``sizes`` larger than 1, in :data:`MESH_DIMS` order.

    Args:
        sizes: size per dimension, as :func:`mesh_sizes` gives them.
        world: the number of ranks (``torch.distributed`` must be initialized when the mesh has
            more than one rank; a one-rank mesh initializes nothing itself).
        device: this rank's device (its type picks the mesh's device type).

    Raises:
        ConfigError: the sizes do not fit the world (:func:`check_sizes`).
    """
    check_sizes(sizes, world)
    if all(size == 1 for size in sizes.values()):
        return None
    dims = [d for d in MESH_DIMS if sizes.get(d, 1) > 1]
    return init_device_mesh(device.type, tuple(sizes[d] for d in dims), mesh_dim_names=tuple(dims))


def dim_size(mesh: DeviceMesh | None, dim: str) -> int:
    """The size of dimension ``dim`` of ``mesh`` (1 without a mesh or without that dimension)."""
    if mesh is None or not mesh.mesh_dim_names or dim not in mesh.mesh_dim_names:
        return 1
    return mesh.size(mesh.mesh_dim_names.index(dim))


FLAT = "all"
"""The name of :func:`flat_mesh`'s one dimension."""


def flat_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """``mesh`` as one dimension over all its ranks, in rank order (``mesh`` itself when it is
    1-D): what the dense parameters are sharded over when every rank is data-parallel for them."""
    if mesh.ndim == 1:
        return mesh
    return mesh._flatten(FLAT)
