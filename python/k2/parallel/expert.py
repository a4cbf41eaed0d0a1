"""Expert parallelism: each MoE layer's routed experts split over an ``ep`` process group.

Expert ``e`` of ``E`` lives on rank ``e // (E / ep)`` of the group (``E`` must be divisible by
``ep``). Everything else — attention, norms, the router, the shared experts, embeddings and head
— stays whole on every rank. Design, in our own words: ``docs/parallel.md`` ("Expert
parallelism").

How one MoE forward travels (:class:`ExpertShard`, which replaces ``MoE.experts``; the MoE layer
itself is unchanged):

1. the router and :mod:`k2.kernels.moe_dispatch` sort this rank's token–expert pairs by expert
   (``route`` + ``permute``), exactly as on one process; since experts are numbered rank by rank,
   that order is also by destination rank;
2. the per-expert counts go to their owners first (one ``all_to_all_single`` of ``E`` integers),
   so each rank knows how many rows it will receive, for which of its experts, from whom;
3. the rows travel with ``all_to_all_single`` (uneven splits, zero allowed); the owner re-sorts
   what it received by local expert (source rank order kept within an expert — the order the
   single process has), runs its experts, sorts back, and a second ``all_to_all_single`` returns
   the outputs; ``combine`` then weighs them in token order as before.

Both exchanges are differentiable (:class:`_AllToAll`; its backward is the reverse exchange), so
an expert's gradient holds every rank's tokens. The expert loads each MoE layer records are still
this rank's tokens over all ``E`` experts, so the router-bias update's sum over ranks
(:mod:`k2.parallel.agree`) sees the global loads.

Training (:func:`parallelize_experts`): DDP averages the replicated gradients and leaves the
expert stacks alone; the expert gradients are divided by the number of ranks whose losses are
averaged, which makes the result equal to one process on the global batch. Gradient clipping
must see the global norm (:func:`clip_grad_norm_`). Checkpoints and export gather the whole
expert set back (:func:`gathered_experts`, :func:`full_state_dict`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from k2.errors import ConfigError
from k2.kernels.moe_dispatch import combine, permute, route
from k2.model.precision import reduce_dtype, upcast
from k2.parallel.agree import collective_device, sum_over_ranks

_STACKS = ("gate_proj", "up_proj", "down_proj")


def expert_range(num_experts: int, ep: int, rank: int) -> range:
    """The experts rank ``rank`` of ``ep`` owns: a contiguous block of ``num_experts / ep``.

    Raises:
        ConfigError: ``num_experts`` is not divisible by ``ep`` (both named), or ``ep`` < 1.
    """
    if ep < 1:
        raise ConfigError(f"expert parallelism: ep must be at least 1, got {ep}")
    if num_experts % ep:
        raise ConfigError(f"expert parallelism: {num_experts} routed experts cannot be split "
                          f"evenly over ep = {ep} ranks (n_routed_experts must be divisible by ep)")
    per_rank = num_experts // ep
    return range(rank * per_rank, (rank + 1) * per_rank)


def check_ep(ep: int, world: int, num_experts: int, dp_shard: int = 1) -> None:
    """Check ``k2 train --ep`` (and ``--dp-shard``) against the launch before any work.

    Args:
        ep: ranks the experts are split over.
        world: ranks launched.
        num_experts: routed experts per MoE layer.
        dp_shard: FSDP2 ranks each expert block is sharded over (``k2.parallel.fsdp_ep``); 1 for
            expert parallelism alone.

    Raises:
        ConfigError: ``ep × dp_shard`` differs from the number of ranks (expert parallelism
            alone spans all of them; replicating experts over several expert-parallel groups is
            not built, sharding them with ``--dp-shard`` is), or ``ep`` does not divide the experts.
    """
    if ep > 1 and ep * dp_shard != world:
        if dp_shard > 1:
            raise ConfigError(f"--dp-shard {dp_shard} x --ep {ep} = {dp_shard * ep} ranks, but "
                              f"{world} were launched (the product of the mesh sizes must be the "
                              f"world size: torchrun --nproc_per_node {dp_shard * ep})")
        hint = (f"; to spread the experts over all {world} ranks add --dp-shard {world // ep} "
                f"(expert blocks sharded by FSDP2; replicated expert groups are not built)"
                if world > ep and world % ep == 0 else "")
        raise ConfigError(f"ep = {ep} needs {ep} ranks (torchrun --nproc_per_node {ep}), but "
                          f"{world} were launched; expert parallelism alone (--ep without "
                          f"--dp-shard) spans every rank{hint}")
    try:
        expert_range(num_experts, ep, 0)
    except ConfigError as err:
        raise ConfigError(f"--ep {ep}: {err}") from None


def expert_group(ep: int) -> dist.ProcessGroup:
    """A process group of all ``ep`` ranks for the token exchange, separate from the default
    group that DDP's gradient all-reduces use (so the two never queue behind each other)."""
    check_ep(ep, dist.get_world_size(), ep)
    return dist.new_group(list(range(ep)))


def _exchange(x: Tensor, send_splits: list[int], recv_splits: list[int],
              group: dist.ProcessGroup) -> Tensor:
    """Rows of ``x`` (``send_splits[r]`` of them to rank r, in rank order) exchanged for the rows
    the other ranks send here (``recv_splits[r]`` from rank r, in rank order)."""
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                           group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """:func:`_exchange` with autograd: the gradient goes back by the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):  # noqa: ANN001, ANN205
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        send_splits, recv_splits = ctx.splits
        return _exchange(grad, recv_splits, send_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, send_splits: list[int], recv_splits: list[int],
               group: dist.ProcessGroup) -> Tensor:
    """Differentiable ``all_to_all_single`` of the rows of ``x`` [rows, ...] over ``group``."""
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), group)


def exchange_counts(counts: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Tell every owner how many rows it will get for each of its experts.

    Args:
        counts: int64 [E], rows this rank sends to each expert (experts numbered rank by rank).

    Returns:
        int64 [ep, E / ep] on the CPU: row ``s`` holds what rank ``s`` sends to this rank's experts.
    """
    ep = dist.get_world_size(group)
    send = counts.to(device=collective_device(group), dtype=torch.int64).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.cpu().view(ep, -1)


class ExpertShard(nn.Module):
    """This rank's block of a MoE layer's routed experts, with the token exchange around it.

    A drop-in for :class:`k2.model.moe.Experts` (same call: rows sorted by global expert and the
    per-expert counts); the stacks hold only experts ``first .. first + num_local - 1``, under the
    same parameter names.

    Args:
        experts: the whole layer's experts (same weights on every rank); only this rank's block is
            kept (copied, so the full stacks can be freed).
        group: the expert-parallel process group.
    """

    def __init__(self, experts: nn.Module, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = experts.num_experts
        owned = expert_range(self.num_experts, self.ep, self.rank)
        self.first, self.num_local = owned.start, len(owned)
        for name in _STACKS:
            full = getattr(experts, name)
            block = full.detach()[owned.start:owned.stop].clone()
            setattr(self, name, nn.Parameter(block, requires_grad=full.requires_grad))
        self.mark_parameters()

    def mark_parameters(self) -> None:
        """Tag this shard's (current) parameters with it, so that code holding only a parameter
        (an optimizer's state, a checkpoint) finds its expert block (:func:`shard_of`). Call it
        again after something replaces the parameters (FSDP2's ``fully_shard``)."""
        for param in self.parameters():
            setattr(param, _SHARD_ATTR, self)

    def whole(self, block: Tensor) -> Tensor:
        """The whole stack [E, ...] from this rank's block [E / ep, ...] (a collective over the
        expert-parallel group; a tensor that is not a block is returned as it is)."""
        if self.ep == 1 or block.ndim == 0 or block.shape[0] != self.num_local:
            return block
        return _gather_rows(block, self.group)

    def block(self, whole: Tensor) -> Tensor:
        """This rank's block [E / ep, ...] of a whole stack [E, ...] (no communication; a tensor
        that is not a whole stack is returned as it is)."""
        if self.ep == 1 or whole.ndim == 0 or whole.shape[0] != self.num_experts:
            return whole
        return whole[self.first:self.first + self.num_local]

    def forward(self, x_sorted: Tensor, counts: list[int]) -> Tensor:
        """Args: x_sorted [N*K, H] rows sorted by global expert; counts: rows per expert (E).
        Returns: [N*K, H] the experts' outputs in the same order."""
        from k2.model.moe import GroupedSwiGLU

        if len(counts) != self.num_experts:
            raise ValueError(f"ExpertShard: got counts for {len(counts)} experts, the layer has "
                             f"{self.num_experts}")
        send = torch.tensor(counts, dtype=torch.int64)
        recv = exchange_counts(send, self.group)  # [ep, num_local]
        send_splits = send.view(self.ep, self.num_local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        rows = all_to_all(x_sorted, send_splits, recv_splits, self.group)  # by source, then expert
        stacks = (self.gate_proj, self.up_proj, self.down_proj)
        if rows.shape[0] == 0:  # nothing came here: the experts still take part (zero gradients)
            y = GroupedSwiGLU.apply(rows, *stacks, [0] * self.num_local)
        else:
            # Re-sort by local expert; within an expert the sources stay in rank order (stable),
            # which is the order one process running every rank's tokens would have.
            local = torch.arange(self.num_local).repeat(self.ep).repeat_interleave(recv.flatten())
            routing = route(local.to(rows.device)[:, None], self.num_local)
            y = GroupedSwiGLU.apply(permute(rows, routing), *stacks,
                                    routing.tokens_per_expert.tolist())
            ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
            y = combine(y, ones, routing)  # back to the received order (weight 1: exact)
        return all_to_all(y, recv_splits, send_splits, self.group)

    def extra_repr(self) -> str:
        return (f"experts {self.first}..{self.first + self.num_local - 1} of {self.num_experts} "
                f"(ep rank {self.rank} of {self.ep})")


_SHARD_ATTR = "_k2_expert_shard"


def shard_of(param: Tensor) -> ExpertShard | None:
    """The :class:`ExpertShard` whose block ``param`` is (None for any other tensor)."""
    return getattr(param, _SHARD_ATTR, None)


def _moe_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from k2.model.moe import MoE

    for name, module in model.named_modules():
        if isinstance(module, MoE):
            yield name, module


def expert_shards(model: nn.Module) -> list[tuple[str, ExpertShard]]:
    """Every :class:`ExpertShard` of ``model`` with its module name (wrappers included)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertShard)]


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the sharded expert parameters of ``model``."""
    return {id(p) for _, shard in expert_shards(model) for p in shard.parameters()}


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Split every MoE layer's routed experts over ``group``, in place.

    Call it on the bare model, built with the same weights on every rank, before wrapping it or
    building its optimizer. Each rank keeps its block of experts; the router, shared experts and
    every other parameter stay whole. Gradients are those of the **sum** of the ranks' losses for
    the experts (their tokens come from every rank); :func:`parallelize_experts` turns that into
    the data-parallel mean.

    Args:
        model: a model holding :class:`k2.model.moe.MoE` layers.
        group: the expert-parallel group (default: all ranks).

    Returns:
        ``model``.

    Raises:
        ConfigError: ``torch.distributed`` is not initialized, a layer's expert count is not
            divisible by the group's size, or the model has no MoE layer.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("expert parallelism needs torch.distributed (launch with torchrun)")
    group = group or dist.group.WORLD
    layers = list(_moe_layers(model))
    if not layers:
        raise ConfigError(f"expert parallelism: {type(model).__name__} has no MoE layer")
    ep = dist.get_world_size(group)
    for name, moe in layers:  # check them all before changing anything
        try:
            expert_range(moe.num_experts, ep, 0)
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
    for _, moe in layers:
        if not isinstance(moe.experts, ExpertShard):
            moe.experts = ExpertShard(moe.experts, group)
    return model


def parallelize_experts(model: nn.Module, group: dist.ProcessGroup | None = None,
                        loss_ranks: int | None = None) -> nn.Module:
    """Expert parallelism for training: shard the experts, then data parallelism for the rest.

    Every rank reads its own share of the global batch. DDP averages the replicated gradients
    (its broadcast and all-reduce skip the expert stacks); each expert gradient, which already
    holds every rank's tokens through the exchange's backward, is divided by ``loss_ranks`` so
    that it too is the gradient of the mean of the ranks' losses.

    Args:
        model: the bare model (see :func:`shard_experts`).
        group: the expert-parallel group (default: all ranks).
        loss_ranks: how many ranks' losses are averaged (default: the world size).

    Returns:
        The module the training step calls (DDP over the default group; the bare ``model``
        when running alone). Build the optimizer on it after this call.
    """
    from torch.nn.parallel import DistributedDataParallel

    shard_experts(model, group)
    world = dist.get_world_size()
    loss_ranks = world if loss_ranks is None else loss_ranks
    ignored = []
    for prefix, shard in expert_shards(model):
        for name, param in shard.named_parameters():
            ignored.append(f"{prefix}.{name}")
            if loss_ranks > 1 and param.requires_grad:
                param.register_hook(lambda grad, n=loss_ranks: grad / n)
    if world <= 1:
        return model
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return DistributedDataParallel(model)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float,
                    group: dist.ProcessGroup | None = None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole (sharded) model: the norm counts the
    replicated gradients once and every rank's expert gradients.

    Args:
        model: the bare or wrapped model after :func:`shard_experts`.
        max_norm: the largest global L2 norm (``inf``: only measure).
        group: the expert-parallel group (default: all ranks).

    Returns:
        The global gradient norm before clipping (a 0-d tensor, the same on every rank).
    """
    experts = expert_parameters(model)
    params = [p for p in model.parameters() if p.grad is not None]
    mine = [p.grad for p in params if id(p) in experts]
    shared = [p.grad for p in params if id(p) not in experts]
    device = params[0].grad.device if params else torch.device("cpu")
    zero = torch.zeros((), device=device, dtype=reduce_dtype(params[0].dtype) if params else torch.float32)
    shared_norm = torch.nn.utils.get_total_norm(shared) if shared else zero
    expert_sq = upcast(torch.nn.utils.get_total_norm(mine)) ** 2 if mine else zero
    (expert_sq,) = sum_over_ranks([expert_sq], group)
    total = (upcast(shared_norm) ** 2 + expert_sq.to(shared_norm.device)).sqrt()
    if params:
        torch.nn.utils.clip_grads_with_norm_([p for p in params], max_norm, total)
    return total


def _gather_rows(block: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The ranks' equal-sized blocks concatenated along dim 0, in rank order, on every rank."""
    device = collective_device(group)
    local = block.detach().to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts).to(block.device)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every expert stack whole (gathered over its group).

    A collective: every rank of the expert-parallel group calls it; every rank gets the full
    dictionary (for export, sampling, or an unsharded copy of the model).
    """
    with gathered_experts(model):
        return {name: t.clone() for name, t in model.state_dict().items()}


@contextlib.contextmanager
def gathered_experts(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                     ) -> Iterator[nn.Module]:
    """Inside the block, ``model`` (and ``optimizer``'s state) hold the whole expert stacks.

    On entry every expert stack — and every optimizer state tensor of the stack's shape
    (momentum, AdamW moments) — is gathered over its group; on exit each rank keeps its block of
    whatever the full tensors hold then. So a checkpoint saved inside the block is the
    single-process one, and one loaded inside it (every rank loads the same files) is sliced
    back to each rank's experts. A collective on entry: every rank enters together.
    """
    shards = expert_shards(model)
    saved: list[tuple[ExpertShard, nn.Parameter, Tensor]] = []
    state = optimizer.state if optimizer is not None else {}
    try:
        for _, shard in shards:
            for name in _STACKS:
                param = getattr(shard, name)
                saved.append((shard, param, param.data))
                param.data = _gather_rows(param.data, shard.group)
                for key, value in list(state.get(param, {}).items()):
                    if isinstance(value, Tensor) and value.shape == saved[-1][2].shape:
                        state[param][key] = _gather_rows(value, shard.group)
        yield model
    finally:
        if optimizer is not None:
            state = optimizer.state  # load_state_dict replaces it
        for shard, param, local in saved:
            lo, hi = shard.first, shard.first + shard.num_local
            full_shape = param.data.shape
            param.data = param.data[lo:hi].clone() if full_shape[0] == shard.num_experts else local
            for key, value in list(state.get(param, {}).items()):
                if isinstance(value, Tensor) and value.shape == full_shape and full_shape[0] != shard.num_local:
                    state[param][key] = value[lo:hi].clone()
