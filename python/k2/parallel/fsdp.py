"""FSDP2: each decoder layer, the embeddings and the head sharded over the ``dp_shard`` ranks.

PyTorch's own ``torch.distributed.fsdp.fully_shard`` does the work: every parameter becomes a
DTensor sharded on dim 0 over the mesh's ``dp_shard`` dimension; before a layer runs its
parameters are all-gathered, after its backward the gradients are reduce-scattered (averaged), so
each rank holds 1/N of the parameters, gradients and optimizer states between steps. The model
object is modified in place (FSDP2 swaps its classes and parameters), so "the bare model" and the
sharded one are the same object; what needs whole tensors gets them from here:

* :func:`unsharded_copy` — a plain CPU copy of the model for generation (collective);
* :func:`save_checkpoint` / :func:`load_checkpoint` — a checkpoint of whole tensors, written by
  rank 0 through :mod:`k2.checkpoint`, and read back into the shards at any world size (a
  checkpoint from 2 ranks loads into 1 or 3, or into an unsharded model, and back);
* :func:`bytes_per_rank` — parameter, gradient and optimizer bytes this rank holds.

With ``per_rank=True`` :func:`save_checkpoint` has every rank write its own rows instead
(:mod:`k2.parallel.sharded_checkpoint`, which also reads back only a rank's rows). Design: ``docs/parallel.md``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from k2.errors import ConfigError

DIM = "dp_shard"


def dp_shard_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The one-dimensional ``dp_shard`` sub-mesh of ``mesh`` (``mesh`` itself when it is 1-D)."""
    names = mesh.mesh_dim_names or ()
    if mesh.ndim == 1:
        return mesh
    if DIM not in names:
        raise ConfigError(f"the device mesh {names} has no {DIM!r} dimension to shard over")
    return mesh[DIM]


def shard_model(model: nn.Module, mesh: DeviceMesh, *, mixed_precision: bool | None = None,
                cpu_offload: bool = False, ignored_params: set[nn.Parameter] | None = None,
                extra_units: Sequence[tuple[nn.Module, DeviceMesh]] = ()) -> nn.Module:
    """Apply FSDP2 to a k2 causal LM in place: one unit per decoder layer, one for the input
    embeddings (when not tied to the head), and the root (head, final norm) for the rest.

    Args:
        model: the bare model on this rank's device, identical on every rank (same seed).
        mesh: the run's mesh (its ``dp_shard`` dimension is used).
        mixed_precision: bf16 parameters for compute, fp32 gradient reduction and fp32 sharded
            master weights; None: on for CUDA devices, off on the CPU.
        cpu_offload: keep the sharded parameters, gradients and optimizer states in CPU memory
            (``CPUOffloadPolicy``; the optimizer step then runs on the CPU).
        ignored_params: parameters FSDP2 must leave alone (for example experts spread by
            another dimension).
        extra_units: (module, mesh) pairs sharded first, each as its own unit over its own 1-D
            mesh (the expert blocks of ``k2.parallel.fsdp_ep``, sharded over ``dp_shard`` while
            the rest spans every rank); the units that contain them leave their parameters alone.

    Returns:
        ``model`` itself, now sharded; it also gets a DDP-style ``no_sync()`` context.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(f"FSDP2: {type(model).__name__} has no .model.layers (k2's causal LM layout)")
    device = next(model.parameters()).device
    if cpu_offload and device.type != "cuda":
        raise ConfigError("FSDP2 CPU offload is for GPU runs: on the CPU the shards already live in "
                          "CPU memory (drop --fsdp-cpu-offload)")
    if mixed_precision is None:
        mixed_precision = device.type == "cuda"
    kwargs: dict[str, Any] = {
        "mesh": dp_shard_mesh(mesh),
        "mp_policy": (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                      if mixed_precision else MixedPrecisionPolicy()),
        "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy(),
    }
    if ignored_params:
        kwargs["ignored_params"] = set(ignored_params)
    # FSDP2 warns when a unit returns a view (the logits can be one), since an in-place change of
    # it would skip a pre-backward hook; k2's loops never change model outputs in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor",
                            category=UserWarning)
    for module, unit_mesh in extra_units:
        fully_shard(module, **{**kwargs, "mesh": unit_mesh})
    for layer in layers:
        fully_shard(layer, **kwargs)
    embed = getattr(decoder, "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if embed is not None and (head is None or head.weight is not embed.weight):
        fully_shard(embed, **kwargs)
    fully_shard(model, **kwargs)
    model.no_sync = lambda: _no_sync(model)  # what DDP offers; used around accumulation steps
    return model


@contextmanager
def _no_sync(model: nn.Module) -> Iterator[None]:
    """Backward passes inside skip the gradient reduce-scatter (gradients accumulate unsharded);
    a backward after the context syncs (so a loop that runs only the forward inside still gets
    correct, per-micro-batch reduced gradients)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 or another DTensor layout)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _nbytes(tensor: Tensor | None) -> int:
    if tensor is None:
        return 0
    t = local(tensor)
    return t.numel() * t.element_size()


def bytes_per_rank(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds between steps, by kind.

    Counts each (unique) parameter's local shard, its gradient's local shard (0 when None) and
    every tensor of the optimizer's per-parameter state (moments, momentum buffers, step counts).
    Transient buffers (FSDP2's all-gathered parameters during a layer's forward and backward, the
    optimizer's gathered matrices during a step) and the few rows of padding FSDP2 adds when a
    dimension does not divide by the world size are not counted; buffers (router biases,
    rotary tables) are not parameters and are not counted.

    Args:
        model: the model (sharded or not).
        optimizer: its optimizer (None: 0 optimizer bytes).

    Returns:
        ``{"parameters": ..., "gradients": ..., "optimizer": ...}`` in bytes.
    """
    params = list({id(p): p for p in model.parameters()}.values())
    state_bytes = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            state_bytes += sum(_nbytes(v) for v in state.values() if isinstance(v, Tensor))
    return {"parameters": sum(_nbytes(p) for p in params),
            "gradients": sum(_nbytes(p.grad) for p in params),
            "optimizer": state_bytes}


# ---------------------------------------------------------------------- whole tensors


def full_tensor(tensor: Tensor) -> Tensor:
    """A copy of the whole tensor on the CPU (a collective for a DTensor: every rank must call
    it)."""
    if isinstance(tensor, DTensor):
        return tensor.detach().full_tensor().cpu()
    return tensor.detach().to("cpu", copy=True)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every tensor whole, on the CPU (collective, same order on every
    rank); expert blocks split by expert parallelism are gathered whole too."""
    return {name: _whole(full_tensor(t), _param(model, name)) for name, t in model.state_dict().items()}


def _param(model: nn.Module, name: str) -> Tensor | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _whole(value: Tensor, param: Tensor | None) -> Tensor:
    """``value`` (already whole over FSDP2's ranks) with the whole expert stack when ``param`` is
    an expert block of expert parallelism (``k2.parallel.fsdp_ep``; a collective then)."""
    from k2.parallel.expert import shard_of

    shard = shard_of(param) if param is not None else None
    return shard.whole(value).cpu() if shard is not None else value


def _block(value: Tensor, param: Tensor | None) -> Tensor:
    """The inverse of :func:`_whole`: this rank's expert block of a whole stack."""
    from k2.parallel.expert import shard_of

    shard = shard_of(param) if param is not None else None
    return shard.block(value) if shard is not None else value


def _bare_class(model: nn.Module) -> type[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))


def empty_copy(model: nn.Module) -> nn.Module:
    """A plain (unsharded) model of the same class and config on the CPU, in the dtype of its
    parameters, its tensors not yet filled (buffers that are not saved, such as rotary tables,
    are computed)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"{type(model).__name__} has no .config to build an unsharded copy from")
    with torch.device("meta"):
        bare = _bare_class(model)(config)
    bare.to_empty(device="cpu")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        bare.to(dtype)
    if hasattr(bare, "reset_buffers"):
        bare.reset_buffers()
    return bare.train(model.training)


def unsharded_copy(model: nn.Module, on_rank: int | None = 0) -> nn.Module | None:
    """A plain CPU copy of a sharded model (for generation, export, checks); collective.

    Args:
        model: the sharded model.
        on_rank: the rank that gets the copy (None: every rank); the others get None.
    """
    state = full_model_state(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if on_rank is not None and rank != on_rank:
        return None
    bare = empty_copy(model)
    bare.load_state_dict(state)
    return bare


@torch.no_grad()
def load_full_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy whole tensors (every rank holds them all) into a sharded model's local shards; the
    names are ``model.state_dict()``'s, all required."""
    missing = [name for name in model.state_dict() if name not in state]
    if missing:
        raise ConfigError(f"load_full_state: the state lacks {missing[:5]}")
    for name in model.state_dict():
        try:
            target = model.get_parameter(name)
        except AttributeError:
            target = model.get_buffer(name)
        src = _block(state[name], target).to(target.dtype)
        if isinstance(target, DTensor):
            src = distribute_tensor(src.to(target.device), target.device_mesh, target.placements,
                                    src_data_rank=None).to_local()
        local(target).copy_(src)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every DTensor made whole on the CPU (collective)."""
    sd = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's indices
    sd["state"] = {key: {k: _whole(full_tensor(v), params[key]) if isinstance(v, DTensor) else v
                         for k, v in s.items()}
                   for key, s in sorted(sd["state"].items())}
    return sd


@torch.no_grad()
def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of whole tensors: turn every state tensor that has its
    DTensor parameter's whole shape into a DTensor laid out like the parameter (each rank keeps its
    rows; no communication)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor) or p not in optimizer.state:
                continue
            state = optimizer.state[p]
            for key, value in state.items():
                if isinstance(value, Tensor) and not isinstance(value, DTensor):
                    value = _block(value, p)  # an expert stack saved whole: this rank's block
                if isinstance(value, Tensor) and not isinstance(value, DTensor) and value.shape == p.shape:
                    state[key] = distribute_tensor(value.to(local(p).device), p.device_mesh, p.placements,
                                                   src_data_rank=None)


def _optimizer_view(state: dict[str, Any], name: str) -> Any:
    """What :func:`k2.checkpoint.save` needs of an optimizer (its state dict), under the
    optimizer's class name (which the checkpoint records)."""
    return type(name, (), {"state_dict": lambda self: state})()


def save_checkpoint(directory: str | os.PathLike[str], model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, train_state: dict[str, Any] | None,
                    *, per_rank: bool = False, **kwargs: Any) -> Path | None:
    """Save a checkpoint of a sharded model and its optimizer as whole tensors (collective: every
    rank gathers, rank 0 writes through :func:`k2.checkpoint.save` with ``kwargs``).

    Args:
        per_rank: each rank writes its own rows instead
            (:func:`k2.parallel.sharded_checkpoint.save_sharded`; no gathering).

    Returns:
        The checkpoint directory on rank 0, None elsewhere (every rank, with ``per_rank``).
    """
    from k2 import checkpoint

    if per_rank:  # every rank writes its own rows; one manifest, one commit (docs/checkpoints.md)
        from k2.parallel.sharded_checkpoint import save_sharded

        return save_sharded(directory, model, optimizer, train_state, **kwargs)

    bare = unsharded_copy(model, on_rank=0)
    opt_state = full_optimizer_state(optimizer) if optimizer is not None else None
    if bare is None:
        return None
    view = _optimizer_view(opt_state, type(optimizer).__qualname__) if optimizer is not None else None
    return checkpoint.save(directory, bare, view, train_state, **kwargs)


def load_checkpoint(path: str | os.PathLike[str], model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, **kwargs: Any):  # noqa: ANN201
    """Load a checkpoint of whole tensors (from any world size, sharded or not) into a sharded
    model and its optimizer; every rank reads the files. ``kwargs`` go to
    :func:`k2.checkpoint.load`. Returns its ``LoadResult``."""
    from k2 import checkpoint

    bare = empty_copy(model)
    result = checkpoint.load(path, bare, optimizer, **kwargs)
    load_full_state(model, bare.state_dict())
    if optimizer is not None:
        reshard_optimizer_state(optimizer)
    return result
