"""How tensors map onto buckets, seen from torch: the plan, model checks, packing and landing.

Both transports (shared memory and ``torch.distributed``) move the same buckets, built by the
native :class:`k2._native.BucketPlan`: tensors packed 256-byte aligned, in name order, into
fixed-size buckets. The publisher *packs* each bucket from its tensors; a subscriber *lands*
the pieces it wants into a private landing buffer and, once every bucket has landed, *applies*
the landing buffer to its model under its lock.

A subscriber may want only some rows (dim 0) of a tensor: ``slices={"w": slice(0, 128)}`` for a
tensor-parallel row range, or ``slices={"experts.gate_proj": [3, 17, 42]}`` for a subset of
experts of a stacked ``[E, ...]`` tensor. Its model tensor then has the slice's shape.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence

import torch

from k2 import _native
from k2.errors import BroadcastError

Rows = slice | range | Sequence[int]
"""A selection of rows along dim 0: a slice/range with step 1, or a list of row indices."""

Spec = _native.TensorSpec
"""A tensor as the native plan sees it: ``name``, ``dtype``, ``shape``, ``itemsize``."""

TensorSource = Mapping[str, torch.Tensor] | torch.nn.Module


def named_tensors(source: TensorSource) -> Callable[[], dict[str, torch.Tensor]]:
    """A function returning the current ``name -> tensor`` mapping of ``source``.

    A module is read through ``state_dict(keep_vars=True)`` at every call, so parameters that
    were replaced (``p.data = ...``) are still found.
    """
    if isinstance(source, torch.nn.Module):
        return lambda: {k: v.detach() for k, v in source.state_dict(keep_vars=True).items()}
    tensors = dict(source)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise BroadcastError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return lambda: tensors


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def tensor_specs(tensors: Mapping[str, torch.Tensor]) -> list[Spec]:
    """The plan's view of ``tensors``, sorted by name (so every process packs the same way)."""
    return [
        _native.TensorSpec(name, dtype_name(t.dtype), list(t.shape), t.element_size())
        for name, t in sorted(tensors.items())
    ]


def make_plan(tensors: Mapping[str, torch.Tensor], bucket_bytes: int) -> _native.BucketPlan:
    """The bucket plan of ``tensors`` with buckets of ``bucket_bytes`` (a multiple of 256)."""
    return _native.BucketPlan(tensor_specs(tensors), bucket_bytes)


def row_ranges(rows: Rows, num_rows: int, name: str) -> list[tuple[int, int]]:
    """``rows`` as ``(start, stop)`` ranges, consecutive indices merged, order kept.

    Raises:
        BroadcastError: if a slice has a step other than 1 or an index is out of range.
    """
    if isinstance(rows, (slice, range)):
        start, stop, step = (rows.indices(num_rows) if isinstance(rows, slice)
                             else (rows.start, rows.stop, rows.step))
        if step != 1:
            raise BroadcastError(f"{name}: a row slice must have step 1, got {step}")
        if not 0 <= start < stop <= num_rows:
            raise BroadcastError(f"{name}: rows {start}..{stop} are empty or outside its {num_rows} rows")
        return [(start, stop)]
    ranges: list[tuple[int, int]] = []
    for i in rows:
        i = int(i)
        if not 0 <= i < num_rows:
            raise BroadcastError(f"{name}: row {i} is outside its {num_rows} rows")
        if ranges and ranges[-1][1] == i:
            ranges[-1] = (ranges[-1][0], i + 1)
        else:
            ranges.append((i, i + 1))
    if not ranges:
        raise BroadcastError(f"{name}: an empty row selection")
    return ranges


def model_differences(
    published: Sequence[Spec],
    model: Mapping[str, torch.Tensor],
    slices: Mapping[str, Rows],
    strict: bool,
) -> list[str]:
    """Every way ``model`` (with ``slices``) does not fit the published tensors, one line each.

    Args:
        published: the announced specs.
        model: the subscriber's tensors; sliced ones have the slice's shape.
        slices: rows wanted per tensor name.
        strict: whether a published tensor missing from the model is a difference.

    Returns:
        Human-readable differences; empty when the model fits.
    """
    specs = {s.name: (s.dtype, s.shape) for s in published}
    out = [f"{n}: in the model but not published" for n in sorted(model) if n not in specs]
    if strict:
        out += [f"{n}: published but not in the model" for n in sorted(specs) if n not in model]
    out += [f"{n}: a slice is asked of a tensor the model does not have" for n in sorted(slices) if n not in model]
    for name in sorted(set(specs) & set(model)):
        dtype, shape = specs[name]
        t = model[name]
        if dtype_name(t.dtype) != dtype:
            out.append(f"{name}: dtype {dtype_name(t.dtype)} in the model, {dtype} published")
        expected = list(shape)
        if name in slices:
            if not shape:
                out.append(f"{name}: a 0-d tensor cannot be sliced")
                continue
            try:
                ranges = row_ranges(slices[name], shape[0], name)
            except BroadcastError as err:
                out.append(str(err))
                continue
            expected = [sum(b - a for a, b in ranges), *shape[1:]]
        if list(t.shape) != expected:
            sliced = f" (sliced from {tuple(shape)})" if name in slices else ""
            out.append(f"{name}: shape {tuple(t.shape)} in the model, {tuple(expected)} published{sliced}")
    return out


def check_model(published: Sequence[Spec], model: Mapping[str, torch.Tensor],
                slices: Mapping[str, Rows], strict: bool, who: str) -> None:
    """Raise :class:`BroadcastError` listing every difference (see :func:`model_differences`)."""
    differences = model_differences(published, model, slices, strict)
    if differences:
        listing = "\n  ".join(differences)
        raise BroadcastError(f"{who}: the model does not match the published weights:\n  {listing}")


def source_bytes(tensors: Mapping[str, torch.Tensor], plan: _native.BucketPlan) -> list[torch.Tensor]:
    """Each planned tensor of ``tensors`` as a flat uint8 tensor, in plan order.

    Raises:
        BroadcastError: listing tensors whose name, dtype or shape changed since the plan.
    """
    check_model(plan.tensors(), tensors, {}, strict=True, who="publisher")
    out = []
    for spec in plan.tensors():
        t = tensors[spec.name].detach()
        out.append(t.contiguous().reshape(-1).view(torch.uint8))
    return out


def copy_bytes(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each ``(dst, src)`` pair of equally long 1-D uint8 tensors.

    Contiguous CPU pairs go to one native call (every core, no GIL, streaming stores: about
    twice a single ``copy_``); the rest (a GPU side, say) use ``Tensor.copy_``.
    """
    native, other = [], []
    for dst, src in pairs:
        if dst.device.type == src.device.type == "cpu" and dst.is_contiguous() and src.is_contiguous():
            native.append((src.data_ptr(), dst.data_ptr(), dst.numel()))
        else:
            other.append((dst, src))
    if native:
        _native.copy_ranges(native)  # ``pairs`` keeps every tensor alive meanwhile
    with torch.no_grad():
        for dst, src in other:
            dst.copy_(src)


def pack(plan: _native.BucketPlan, bucket: int, sources: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """Copy bucket ``bucket``'s pieces of ``sources`` (see :func:`source_bytes`) into ``out``
    (a uint8 tensor of the bucket's length)."""
    copy_bytes([(out[c.bucket_offset:c.bucket_offset + c.nbytes],
                 sources[c.tensor][c.tensor_offset:c.tensor_offset + c.nbytes])
                for c in plan.chunks(bucket)])


def receive_layout(
    plan: _native.BucketPlan, model: Mapping[str, torch.Tensor], slices: Mapping[str, Rows]
) -> tuple[int, list[tuple[str, int, int]], list[list[_native.Piece]]]:
    """Where a subscriber's wanted bytes go: laid out one after another in a *landing* layout.

    Returns:
        ``(nbytes, targets, pieces)``: the layout's size; per wanted tensor ``(name,
        landing_offset, nbytes)`` in landing order; per bucket its copies (``Piece``:
        ``bucket_offset``, ``landing_offset``, ``nbytes``).
    """
    specs = plan.tensors()
    names = [spec.name for spec in specs]
    index = {name: i for i, name in enumerate(names)}
    shapes = {spec.name: spec.shape for spec in specs}
    wants = []
    for name in sorted(model, key=index.__getitem__):
        rows = row_ranges(slices[name], shapes[name][0], name) if name in slices else None
        wants.append((index[name], rows))
    received = plan.receive_plan(wants)
    targets = [(names[t.tensor], t.landing_offset, t.nbytes) for t in received.targets]
    return received.landing_bytes, targets, received.pieces


class Landing:
    """A subscriber's landing buffer: where buckets land before a version is applied.

    Two ways to apply a landed version (both under the subscriber's lock):

    * copy (default): copy the landing buffer into the model tensors;
    * swap: point every model tensor at its bytes in the landing buffer (``Tensor.set_``) and
      land the next version in a second buffer. No copy, and readers wait only microseconds;
      but the model's storage moves at every update, so nothing may keep a view or data
      pointer of a model tensor across updates (e.g. a cached transpose, a CUDA graph).

    Args:
        plan: the published plan.
        model: the subscriber's tensors (sliced ones with the slice's shape), already checked.
        slices: rows wanted per tensor name.
        swap: apply by swapping storage instead of copying.
    """

    def __init__(self, plan: _native.BucketPlan, model: Mapping[str, torch.Tensor],
                 slices: Mapping[str, Rows], swap: bool = False) -> None:
        nbytes, targets, self.pieces = receive_layout(plan, model, slices)
        devices = {t.device for t in model.values()}
        device = devices.pop() if len(devices) == 1 else torch.device("cpu")
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device)
                        for _ in range(2 if swap else 1)]
        self.swap = swap
        self._next = 0  # the buffer the next version lands in
        # (model tensor, byte offset of its bytes in a landing buffer)
        self.targets = [(model[name], offset) for name, offset, _ in targets]

    def direct(self, bucket: int, window: tuple[int, int]) -> torch.Tensor | None:
        """Where bucket ``bucket`` can be received with no copy at all, or None.

        That is possible when this subscriber's landing buffer mirrors the plan's arena (it
        takes every tensor whole), so the bucket's ``window`` (start, end) is a slice of it;
        any padding at the window's end lands on bytes no tensor owns.
        """
        start, end = window
        pieces = self.pieces[bucket]
        if len(pieces) == 1 and (pieces[0].bucket_offset, pieces[0].landing_offset) == (0, start):
            return self.buffers[self._next][start:end]
        return None

    def land(self, bucket: int, data: torch.Tensor) -> None:
        """Copy this subscriber's pieces of bucket ``bucket`` (uint8 ``data``) into the buffer."""
        buffer = self.buffers[self._next]
        copy_bytes([(buffer[p.landing_offset:p.landing_offset + p.nbytes],
                     data[p.bucket_offset:p.bucket_offset + p.nbytes])
                    for p in self.pieces[bucket]])

    def apply(self) -> None:
        """Put the landed version into the model (the caller holds the subscriber's lock)."""
        buffer = self.buffers[self._next]
        pairs = []
        with torch.no_grad():
            for tensor, offset in self.targets:
                if self.swap:
                    strides = torch.empty(tensor.shape, device="meta").stride()
                    tensor.set_(buffer.untyped_storage(), offset // tensor.element_size(),
                                tensor.shape, strides)
                    continue
                landed = buffer[offset:offset + tensor.numel() * tensor.element_size()]
                if tensor.is_contiguous():
                    pairs.append((tensor.reshape(-1).view(torch.uint8), landed))
                else:
                    tensor.copy_(landed.view(tensor.dtype).view(tensor.shape))
        copy_bytes(pairs)
        self._next = (self._next + 1) % len(self.buffers)


class InPlace:
    """Copies of a version that landed whole in shared memory straight into the model tensors
    (one copy per byte, no landing buffer); the subscriber runs them under its lock.

    Every model tensor must be a contiguous CPU tensor; that is checked again at every update,
    since a tensor's storage may have been replaced in between.

    Args:
        plan: the published plan.
        model: the subscriber's tensors (sliced ones with the slice's shape), already checked.
        slices: rows wanted per tensor name.
    """

    def __init__(self, plan: _native.BucketPlan, model: Mapping[str, torch.Tensor],
                 slices: Mapping[str, Rows]) -> None:
        _, targets, pieces = receive_layout(plan, model, slices)
        self.targets = [(name, model[name]) for name, _, _ in targets]
        starts = [offset for _, offset, _ in targets]
        # A landing piece may run over several tensors (and the padding between them): cut it
        # into per-tensor copies, (bucket_offset, target, offset in the tensor, nbytes).
        self._copies: list[list[tuple[int, int, int, int]]] = []
        for bucket_pieces in pieces:
            out = []
            for piece in bucket_pieces:
                bucket_offset, lo, n = piece.bucket_offset, piece.landing_offset, piece.nbytes
                i = max(bisect.bisect_right(starts, lo) - 1, 0)
                while i < len(targets) and starts[i] < lo + n:
                    _, start, size = targets[i]
                    a, b = max(lo, start), min(lo + n, start + size)
                    if a < b:
                        out.append((bucket_offset + a - lo, i, a - start, b - a))
                    i += 1
            self._copies.append(out)

    @staticmethod
    def unsuitable(model: Mapping[str, torch.Tensor]) -> str | None:
        """Why ``model`` cannot take a version in place, or None if it can."""
        for name, t in model.items():
            if t.device.type != "cpu":
                return f"{name} is on {t.device}, not the CPU"
            if not t.is_contiguous():
                return f"{name} is not contiguous"
        return None

    def copies(self) -> list[list[tuple[int, int, int]]]:
        """Per bucket, ``(bucket_offset, address, nbytes)`` of every copy into the model."""
        why = self.unsuitable(dict(self.targets))
        if why is not None:
            raise BroadcastError(f"cannot copy a version into the model in place: {why}")
        addresses = [t.data_ptr() for _, t in self.targets]
        return [[(bucket_offset, addresses[i] + offset, n) for bucket_offset, i, offset, n in bucket]
                for bucket in self._copies]
