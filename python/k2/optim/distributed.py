"""MuonClip over sharded parameters: FSDP2's DTensors, each split by rows over the ranks.

Newton–Schulz needs whole matrices, and FSDP2 leaves each rank a block of rows of each one. So
every hidden matrix gets an **owner rank**; each step (docs/parallel.md, "Distributed MuonClip"):

1. every rank advances the momentum, applies weight decay and forms the Nesterov look-ahead U on
   its own rows (element-wise, so sharded work gives the single-process numbers);
2. one ``all_to_all_single`` sends each owner the rows of U of the matrices it owns;
3. each owner orthogonalizes its whole matrices (batched by shape, the same seam
   :func:`k2.optim.newton_schulz.orthogonalize` as the single-process optimizer);
4. one more ``all_to_all_single`` sends every rank its rows of the result, which it applies
   with the same lr factor (from the whole matrix's shape).

Owners are chosen once, largest matrix first to the least-loaded rank, weighing a matrix by its
Newton–Schulz cost m·n·min(m, n). A parameter whose local part already holds whole matrices — a
plain tensor, or an expert stack [E, m, n] sharded on E — is orthogonalized where it lives (its
experts count towards the rank's load). AdamW runs on the local shards (element-wise). QK-Clip
reads the max logits agreed over the ranks (MAX) and each rank scales the rows of the clipped
heads that it holds. The result equals :class:`k2.optim.MuonClip` on one process running the same
global batch (``tests/parallel/test_fsdp.py``).

Only the layout FSDP2 gives (``Shard(0)`` over one mesh dimension) is supported; any other
DTensor layout is a ``NotImplementedError`` naming the parameter. Parameters may live on different
1-D meshes (under ``k2.parallel.fsdp_ep`` the dense ones span every rank, the expert blocks their
``dp_shard`` ranks): each mesh's matrices are exchanged within that mesh.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from k2.errors import K2Error
from k2.model.precision import reduce_dtype, upcast
from k2.optim.muon import momentum_step, muon_step
from k2.optim.muonclip import MuonClip
from k2.optim.newton_schulz import NewtonSchulzSchedule, default_dtype, orthogonalize
from k2.optim.qk_clip import ClipTarget, LayerClip, qk_clip
from k2.parallel.agree import collective_device
from k2.parallel.fsdp import local, reshard_optimizer_state


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows of a dim-0 shard on each of ``world`` ranks, as ``torch.chunk`` (and FSDP2) cut them:
    ceil(rows / world) each, the last non-empty one shorter, then empty ones."""
    size = -(-rows // world)
    return [max(0, min(size, rows - r * size)) for r in range(world)]


def _check_layout(name: str, p: Tensor) -> None:
    if not isinstance(p, DTensor):
        return
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise NotImplementedError(
            f"DistributedMuonClip: {name} is laid out as {tuple(p.placements)} over a "
            f"{p.device_mesh.ndim}-D mesh; only FSDP2's Shard(0) over one mesh dimension is supported")


def _mesh_key(p: DTensor) -> tuple:
    mesh = p.device_mesh
    return (mesh.device_type, tuple(mesh.mesh.flatten().tolist()))


@dataclass(frozen=True)
class Owned:
    """A sharded matrix [m, n] and the mesh rank that orthogonalizes it.

    Attributes:
        name: canonical parameter name.
        owner: the rank (within its mesh) that gathers and orthogonalizes it.
        rows: rows held by each rank of the mesh.
    """

    name: str
    owner: int
    rows: tuple[int, ...]


class DistributedMuonClip(MuonClip):
    """:class:`~k2.optim.MuonClip` for a model whose parameters FSDP2 has sharded.

    Takes the same arguments as :class:`~k2.optim.MuonClip`; ``process_group`` (default: the
    world) is where the max logits, expert loads and the skip decision are agreed, while the
    matrices travel within their own DTensor mesh.

    Attributes:
        owners: canonical name -> owner rank (within the parameter's mesh) of every matrix that
            is gathered for Newton–Schulz.
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._owned: dict[int, Owned] = {}  # id(param) -> its owner, for sharded 2-D matrices
        self._meshes: dict[tuple, Any] = {}
        load: dict[tuple, list[float]] = {}
        candidates = []
        for group in self.param_groups:
            for name, p in zip(group["names"], group["params"]):
                _check_layout(name, p)
                if not isinstance(p, DTensor) or group["kind"] != "muon":
                    continue
                key = _mesh_key(p)
                self._meshes.setdefault(key, p.device_mesh)
                world = p.device_mesh.size()
                rows = shard_rows(p.shape[0], world)
                load.setdefault(key, [0.0] * world)
                m, n = p.shape[-2:]
                cost = float(m * n * min(m, n))
                if p.ndim == 3:  # an expert stack: each rank orthogonalizes the experts it holds
                    for r, experts in enumerate(rows):
                        load[key][r] += experts * cost
                else:
                    candidates.append((cost, name, p, key, tuple(rows)))
        # Largest first to the least-loaded rank (ties: the lower rank); the same on every rank.
        for cost, name, p, key, rows in sorted(candidates, key=lambda c: -c[0]):
            loads = load[key]
            owner = min(range(len(loads)), key=lambda r: (loads[r], r))
            loads[owner] += cost
            self._owned[id(p)] = Owned(name, owner, rows)
        self.owners = {o.name: o.owner for o in self._owned.values()}
        self.owner_load = {str(key[1]): loads for key, loads in load.items()}

    # ---------------------------------------------------------------- hooks of MuonClip

    @staticmethod
    def _local(tensor: Tensor) -> Tensor:
        return local(tensor)

    def _qk_clip(self, S_max: list[Tensor]) -> list[LayerClip]:
        return qk_clip([_ShardedClip(t) for t in self.clip_targets], S_max, self.qk_clip_tau)

    def _muon_group(self, group: dict) -> None:
        names = dict(zip(map(id, group["params"]), group["names"]))
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        schedule = NewtonSchulzSchedule(tuple(map(tuple, group["ns_coefficients"])), group["ns_input_scale"])
        hyper = dict(lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                     nesterov=group["nesterov"], conventions=self.conventions, schedule=schedule,
                     eps=group["ns_eps"], dtype=self.ns_dtype)
        whole = [p for p in params if id(p) not in self._owned]
        shared = [p for p in params if id(p) in self._owned]
        whole = [p for p in whole if local(p).numel()]  # a rank may hold no expert of a stack
        if whole:  # whole matrices here: the single-process step on the local part
            muon_step([local(p) for p in whole], [local(p.grad) for p in whole],
                      [local(self.state[p]["momentum_buffer"]) for p in whole],
                      batch_same_shape=self.batch_same_shape, **hyper)
        if not shared:
            return
        P = [local(p) for p in shared]
        G = [local(p.grad) for p in shared]
        M = [local(self.state[p]["momentum_buffer"]) for p in shared]
        momentum_step(G, M, momentum=hyper["momentum"], conventions=self.conventions)
        if hyper["weight_decay"] != 0.0:
            torch._foreach_mul_(P, 1.0 - hyper["lr"] * hyper["weight_decay"])
        U = []
        for g, m_buf in zip(G, M):
            if not hyper["nesterov"]:
                U.append(m_buf)
            elif self.conventions.momentum == "sum":
                U.append(torch.add(g, m_buf, alpha=hyper["momentum"]))  # G + μM
            else:
                U.append(torch.lerp(g, m_buf, hyper["momentum"]))  # (1−μ)G + μM
        by_mesh: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(shared):
            by_mesh[_mesh_key(p)].append(i)
        for key, members in by_mesh.items():
            self._exchange_and_update(self._meshes[key], [shared[i] for i in members],
                                      [P[i] for i in members], [U[i] for i in members], hyper, names)

    # ---------------------------------------------------------------- the owner exchange

    def _exchange_and_update(self, mesh, params: list[DTensor], P: list[Tensor], U: list[Tensor],
                             hyper: dict, names: dict[int, str]) -> None:
        """Steps 2–4 of the module docstring for the sharded matrices of one mesh."""
        group = mesh.get_group()
        world, me = mesh.size(), mesh.get_local_rank()
        device = collective_device(group)
        owned = [self._owned[id(p)] for p in params]
        for o, p, u in zip(owned, params, U):
            if u.shape[0] != o.rows[me]:
                raise K2Error(f"DistributedMuonClip: {o.name} holds {u.shape[0]} rows on rank {me}, "
                              f"expected {o.rows[me]} (the chunked dim-0 layout of FSDP2)")
        n_cols = [p.shape[1] for p in params]

        # 2. each owner receives every rank's rows of U for its matrices
        send_U = [torch.cat([U[i].reshape(-1) for i, o in enumerate(owned) if o.owner == d] or
                            [U[0].new_empty(0)]) for d in range(world)]
        mine = [i for i, o in enumerate(owned) if o.owner == me]
        recv_sizes = [sum(owned[i].rows[r] * n_cols[i] for i in mine) for r in range(world)]
        recv_U = self._all_to_all(send_U, recv_sizes, U[0].dtype, device, group)

        # 3. the owner assembles whole matrices and orthogonalizes them, batched by shape
        pieces: dict[int, list[Tensor]] = {i: [] for i in mine}
        for r, segment in enumerate(recv_U.split(recv_sizes)):
            offset = 0
            for i in mine:
                count = owned[i].rows[r] * n_cols[i]
                pieces[i].append(segment[offset:offset + count].view(-1, n_cols[i]))
                offset += count
        full = {i: torch.cat(pieces[i]) for i in mine}
        out_dtype = hyper["dtype"] or default_dtype(device, recv_U.dtype)
        O: dict[int, Tensor] = {}
        batches: dict[tuple, list[int]] = defaultdict(list)
        for i in mine:
            batches[tuple(full[i].shape) if self.batch_same_shape else (i,)].append(i)
        for members in batches.values():
            O_BMN = orthogonalize(torch.stack([full[i] for i in members]), hyper["schedule"],
                                  eps=hyper["eps"], dtype=hyper["dtype"])
            for i, O_MN in zip(members, O_BMN):
                O[i] = O_MN.to(out_dtype)

        # 4. every rank receives its rows of each result and applies them
        send_O = []
        for r in range(world):
            parts = []
            for i in mine:
                start = sum(owned[i].rows[:r])
                parts.append(O[i][start:start + owned[i].rows[r]].reshape(-1))
            send_O.append(torch.cat(parts) if parts else torch.empty(0, dtype=out_dtype, device=device))
        recv_sizes = [sum(owned[i].rows[me] * n_cols[i] for i, o in enumerate(owned) if o.owner == d)
                      for d in range(world)]
        recv_O = self._all_to_all(send_O, recv_sizes, out_dtype, device, group)
        segments = recv_O.split(recv_sizes)
        offsets = [0] * world
        for i, o in enumerate(owned):
            count = o.rows[me] * n_cols[i]
            rows_O = segments[o.owner][offsets[o.owner]:offsets[o.owner] + count]
            offsets[o.owner] += count
            m, n = params[i].shape
            scale = -hyper["lr"] * hyper["conventions"].lr_factor(m, n)
            P[i].add_(rows_O.view_as(P[i]).to(P[i].device, P[i].dtype), alpha=scale)

    @staticmethod
    def _all_to_all(send: list[Tensor], recv_sizes: list[int], dtype: torch.dtype, device: torch.device,
                    group: dist.ProcessGroup) -> Tensor:
        """One ``all_to_all_single``: ``send[d]`` goes to rank d; returns what arrived, rank by rank."""
        send_sizes = [t.numel() for t in send]
        flat = torch.cat([t.to(device, dtype) for t in send]) if send else torch.empty(0, dtype=dtype, device=device)
        out = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(out, flat, output_split_sizes=recv_sizes, input_split_sizes=send_sizes,
                               group=group)
        return out

    # ---------------------------------------------------------------- state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (sharded, the same layout) or a state dict of whole tensors
        (saved by :func:`k2.parallel.fsdp.save_checkpoint` or by the single-process
        :class:`~k2.optim.MuonClip` at any world size): each rank keeps its rows."""
        super().load_state_dict(state_dict)
        reshard_optimizer_state(self)


class _ShardedClip:
    """A QK-Clip target whose weights are row-sharded: each rank scales the rows it holds."""

    def __init__(self, target: ClipTarget) -> None:
        self.target = target
        self.name = target.name
        self.num_heads = target.num_heads

    @torch.no_grad()
    def clip(self, heads: Tensor, gamma: Tensor) -> None:
        for weight, factor_R in self.target.row_scales(heads, gamma):
            if isinstance(weight, DTensor):
                _check_layout(self.name, weight)
                mesh = weight.device_mesh
                rows = shard_rows(weight.shape[0], mesh.size())
                start = sum(rows[:mesh.get_local_rank()])
                factor_R = factor_R[start:start + rows[mesh.get_local_rank()]]
            W = local(weight)
            factor = factor_R.to(W.device).view(-1, *([1] * (W.ndim - 1)))
            W.copy_((upcast(W) * factor.to(reduce_dtype(W.dtype))).to(W.dtype))
