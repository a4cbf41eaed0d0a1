"""Checkpoints of a sharded run written and read rank by rank (docs/checkpoints.md, "Sharded
checkpoints"; docs/parallel.md).

Saving (:func:`save_sharded`, collective): every rank writes the rows it holds — its FSDP2 shard
of each parameter and optimizer state, its block of experts under expert parallelism — through
the native writer, in parallel with the other ranks, into the one staging directory rank 0
created. A tensor held whole by several ranks (replicated parameters, buffers, optimizer step
counters) is written once, by the lowest rank holding it. Rank 0 then merges what the ranks
wrote, records every tensor stored in several row pieces in the manifest (``pieces``: stored
tensor, shard file, row range), writes the JSON files, and commits the directory atomically as
any save does. A rank lost before the commit leaves only the hidden staging directory: the
previous checkpoint stays the newest.

The result is an ordinary k2 checkpoint: :class:`k2.checkpoint.CheckpointReader` presents a
pieced tensor under its own name (``k2.checkpoint.load``, ``k2 ckpt``, the Hub export read it in
one process), and per-expert Hub tensors stay whole tensors (an expert lives on one rank).

Loading (:func:`load_sharded`, every rank on its own): each rank reads only the rows it owns at
the current world size and layout, by slice reads that hash only the chunks they touch, so a
checkpoint of any world size (sharded, gathered or from one process) loads at any other.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from k2 import _native
from k2.checkpoint.reader import CheckpointReader, resolve
from k2.checkpoint.state_tree import decode, encode
from k2.checkpoint.store import (CHECKPOINT_SHARD_BYTES, DEFAULT_CHUNK_BYTES, TOKENIZER_FILES, LoadResult,
                                 _describe, _next_name, rng_state, set_rng_state)
from k2.checkpoint.tensors import DTYPE_NAMES, entry, host_bytes
from k2.errors import CheckpointError

_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_OPT_STATE = re.compile(r"^optimizer/state/(\d+)/")


def piece_name(name: str, start: int, stop: int) -> str:
    """The stored name of rows ``start:stop`` of tensor ``name`` (the manifest maps it back)."""
    return f"{name}#rows={start}:{stop}"


# ---------------------------------------------------------------------- where rows live


@dataclass(frozen=True)
class _Experts:
    """The expert block an expert-parallel rank holds: experts ``first .. first + num_local - 1``
    of ``num_experts``."""

    first: int
    num_local: int
    num_experts: int


def _expert_blocks(model: nn.Module) -> tuple[dict[str, _Experts], dict[int, _Experts]]:
    """The expert stacks of an expert-parallel model, by state-dict name and by parameter id."""
    from k2.parallel.expert import _STACKS, expert_shards

    by_name: dict[str, _Experts] = {}
    by_id: dict[int, _Experts] = {}
    for prefix, shard in expert_shards(model):
        block = _Experts(shard.first, shard.num_local, shard.num_experts)
        for stack in _STACKS:
            by_name[f"{prefix}.{stack}"] = block
            by_id[id(getattr(shard, stack))] = block
    return by_name, by_id


def row_span(name: str, tensor: Tensor, experts: _Experts | None = None) -> tuple[int, int, int] | None:
    """Which rows of the whole tensor this rank holds: ``(start, stop, rows)``; None for a scalar.

    A DTensor must be FSDP2's layout (``Shard(0)`` over one mesh dimension: ``torch.chunk``'s
    rows per rank); a plain tensor is whole, unless it is an expert-parallel rank's block of an
    expert stack (``experts``), whose rows are its experts'.

    Raises:
        NotImplementedError: another DTensor layout, naming the tensor.
    """
    from k2.optim.distributed import shard_rows

    if isinstance(tensor, DTensor):
        from torch.distributed.tensor import Shard

        mesh = tensor.device_mesh
        if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
            raise NotImplementedError(
                f"sharded checkpoints: {name} is laid out as {tuple(tensor.placements)} over a "
                f"{mesh.ndim}-D mesh; only FSDP2's Shard(0) over one mesh dimension is supported")
        rows = tensor.shape[0]
        sizes = shard_rows(rows, mesh.size())
        rank = mesh.get_local_rank()
        start = sum(sizes[:rank])
        stop = start + sizes[rank]
        if tensor.to_local().shape[0] != sizes[rank]:
            raise NotImplementedError(
                f"sharded checkpoints: {name} holds {tensor.to_local().shape[0]} rows on mesh rank "
                f"{rank}, not the {sizes[rank]} of torch.chunk's layout (FSDP2's)")
    elif tensor.dim() == 0:
        return None
    else:
        rows, start, stop = tensor.shape[0], 0, tensor.shape[0]
    if experts is not None and rows == experts.num_local and experts.num_local != experts.num_experts:
        return start + experts.first, stop + experts.first, experts.num_experts
    return start, stop, rows


def _local_rows(tensor: Tensor) -> Tensor:
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach()


# ---------------------------------------------------------------------- saving


@dataclass
class _Item:
    """One tensor (or this rank's rows of one) to save."""

    group: str
    name: str
    tensor: Tensor | None  # this rank's rows (None in the metadata other ranks receive)
    span: tuple[int, int, int] | None  # (start, stop, rows); None: a scalar
    dtype: str
    shape: list[int]  # this rank's piece
    nbytes: int

    def key(self) -> tuple[str, str, int, int]:
        start, stop = (self.span[0], self.span[1]) if self.span else (0, 0)
        return self.group, self.name, start, stop

    def meta(self) -> _Item:
        return _Item(self.group, self.name, None, self.span, self.dtype, self.shape, self.nbytes)


def _item(group: str, name: str, tensor: Tensor, span: tuple[int, int, int] | None) -> _Item:
    rows = _local_rows(tensor)
    if rows.dtype not in DTYPE_NAMES:
        raise CheckpointError(f"tensor {name!r}: dtype {rows.dtype} cannot be stored in safetensors")
    return _Item(group, name, rows, span, DTYPE_NAMES[rows.dtype], list(rows.shape),
                 rows.numel() * rows.element_size())


def _model_items(model: nn.Module) -> tuple[list[_Item], str]:
    """This rank's model rows under the names :func:`k2.checkpoint.save` uses (Hub names for k2
    models: each expert of a stack is a whole tensor of the rank holding it)."""
    naming = "hf" if hasattr(model, "to_hf_state_dict") else "state_dict"
    tied = naming == "hf" and getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    by_name, _ = _expert_blocks(model)
    items = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tied and name == "lm_head.weight":
            continue  # the Hub layout leaves the tied head out
        span = row_span(name, tensor, by_name.get(name))
        stacked = _STACKED.match(name) if naming == "hf" else None
        if stacked and span is not None:
            prefix, projection = stacked.groups()
            rows = _local_rows(tensor)
            for i, expert in enumerate(range(span[0], span[1])):
                weight = rows[i]
                items.append(_item("model", f"{prefix}.{expert}.{projection}.weight", weight,
                                   (0, weight.shape[0], weight.shape[0])))
        else:
            items.append(_item("model", name, tensor, span))
    return items, naming


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters in the order of the state dict's integer indices."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _optimizer_items(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[_Item], Any]:
    """This rank's rows of the optimizer state, and its JSON structure (``optimizer.json``)."""
    tensors: dict[str, Tensor] = {}
    structure = encode(optimizer.state_dict(), "optimizer", tensors)
    params = _optimizer_params(optimizer)
    _, by_id = _expert_blocks(model)
    items = []
    for name, value in tensors.items():
        match = _OPT_STATE.match(name)
        param = params[int(match.group(1))] if match else None
        experts = by_id.get(id(param)) if param is not None else None
        if experts is not None and tuple(value.shape) != tuple(param.shape):
            experts = None  # not of the stack's shape (a step counter, a reduced statistic)
        items.append(_item("optimizer", name, value, row_span(name, value, experts)))
    return items, structure


def _empty(item: _Item) -> bool:
    """No rows of a tensor that has some (a rank past the last shard of a short dimension)."""
    return item.span is not None and item.span[0] == item.span[1] and item.span[2] > 0


def _assign_writers(metas: list[list[_Item]]) -> tuple[list[list[_Item]], dict[tuple[str, str], list[_Item]]]:
    """Which rank writes what: every piece once, by the lowest rank holding it. Returns each
    rank's pieces and, per (group, tensor), its pieces in row order; checks that they tile the
    rows."""
    metas = [[it for it in items if not _empty(it)] for items in metas]
    owner: dict[tuple[str, str, int, int], int] = {}
    first: dict[tuple[str, str, int, int], _Item] = {}
    for rank, items in enumerate(metas):
        for item in items:
            if item.key() not in owner:
                owner[item.key()] = rank
                first[item.key()] = item
    per_rank: list[list[_Item]] = [[] for _ in metas]
    for rank, items in enumerate(metas):
        per_rank[rank] = [item for item in items if owner[item.key()] == rank]
    tensors: dict[tuple[str, str], list[_Item]] = {}
    for key, item in first.items():
        tensors.setdefault((key[0], key[1]), []).append(item)
    for (group, name), pieces in tensors.items():
        pieces.sort(key=lambda it: it.key()[2:])
        if pieces[0].span is None:
            if len(pieces) > 1:
                raise CheckpointError(f"{group} tensor {name!r}: a scalar on some ranks, rows on others")
            continue
        rows = pieces[0].span[2]
        covered = 0
        for piece in pieces:
            start, stop, whole = piece.span
            if whole != rows or piece.shape[1:] != pieces[0].shape[1:] or piece.dtype != pieces[0].dtype:
                raise CheckpointError(f"{group} tensor {name!r}: the ranks disagree about its shape or "
                                      f"dtype ({pieces[0].dtype} {rows} rows vs {piece.dtype} {whole})")
            if start != covered:
                raise CheckpointError(f"{group} tensor {name!r}: the ranks hold rows up to {covered}, "
                                      f"then {start}..{stop} (a gap or an overlap)")
            covered = stop
        if covered != rows:
            raise CheckpointError(f"{group} tensor {name!r}: the ranks hold rows 0..{covered} of {rows}")
    return per_rank, tensors


def _stored_name(item: _Item, pieces: list[_Item]) -> str:
    if len(pieces) == 1:
        return item.name
    return piece_name(item.name, item.span[0], item.span[1])


def _shard_files(per_rank: list[list[_Item]], groups: list[str], max_shard_bytes: int
                 ) -> tuple[list[list[tuple[str, str, list[int]]]], dict[tuple[str, str, int, int], str]]:
    """Every rank's shard files, ``(file name, group, indices into its items)``, numbered across
    the ranks (``model-00003-of-00004.safetensors`` is rank 1's first when rank 0 writes two),
    and the file of every piece. Every rank computes the same plan from the same metadata."""
    planned: list[dict[str, list[list[int]]]] = []
    for items in per_rank:
        by_group: dict[str, list[list[int]]] = {}
        for group in groups:
            indices = [i for i, it in enumerate(items) if it.group == group]
            plan = _native.plan_shards([items[i].nbytes for i in indices], max_shard_bytes)
            by_group[group] = [[indices[j] for j in shard] for shard in plan]
        planned.append(by_group)
    totals = {g: sum(len(p[g]) for p in planned) for g in groups}
    files: list[list[tuple[str, str, list[int]]]] = []
    file_of: dict[tuple[str, str, int, int], str] = {}
    offset = dict.fromkeys(groups, 0)
    for items, by_group in zip(per_rank, planned):
        mine = []
        for group in groups:
            for shard in by_group[group]:
                file_name = _native.shard_file_name(group, offset[group], totals[group])
                offset[group] += 1
                mine.append((file_name, group, shard))
                file_of.update((items[i].key(), file_name) for i in shard)
        files.append(mine)
    return files, file_of


def _bare_class_name(model: nn.Module) -> str:
    from k2.parallel.fsdp import _bare_class

    return _bare_class(model).__qualname__


def save_sharded(directory: str | os.PathLike[str], model: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None,
                 train_state: dict[str, Any] | None = None, *, keep_last: int | None = None,
                 step: int | None = None, tokenizer_dir: str | os.PathLike[str] | None = None,
                 max_shard_bytes: int = CHECKPOINT_SHARD_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 durable: bool = True, group: dist.ProcessGroup | None = None) -> Path:
    """Save a checkpoint of a sharded (FSDP2, expert-parallel) model, every rank writing its own
    rows; one manifest, one atomic commit by rank 0. Collective: every rank calls it.

    Arguments are :func:`k2.checkpoint.save`'s; the training state and the RNG states are rank
    0's. ``group``: the ranks that save together (default: all).

    Returns:
        The checkpoint directory (on every rank).

    Raises:
        CheckpointError: on every rank, when any rank failed to write or rank 0 failed to commit
            (the message names the rank and its error); nothing is published then.
    """
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
    root = Path(directory)
    if step is None and isinstance(train_state, dict) and isinstance(train_state.get("step"), int):
        step = train_state["step"]

    # What this rank holds; a failure here (a value that cannot be saved) must reach every rank
    # through the exchange below, or the others would wait in it for the group's timeout.
    items: list[_Item] = []
    files: dict[str, bytes] = {}
    groups = ["model", "optimizer", "train_state"] if optimizer is not None else ["model", "train_state"]
    meta: tuple[Any, Any] | str
    try:
        items, naming = _model_items(model)
        structure = None
        if optimizer is not None:
            opt_items, structure = _optimizer_items(model, optimizer)
            items += opt_items
        final_name = None
        if rank == 0:
            state_tensors: dict[str, Tensor] = {}
            state_structure = encode({"user": train_state, "rng": rng_state()}, "train_state", state_tensors)
            items += [_item("train_state", n, t, None if t.dim() == 0 else (0, t.shape[0], t.shape[0]))
                      for n, t in state_tensors.items()]
            files = _json_files(model, naming, optimizer, structure, state_structure, tokenizer_dir, world)
            final_name = root / _next_name(root, step)
        meta = ([it.meta() for it in items], final_name)  # no tensor data; rank 0's directory
    except (CheckpointError, NotImplementedError, OSError, ValueError, TypeError) as err:
        meta = f"rank {rank} cannot save: {type(err).__name__}: {err}"
    metas = _all_gather(meta, world, group)
    failed = [m for m in metas if isinstance(m, str)]
    if failed:
        message = "; ".join(failed)
        raise NotImplementedError(message) if "NotImplementedError" in message else CheckpointError(message)
    final = metas[0][1]
    per_rank, tensors = _assign_writers([m[0] for m in metas])
    shard_files, file_of = _shard_files(per_rank, groups, max_shard_bytes)
    mine = {it.key(): it for it in items}

    # Rank 0 creates the staging directory; then every rank writes its shards into it.
    writer = None
    error = None
    if rank == 0:
        try:
            writer = _native.CheckpointWriter(final, chunk_bytes=chunk_bytes, durable=durable)
        except Exception as err:  # every rank must hear of it
            error = f"rank 0 could not start {final}: {err}"
    error = _broadcast(error, group)
    if error is not None:
        raise CheckpointError(error)
    part = None
    try:
        if writer is None:
            writer = _native.CheckpointWriter(final, chunk_bytes=chunk_bytes, durable=durable, join=True)
        shards = []
        keep_alive = []
        for file_name, group_name, indices in shard_files[rank]:
            entries = []
            for i in indices:
                item = mine[per_rank[rank][i].key()]
                tensor = host_bytes(item.tensor)
                keep_alive.append(tensor)
                entries.append(entry(_stored_name(item, tensors[(item.group, item.name)]), tensor))
            shards.append((file_name, group_name, entries))
        writer.write_shards(shards)
        if rank != 0:
            part = writer.part()
    except Exception as err:
        part = f"rank {rank} could not write its shards of {final}: {err}".encode()
        part = b"!" + part
    parts = _gather(part, rank, world, group)

    error = None
    if rank == 0:
        try:
            for r, other in enumerate(parts):
                if r == 0:
                    continue
                if other.startswith(b"!"):
                    raise CheckpointError(other[1:].decode())
                writer.merge_part(other)
            if part is not None and part.startswith(b"!"):
                raise CheckpointError(part[1:].decode())
            for (_, name), pieces in tensors.items():
                if len(pieces) > 1:
                    writer.add_pieces(name, pieces[0].dtype, [pieces[0].span[2], *pieces[0].shape[1:]],
                                      [(file_of[p.key()], piece_name(name, p.span[0], p.span[1]),
                                        p.span[0], p.span[1]) for p in pieces])
            for name, data in files.items():
                writer.write_file(name, data)
            writer.commit(publish_latest=True, keep_last=keep_last)
        except Exception as err:
            error = f"rank 0 could not commit {final}: {err}" if not isinstance(err, CheckpointError) else str(err)
    error = _broadcast(error, group)
    if error is not None:
        raise CheckpointError(error)
    return Path(final)


def _json_files(model: nn.Module, naming: str, optimizer: torch.optim.Optimizer | None, structure: Any,
                state_structure: Any, tokenizer_dir: str | os.PathLike[str] | None, world: int) -> dict[str, bytes]:
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, indent=1).encode()

    files: dict[str, bytes] = {}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_hf_dict"):
        files["config.json"] = dumps(config.to_hf_dict())
    if optimizer is not None:
        files["optimizer.json"] = dumps({"class": type(optimizer).__qualname__, "state_dict": structure})
    files["train_state.json"] = dumps(state_structure)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                files[name] = (Path(tokenizer_dir) / name).read_bytes()
    files["checkpoint.json"] = dumps({
        "format": "k2-checkpoint",
        "model_naming": naming,
        "model_class": _bare_class_name(model),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "written_by_ranks": world,
    })
    return files


def _all_gather(obj: Any, world: int, group: dist.ProcessGroup | None) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _gather(obj: Any, rank: int, world: int, group: dist.ProcessGroup | None) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return out or []


def _broadcast(obj: Any, group: dist.ProcessGroup | None) -> Any:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


# ---------------------------------------------------------------------- loading


def _read_rows(reader: CheckpointReader, name: str, span: tuple[int, int, int] | None, verify: bool) -> Tensor:
    """This rank's rows of a stored tensor (all of it when ``span`` covers every row)."""
    if span is None or (span[0] == 0 and span[1] == span[2]):
        return reader.tensor(name, verify=verify)
    return reader.rows(name, span[0], span[1], verify=verify)


def _model_reads(model: nn.Module, reader: CheckpointReader, naming: str
                 ) -> tuple[list[tuple[Tensor, list[str], tuple[int, int, int] | None, bool]], LoadResult]:
    """What to read for each model tensor: (target, stored names, this rank's span, whether the
    names are the experts of a stack), and the names that do not match."""
    tied = naming == "hf" and getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    by_name, _ = _expert_blocks(model)
    stored = set(reader.names("model"))
    result = LoadResult(path=reader.path, train_state=None)
    wanted: set[str] = set()
    reads = []
    for name, target in model.state_dict(keep_vars=True).items():
        if tied and name == "lm_head.weight":
            continue
        span = row_span(name, target, by_name.get(name))
        stacked = _STACKED.match(name) if naming == "hf" else None
        whole = [span[2], *target.shape[1:]] if span is not None else []
        if stacked and span is not None:
            prefix, projection = stacked.groups()
            names = [f"{prefix}.{e}.{projection}.weight" for e in range(span[0], span[1])]
            wanted.update(f"{prefix}.{e}.{projection}.weight" for e in range(span[2]))
            shapes = {n: list(target.shape[1:]) for n in names}
        else:
            names = [name]
            wanted.add(name)
            shapes = {name: whole}
        ok = True
        for n in names:
            if n not in stored:
                result.missing.append(n)
                ok = False
            elif reader.info(n)[1] != shapes[n]:
                result.mismatched[n] = (reader.info(n)[1], shapes[n])
                ok = False
        if ok:
            reads.append((target, names, span, bool(stacked)))
    result.unexpected = sorted(stored - wanted)  # experts of other ranks are wanted, not unexpected
    return reads, result


def load_sharded(path: str | os.PathLike[str], model: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None, *, strict: bool = True,
                 verify: bool = True, restore_rng: bool = True) -> LoadResult:
    """Load a checkpoint (of any world size and layout, sharded or not) into this rank's shards of
    ``model`` and ``optimizer``, reading only the rows this rank owns.

    Not a collective: each rank reads on its own (they may run at once).

    Args:
        path: a checkpoint directory or root (its ``latest``).
        model: the sharded (FSDP2 and/or expert-parallel) or plain model.
        optimizer: its optimizer (None: skip the optimizer state).
        strict: raise when model tensors are missing, unexpected or of the wrong shape.
        verify: check what is read against the manifest's checksums (only the chunks read).
        restore_rng: restore the RNG states saved with the checkpoint.

    Returns:
        A :class:`k2.checkpoint.LoadResult`; ``bytes_read`` is what this rank read and hashed.

    Raises:
        CheckpointError: naming the tensor and file of a mismatch or corrupt chunk.
    """
    reader = CheckpointReader(resolve(path))
    meta = reader.read_json("checkpoint.json", verify=verify) if reader.has_file("checkpoint.json") else {}
    naming = "hf" if hasattr(model, "to_hf_state_dict") else "state_dict"
    if meta.get("model_naming", naming) != naming:
        raise CheckpointError(f"checkpoint {reader.path} names model tensors by {meta['model_naming']}, "
                              f"but {type(model).__name__} uses {naming} names")
    reads, result = _model_reads(model, reader, naming)
    if strict and (result.missing or result.unexpected or result.mismatched):
        raise CheckpointError(f"checkpoint {reader.path} does not match the model: " + _describe(result))
    with torch.no_grad():
        for target, names, span, stacked in reads:
            if stacked:  # this rank's experts, one Hub tensor each
                if not names:
                    continue
                source = torch.stack([reader.tensor(n, verify=verify) for n in names])
            else:
                source = _read_rows(reader, names[0], span, verify)
            dest = _local_rows(target)
            dest.copy_(source.reshape(dest.shape).to(dest.dtype))

    if optimizer is not None:
        if reader.has_file("optimizer.json"):
            structure = reader.read_json("optimizer.json", verify=verify)["state_dict"]
            state = decode(structure, _optimizer_reader(reader, model, optimizer, verify))
            try:
                optimizer.load_state_dict(state)
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"the optimizer state in {reader.path} does not fit "
                                      f"{type(optimizer).__name__}: {err}") from err
        elif strict:
            raise CheckpointError(f"checkpoint {reader.path} holds no optimizer state")
    if reader.has_file("train_state.json"):
        state = decode(reader.read_json("train_state.json", verify=verify),
                       lambda n: reader.tensor(n, verify=verify).clone())
        result.train_state = state["user"]
        if restore_rng and "rng" in state:
            set_rng_state(state["rng"])
    result.bytes_read = reader.bytes_read
    return result


def _optimizer_reader(reader: CheckpointReader, model: nn.Module, optimizer: torch.optim.Optimizer,
                      verify: bool):  # noqa: ANN202 - decode's tensor callback
    """``name -> tensor`` for the optimizer state: this rank's rows of a state tensor of its
    parameter's whole shape (a DTensor laid out as the parameter under FSDP2), else the whole."""
    params = _optimizer_params(optimizer)
    _, by_id = _expert_blocks(model)

    def read(name: str) -> Tensor:
        match = _OPT_STATE.match(name)
        _, shape, _ = reader.info(name)
        if match is None or int(match.group(1)) >= len(params):
            return reader.tensor(name, verify=verify).clone()
        param = params[int(match.group(1))]
        span = row_span(name, param, by_id.get(id(param)))
        if span is None or not shape or shape[0] != span[2] or shape[1:] != list(param.shape[1:]):
            return reader.tensor(name, verify=verify).clone()
        rows = _read_rows(reader, name, span, verify).clone()
        if isinstance(param, DTensor):
            return DTensor.from_local(rows.to(_local_rows(param).device), param.device_mesh, param.placements,
                                      run_check=False, shape=param.shape, stride=param.stride())
        return rows

    return read
