"""MLA decode over the latent cache, absorbed form: the launcher of ``cuda/mla_decode.cu`` and
its PyTorch reference (docs/kernels.md, "MLA").

Terms: B sequences, T new query tokens per sequence, H heads, S cache columns, R kv_lora_rank,
P qk_rope_head_dim. Query token t of head h is ``[q_latent, q_pe]`` with
``q_latent = q_nope W_uk`` (the key half of ``kv_b_proj`` folded into the query); key j is
``[c_j, k_pe_j]`` and its value is ``c_j``, shared by every head (docs/model.md, "Attention").

Cache layout: ``c`` [B, S, R] and ``k_pe`` [B, S, P] (any batch and row strides, contiguous
last dimension), and per sequence a key range ``[starts[b], ends[b])``. New token t (of T) sees
keys ``[starts[b], ends[b] - (T - 1 - t))``: the new tokens are the range's last T columns, each
seeing itself and what precedes it. The model's :class:`~k2.model.mla.KVCache` is the range
``[0, length)``; left-padded prompts and the rollout engine's right-aligned
:class:`~k2.rl.slots.SlotCache` rows are ``[first valid column, length)``:
:func:`ranges_from_valid` turns their boolean ``valid`` mask into the ranges.

* :func:`mla_decode_reference` — the absorbed attention in PyTorch, the same math as
  :meth:`k2.model.mla.MLA._absorbed` (scores of ``q * scale`` against ``[c, k_pe]``, softmax,
  ``probs.to(c.dtype) @ c``) with the heads folded into the rows of one product per sequence:
  the CPU path and the oracle of the GPU tests;
* :func:`mla_decode` — the kernel for bf16 CUDA tensors of supported shapes, the reference
  everywhere else;
* :func:`absorbed_decode` — the whole absorbed step from ``q_nope`` (folding ``W_uk`` in and
  ``W_uv`` out), a drop-in for ``MLA._absorbed`` given the cache ranges.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from k2.errors import KernelError

ROWS = 64     # query rows per block (ROWS in mla_decode.cu)
KEYS = 32     # keys per tile (KEYS)
PAD = 8       # bf16 padding of shared rows (PAD)
THREADS = 256
MAX_RANK = 512


def ranges_from_valid(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(starts, ends)`` (int32 [B]) of a boolean cache mask ``valid`` [B, S] whose True entries
    form one contiguous run per row (right-aligned slots, left-padded prompts, a plain cache).

    Raises:
        KernelError: a row with no valid column, or with a gap inside its valid columns.
    """
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise KernelError(f"mla_decode: valid must be a bool [B, S] mask, got {valid.dtype} "
                          f"{tuple(valid.shape)}")
    S = valid.shape[1]
    index = torch.arange(S, device=valid.device)
    count = valid.sum(dim=1)
    first = torch.where(valid, index, S).amin(dim=1)
    last = torch.where(valid, index, -1).amax(dim=1)
    bad = (count == 0) | (last - first + 1 != count)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise KernelError(f"mla_decode: cache row {row} has no valid column or its valid columns "
                          "are not one contiguous range; the decode kernel needs [start, end) "
                          "ranges")
    return first.to(torch.int32), (last + 1).to(torch.int32)


def _check(q_latent, q_pe, c, k_pe, starts, ends) -> None:
    if q_latent.dim() != 4 or q_pe.dim() != 4 or q_latent.shape[:3] != q_pe.shape[:3]:
        raise KernelError(f"mla_decode: q_latent [B, T, H, R] and q_pe [B, T, H, P] disagree: "
                          f"{tuple(q_latent.shape)} vs {tuple(q_pe.shape)}")
    B, T, _, R = q_latent.shape
    P = q_pe.shape[-1]
    if c.dim() != 3 or k_pe.dim() != 3 or c.shape[0] != B or k_pe.shape[0] != B \
            or c.shape[2] != R or k_pe.shape[2] != P or c.shape[1] != k_pe.shape[1]:
        raise KernelError(f"mla_decode: cache c {tuple(c.shape)} / k_pe {tuple(k_pe.shape)} do not "
                          f"match queries [B={B}, T={T}, H, R={R}] / [.., P={P}]")
    if starts.shape != (B,) or ends.shape != (B,):
        raise KernelError(f"mla_decode: starts/ends must be [B={B}], got {tuple(starts.shape)} / "
                          f"{tuple(ends.shape)}")


def _validate_ranges(starts: torch.Tensor, ends: torch.Tensor, T: int, S: int) -> None:
    bad = (starts < 0) | (ends > S) | (ends - starts < T)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise KernelError(f"mla_decode: sequence {b} has key range [{int(starts[b])}, "
                          f"{int(ends[b])}) in a cache of {S} columns; it must lie inside the "
                          f"cache and hold the {T} new token(s)")


def decode_allowed(starts: torch.Tensor, ends: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """The [B, T, S] bool mask of the ranges: token t sees ``[starts, ends - (T - 1 - t))``."""
    key = torch.arange(S, device=starts.device)
    t = torch.arange(T, device=starts.device)
    limit = ends.long()[:, None] - (T - 1 - t)[None, :]  # [B, T]
    return (key[None, None, :] >= starts.long()[:, None, None]) & (key[None, None, :] < limit[..., None])


def mla_decode_reference(q_latent: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor,
                         k_pe: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed decode in PyTorch, the math of ``MLA._absorbed``.

    Args:
        q_latent: [B, T, H, R] (``q_nope W_uk``); q_pe: [B, T, H, P] (rotated).
        c: [B, S, R] cached latents; k_pe: [B, S, P] cached rotary keys.
        starts, ends: [B] integer key ranges (see the module docstring).
        scale: the softmax scale.

    Returns:
        ``(out_latent [B, T, H, R]`` in ``c.dtype``, ``lse [B, T, H]`` fp32 (fp64 for fp64
        inputs): the natural log-sum-exp of each row's scaled scores).
    """
    _check(q_latent, q_pe, c, k_pe, starts, ends)
    B, T, H, R = q_latent.shape
    S = c.shape[1]
    _validate_ranges(starts.cpu(), ends.cpu(), T, S)
    acc = torch.float64 if c.dtype == torch.float64 else torch.float32
    # Heads fold into the rows of one product per sequence: [B, T H, R+P] x [B, R+P, S]. (A
    # broadcast matmul over [B, H, T, .] x [B, 1, S, .] would copy the cache once per head.)
    q = torch.cat((q_latent, q_pe), dim=-1).reshape(B, T * H, -1)
    k = torch.cat((c, k_pe), dim=-1)                              # [B, S, R+P]
    scores = torch.bmm(q * scale, k.transpose(1, 2)).to(acc)      # [B, T H, S]
    allowed = decode_allowed(starts.to(c.device), ends.to(c.device), T, S)  # [B, T, S]
    allowed = allowed[:, :, None, :].expand(B, T, H, S).reshape(B, T * H, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs.to(c.dtype), c)                         # [B, T H, R]
    lse = torch.logsumexp(scores, dim=-1)
    return out.view(B, T, H, R), lse.view(B, T, H)


def supported(q_latent: torch.Tensor, q_pe: torch.Tensor) -> bool:
    """Whether the kernel handles these dimensions (R % 64 == 0, R <= 512, P % 16 == 0)."""
    R, P = q_latent.shape[-1], q_pe.shape[-1]
    return R % 64 == 0 and 0 < R <= MAX_RANK and P % 16 == 0


def partial_smem_bytes(R: int, P: int) -> int:
    """Dynamic shared memory of ``mla_decode_partial`` (the layout at the top of the kernel)."""
    ld = R + P + PAD
    return (ROWS * ld + 2 * KEYS * ld) * 2 + ROWS * (KEYS + 4) * 4 + ROWS * (KEYS + PAD) * 2 + 2 * ROWS * 4


def fits_device(device: torch.device, R: int, P: int) -> bool:
    """Whether the device lets a block opt in to the decode kernel's shared memory (A100 and
    Hopper do at K2's dims; 99 KiB consumer parts only at smaller ranks)."""
    props = torch.cuda.get_device_properties(device)
    return partial_smem_bytes(R, P) <= props.shared_memory_per_block_optin


def choose_splits(batch: int, row_groups: int, keys: int, sms: int) -> int:
    """Splits of the context per sequence: enough blocks for two waves over ``sms``
    multiprocessors, never a split shorter than one tile."""
    want = math.ceil(2 * sms / max(1, batch * row_groups))
    return max(1, min(want, math.ceil(max(keys, 1) / KEYS), 64))


def _rows_ok(t: torch.Tensor) -> bool:
    """Contiguous last dimension, 16-byte aligned base and row/batch strides."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s % 8 == 0 for s in t.stride()[:-1]))


def mla_decode_cuda(q_latent, q_pe, c, k_pe, starts, ends, scale: float,
                    splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on bf16 CUDA tensors (shapes as :func:`mla_decode_reference`; ranges already
    validated). Returns ``(out_latent [B, T, H, R]`` bf16, ``lse [B, T, H]`` fp32)."""
    from k2.kernels.launch import kernel, launch, ptr

    dev = q_latent.device
    B, T, H, R = q_latent.shape
    P, S = q_pe.shape[-1], c.shape[1]
    M = T * H
    q = torch.cat((q_latent, q_pe), dim=-1).to(torch.bfloat16).contiguous()  # [B, T, H, R+P]
    c = c if _rows_ok(c) else c.contiguous()
    k_pe = k_pe if _rows_ok(k_pe) else k_pe.contiguous()
    starts = starts.to(device=dev, dtype=torch.int32).contiguous()
    ends = ends.to(device=dev, dtype=torch.int32).contiguous()
    row_groups = (M + ROWS - 1) // ROWS
    if splits is None:
        splits = choose_splits(B, row_groups, S, torch.cuda.get_device_properties(dev).multi_processor_count)
    o_part = torch.empty(B, splits, M, R, dtype=torch.float32, device=dev)
    lse_part = torch.empty(B, splits, M, dtype=torch.float32, device=dev)
    out = torch.empty(B, T, H, R, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=dev)
    smem = partial_smem_bytes(R, P)
    partial = kernel("mla_decode.cu", "mla_decode_partial", dev)
    if getattr(partial, "max_dynamic_shared_size_bytes", None) != smem:
        partial.max_dynamic_shared_size_bytes = smem
    i32, i64 = np.int32, np.int64
    launch(partial, (splits, row_groups, B), (THREADS, 1, 1),
           (ptr(q), i64(M * (R + P)), i32(M), i32(H), i32(T),
            ptr(c), i64(c.stride(0)), i64(c.stride(1)),
            ptr(k_pe), i64(k_pe.stride(0)), i64(k_pe.stride(1)),
            ptr(starts), ptr(ends), i32(R), i32(P), np.float32(scale), i32(splits),
            ptr(o_part), ptr(lse_part)), dev, shared_mem=smem)
    launch(kernel("mla_decode.cu", "mla_decode_combine", dev), (M, B, 1), (128, 1, 1),
           (ptr(o_part), ptr(lse_part), i32(M), i32(R), i32(splits), ptr(out), ptr(lse)), dev)
    return out, lse


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor,
               starts: torch.Tensor, ends: torch.Tensor, scale: float, *,
               validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed decode: the kernel for bf16 CUDA tensors of supported dimensions (on a device
    with enough shared memory), the reference elsewhere (same arguments and results as :func:`mla_decode_reference`).

    ``validate`` checks the ranges (one device sync on the GPU); pass False when they are known
    to be good, e.g. once per batch composition rather than per layer.
    """
    from k2.kernels.launch import use_kernel

    _check(q_latent, q_pe, c, k_pe, starts, ends)
    if not (use_kernel(q_latent, q_pe, c, k_pe) and c.dtype == torch.bfloat16
            and k_pe.dtype == torch.bfloat16 and supported(q_latent, q_pe)
            and fits_device(c.device, q_latent.shape[-1], q_pe.shape[-1])):
        return mla_decode_reference(q_latent, q_pe, c, k_pe, starts, ends, scale)
    if validate:
        _validate_ranges(starts, ends, q_latent.shape[1], c.shape[1])
    return mla_decode_cuda(q_latent, q_pe, c, k_pe, starts, ends, scale)


def absorbed_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor,
                    kv_b_weight: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                    scale: float, *, validate: bool = True) -> torch.Tensor:
    """``MLA._absorbed`` over a ranged cache: fold ``W_uk`` into the query, attend with
    :func:`mla_decode`, unfold ``W_uv``.

    Args:
        q_nope: [B, T, H, N]; q_pe: [B, T, H, P] (rotated); c, k_pe: the cache as in
            :func:`mla_decode_reference`; kv_b_weight: ``kv_b_proj.weight`` [H (N + V), R].

    Returns:
        [B, T, H, V] in ``c.dtype``.
    """
    B, T, H, N = q_nope.shape
    R = c.shape[-1]
    w = kv_b_weight.view(H, -1, R)
    w_uk, w_uv = w[:, :N], w[:, N:]
    q_latent = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)
    out_latent, _ = mla_decode(q_latent, q_pe, c, k_pe, starts, ends, scale, validate=validate)
    return torch.einsum("bthr,hvr->bthv", out_latent.to(w_uv.dtype), w_uv)
