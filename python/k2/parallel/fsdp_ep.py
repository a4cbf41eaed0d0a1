"""FSDP2 × expert parallelism on one two-dimensional device mesh (``dp_shard`` × ``ep``).

``k2 train --dp-shard D --ep E`` under ``torchrun`` with ``D·E`` ranks builds the mesh
``("dp_shard", "ep")`` of shape ``(D, E)`` (:func:`k2.parallel.mesh.build_mesh`); rank ``r`` sits at
``(r // E, r % E)``, so an expert-parallel group is ``E`` consecutive ranks. The layout
(docs/parallel.md, "FSDP2 × expert parallelism"):

* **routed experts**: each MoE layer's experts are split over the ``ep`` dimension
  (:class:`k2.parallel.expert.ExpertShard`, tokens travel with ``all_to_all_single`` inside the
  ``ep`` group), and each rank's block is then FSDP2-sharded over the ``dp_shard`` dimension — the
  ``D`` ranks that hold the same experts. Every rank ends up with ``1 / (D·E)`` of the experts.
* **everything else** (embeddings, attention, norms, routers, shared experts, head) is
  FSDP2-sharded over all ``D·E`` ranks (the flattened mesh): every rank reads its own share of
  the global batch, so for these parameters every rank is a data-parallel replica.

Why the math equals one process on the global batch: each rank's loss is the mean over its own
tokens, and the global loss is the mean of the ``D·E`` ranks' losses. Dense gradients are
reduce-scattered with an average over all ranks: that mean. An expert block's gradient on a rank
already sums the contributions of every token of its ``ep`` group (the exchange's backward), and
the reduce-scatter over ``dp_shard`` sums the ``D`` groups: together every rank's tokens once,
which is then divided by ``D·E`` (``set_gradient_divide_factor``; sum-only collectives, so gloo
and NCCL reduce the same way). Expert loads for the router bias, QK-Clip's max logits and the
skip decision are agreed over all ranks (every rank counts its own tokens over all experts), and
the gradient norm sums every rank's local squares once (:func:`clip_grad_norm_`: the shards of
the dense and the expert parameters each partition their tensors over the ranks).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from k2.errors import ConfigError
from k2.model.precision import reduce_dtype
from k2.parallel.agree import sum_over_ranks
from k2.parallel.expert import expert_shards, shard_experts
from k2.parallel.fsdp import local, shard_model
from k2.parallel.mesh import flat_mesh

DIMS = ("dp_shard", "ep")


def check_mesh(mesh: DeviceMesh) -> None:
    """Raise a ConfigError unless ``mesh`` is the two-dimensional ``("dp_shard", "ep")`` mesh."""
    if tuple(mesh.mesh_dim_names or ()) != DIMS:
        raise ConfigError(f"FSDP2 x expert parallelism needs a mesh with dimensions {DIMS}, got "
                          f"{mesh.mesh_dim_names} (build it with k2.parallel.mesh.build_mesh)")


def parallelize(model: nn.Module, mesh: DeviceMesh, *, mixed_precision: bool | None = None,
                cpu_offload: bool = False) -> nn.Module:
    """Spread a k2 causal LM over the ``dp_shard`` × ``ep`` mesh, in place.

    Args:
        model: the bare model on this rank's device, identical on every rank (same seed).
        mesh: the run's 2-D mesh (:func:`k2.parallel.mesh.build_mesh` with both sizes > 1).
        mixed_precision: as :func:`k2.parallel.fsdp.shard_model` (None: on for CUDA).
        cpu_offload: as :func:`k2.parallel.fsdp.shard_model`.

    Returns:
        ``model``, its experts split over ``ep`` and sharded over ``dp_shard``, everything else
        sharded over all ranks. Build the optimizer on it (``DistributedMuonClip``), clip its
        gradients with :func:`clip_grad_norm_`; checkpoints go through
        :func:`k2.parallel.fsdp.save_checkpoint` / :func:`~k2.parallel.fsdp.load_checkpoint`.

    Raises:
        ConfigError: the mesh is not ``("dp_shard", "ep")``, or the experts do not divide by ep.
    """
    check_mesh(mesh)
    shard_experts(model, mesh.get_group("ep"))
    shards = [shard for _, shard in expert_shards(model)]
    shard_model(model, flat_mesh(mesh), mixed_precision=mixed_precision, cpu_offload=cpu_offload,
                extra_units=[(shard, mesh["dp_shard"]) for shard in shards])
    world = mesh.size()
    for shard in shards:
        # The block's gradient holds every rank's tokens once after the dp_shard reduce-scatter
        # (see the module docstring): divide by all ranks, with sum-only collectives.
        shard.set_gradient_divide_factor(float(world))
        shard.set_force_sum_reduction_for_comms(True)
        shard.mark_parameters()  # fully_shard replaced them with DTensors
    return model


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model spread by :func:`parallelize`.

    Every parameter is a DTensor whose local shards partition it over the ranks (dense ones over
    all ranks, each expert over its ``dp_shard`` ranks, the experts over ``ep``), so the squared
    global norm is the sum over ranks of the local squared norms.

    Args:
        model: the model after :func:`parallelize`.
        max_norm: the largest global L2 norm (``inf``: only measure).

    Returns:
        The global gradient norm before clipping (a 0-d fp32 tensor on the CPU, the same on
        every rank).

    Raises:
        ConfigError: a parameter with a gradient is not sharded (it would be counted once per
            rank).
    """
    params = list({id(p): p for p in model.parameters() if p.grad is not None}.values())
    plain = [name for name, p in model.named_parameters() if p.grad is not None and not isinstance(p, DTensor)]
    if plain:
        raise ConfigError(f"clip_grad_norm_: {plain[:3]} are not sharded; parallelize the model first")
    grads = [local(p.grad) for p in params]
    grads = [g for g in grads if g.numel()]
    dtype = reduce_dtype(params[0].dtype) if params else torch.float32
    local_sq = (torch.nn.utils.get_total_norm(grads).to(dtype) ** 2 if grads
                else torch.zeros((), dtype=dtype))
    (total_sq,) = sum_over_ranks([local_sq])
    total = total_sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grads_with_norm_
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))
    return total
