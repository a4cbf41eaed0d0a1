"""MoE dispatch and combine: the PyTorch reference and the CUDA kernels, with autograd.

Terms: T tokens each routed to k experts (``topk_idx`` [T, k]), N = T k assignments (assignment
``a = t k + s``), E experts, rows of H features.

* :func:`route` — the expert histogram, exclusive offsets, and for every assignment its row in
  expert-contiguous order (stable: within an expert, assignments keep their order);
* :func:`permute` — gather token rows into that order: ``rows[p] = x[token of row p]``;
* :func:`combine` — ``out[t] = Σ_s w[t, s] · rows[pos[t k + s]]``, accumulated in fp32.

Both ``permute`` and ``combine`` are differentiable, with hand-written backward passes made only of
gathers: on CUDA (bf16 or fp32) the kernels of ``cuda/moe_dispatch.cu``, elsewhere the same
gathers in PyTorch. ``permute_reference`` and ``combine_reference`` are the plain-PyTorch oracles
(autograd through ``index_select``/``index_add``) the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from k2.errors import KernelError

_CHUNK = 256  # assignments per block in the counting kernels (CHUNK in moe_dispatch.cu)


@dataclass(frozen=True)
class Routing:
    """Where every assignment goes. All tensors are int64 on the routing's device."""

    tokens_per_expert: torch.Tensor  # [E]
    expert_offsets: torch.Tensor     # [E + 1], exclusive prefix sum; last entry N
    pos: torch.Tensor                # [N], row of assignment a
    assignment_of_row: torch.Tensor  # [N], inverse of pos
    k: int

    @property
    def token_of_row(self) -> torch.Tensor:
        """[N]: the token whose features fill each row."""
        return self.assignment_of_row // self.k


def _check_topk(topk_idx: torch.Tensor) -> None:
    if topk_idx.dim() != 2 or topk_idx.dtype != torch.int64:
        raise ValueError(f"topk_idx must be an int64 [T, k] tensor, got {topk_idx.dtype} "
                         f"{tuple(topk_idx.shape)}")


def route_reference(topk_idx: torch.Tensor, num_experts: int) -> Routing:
    """:func:`route` in PyTorch (a stable sort of the expert ids)."""
    _check_topk(topk_idx)
    flat = topk_idx.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    order = torch.argsort(flat, stable=True)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(flat.numel(), device=flat.device)
    return Routing(counts, offsets, pos, order, topk_idx.shape[1])


def route(topk_idx: torch.Tensor, num_experts: int) -> Routing:
    """Histogram, offsets and expert-contiguous positions of ``topk_idx`` [T, k] (int64)."""
    from k2.kernels.launch import kernel, launch, ptr, use_kernel

    if not use_kernel(topk_idx) or topk_idx.numel() == 0:
        return route_reference(topk_idx, num_experts)
    _check_topk(topk_idx)
    dev = topk_idx.device
    flat = topk_idx.reshape(-1).contiguous()
    N, E = flat.numel(), num_experts
    nblk = (N + _CHUNK - 1) // _CHUNK
    counts = torch.zeros(nblk, E, dtype=torch.int32, device=dev)
    bad = torch.zeros(1, dtype=torch.int32, device=dev)
    tokens = torch.empty(E, dtype=torch.int64, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int64, device=dev)
    chunk_start = torch.empty(nblk, E, dtype=torch.int32, device=dev)
    pos = torch.empty(N, dtype=torch.int64, device=dev)
    inverse = torch.empty(N, dtype=torch.int64, device=dev)
    i32 = np.int32
    launch(kernel("moe_dispatch.cu", "moe_block_counts", dev), (nblk, 1, 1), (_CHUNK, 1, 1),
           (ptr(flat), i32(N), i32(E), ptr(counts), ptr(bad)), dev)
    if int(bad.item()):
        raise ValueError(f"expert ids must lie in [0, {E}), got "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    launch(kernel("moe_dispatch.cu", "moe_offsets", dev), (1, 1, 1), (256, 1, 1),
           (ptr(counts), i32(nblk), i32(E), ptr(tokens), ptr(offsets), ptr(chunk_start)), dev)
    launch(kernel("moe_dispatch.cu", "moe_positions", dev), (nblk, 1, 1), (_CHUNK, 1, 1),
           (ptr(flat), i32(N), i32(E), ptr(offsets), ptr(chunk_start), ptr(pos), ptr(inverse)),
           dev)
    return Routing(tokens, offsets, pos, inverse, topk_idx.shape[1])


def permute_reference(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """:func:`permute` in PyTorch."""
    return x.index_select(0, routing.token_of_row)


def combine_reference(rows: torch.Tensor, weights: torch.Tensor, routing: Routing) -> torch.Tensor:
    """:func:`combine` in PyTorch: one weighted scatter-add into token order (fp32 accumulation
    for 16-bit rows), result in ``rows.dtype``."""
    T = weights.shape[0]
    acc = torch.float32 if rows.dtype in (torch.bfloat16, torch.float16) else rows.dtype
    row_weights = weights.reshape(-1).index_select(0, routing.assignment_of_row).to(acc)  # [N]
    out = rows.new_zeros(T, rows.shape[1], dtype=acc)
    out.index_add_(0, routing.token_of_row, rows.to(acc) * row_weights[:, None])
    return out.to(rows.dtype)


def _kernel_dtype(t: torch.Tensor) -> str | None:
    return {torch.bfloat16: "bf16", torch.float32: "f32"}.get(t.dtype)


def _on_kernel(t: torch.Tensor) -> bool:
    from k2.kernels.launch import use_kernel

    return _kernel_dtype(t) is not None and use_kernel(t)


# The three row operations behind permute, combine and their backward passes. Each is a gather
# (never a scatter: every output row is written once), run by a CUDA kernel on the GPU and by the
# equivalent PyTorch gathers elsewhere, so the CPU exercises the same autograd wiring as the GPU.

def _gather(src, src_row, scale, n_rows):
    """``dst[p] = scale[p] * src[src_row[p]]`` (scale may be None)."""
    if not _on_kernel(src):
        out = src.index_select(0, src_row)
        return out if scale is None else out * scale.to(out.dtype)[:, None]
    from k2.kernels.launch import kernel, launch, ptr

    H = src.shape[1]
    dst = torch.empty(n_rows, H, dtype=src.dtype, device=src.device)
    fn = kernel("moe_dispatch.cu", f"moe_gather_rows_{_kernel_dtype(src)}", src.device)
    if n_rows:
        launch(fn, (min(n_rows, 65535), 1, 1), (256, 1, 1),
               (ptr(src), ptr(src_row), ptr(scale), ptr(dst), np.int32(n_rows), np.int32(H)),
               src.device)
    return dst


def _combine(rows, pos, weights, T, k):
    """``out[t] = sum_s w[t, s] * rows[pos[t k + s]]`` (weights None: all 1), fp32 accumulation."""
    if not _on_kernel(rows):
        picked = rows.index_select(0, pos).view(T, k, -1)                       # [T, k, H]
        acc = torch.float32 if rows.dtype in (torch.bfloat16, torch.float16) else rows.dtype
        if weights is None:
            return picked.sum(1, dtype=acc).to(rows.dtype)
        return torch.einsum("tkh,tk->th", picked.to(acc), weights.to(acc)).to(rows.dtype)
    from k2.kernels.launch import kernel, launch, ptr

    H = rows.shape[1]
    out = torch.empty(T, H, dtype=rows.dtype, device=rows.device)
    fn = kernel("moe_dispatch.cu", f"moe_combine_{_kernel_dtype(rows)}", rows.device)
    if T:
        launch(fn, (min(T, 65535), 1, 1), (256, 1, 1),
               (ptr(rows), ptr(pos), ptr(weights), ptr(out), np.int32(T), np.int32(k),
                np.int32(H)), rows.device)
    return out


def _combine_grad_w(grad_out, rows, pos, T, k):
    """``grad_w[t, s] = <grad_out[t], rows[pos[t k + s]]>`` in fp32 (the input dtype for fp64)."""
    if not _on_kernel(rows):
        picked = rows.index_select(0, pos).view(T, k, -1)
        acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
        return torch.einsum("tkh,th->tk", picked.to(acc), grad_out.to(acc))
    from k2.kernels.launch import kernel, launch, ptr

    N, H = T * k, rows.shape[1]
    grad_w = torch.empty(T, k, dtype=torch.float32, device=rows.device)
    fn = kernel("moe_dispatch.cu", f"moe_combine_grad_w_{_kernel_dtype(rows)}", rows.device)
    if N:
        launch(fn, (min((N + 7) // 8, 65535), 1, 1), (256, 1, 1),
               (ptr(grad_out), ptr(rows), ptr(pos), ptr(grad_w), np.int32(N), np.int32(k),
                np.int32(H)), rows.device)
    return grad_w


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_of_row, pos, k):
        ctx.save_for_backward(pos)
        ctx.T, ctx.k = x.shape[0], k
        return _gather(x.contiguous(), token_of_row, None, token_of_row.numel())

    @staticmethod
    def backward(ctx, grad_rows):
        (pos,) = ctx.saved_tensors
        # Each token's gradient is the sum of its k rows' gradients: a combine with weights 1.
        return _combine(grad_rows.contiguous(), pos, None, ctx.T, ctx.k), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weights, pos, assignment_of_row, k):
        rows = rows.contiguous()
        w = (weights.double() if rows.dtype == torch.float64 else weights.float()).contiguous()
        ctx.save_for_backward(rows, w, pos, assignment_of_row)
        ctx.k, ctx.weights_dtype = k, weights.dtype
        return _combine(rows, pos, w, weights.shape[0], k)

    @staticmethod
    def backward(ctx, grad_out):
        rows, w, pos, assignment_of_row = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        T, k = w.shape
        grad_rows = grad_w = None
        if ctx.needs_input_grad[0]:
            scale = w.reshape(-1).index_select(0, assignment_of_row)   # weight of each row
            grad_rows = _gather(grad_out, assignment_of_row // k, scale, rows.shape[0])
        if ctx.needs_input_grad[1]:
            grad_w = _combine_grad_w(grad_out, rows, pos, T, k).to(ctx.weights_dtype)
        return grad_rows, grad_w, None, None, None


def permute(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Rows of ``x`` [T, H] in expert-contiguous order: [N, H]. Differentiable."""
    if x.dim() != 2:
        raise KernelError(f"permute: x must be [T, H], got shape {tuple(x.shape)}")
    return _Permute.apply(x, routing.token_of_row, routing.pos, routing.k)


def combine(rows: torch.Tensor, weights: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Weighted sum of each token's k expert rows back in token order: [T, H]. Differentiable in
    ``rows`` and ``weights`` [T, k]."""
    if rows.dim() != 2 or weights.shape[0] * weights.shape[1] != rows.shape[0]:
        raise KernelError(f"combine: rows {tuple(rows.shape)} do not match weights "
                          f"{tuple(weights.shape)}")
    return _Combine.apply(rows, weights, routing.pos, routing.assignment_of_row, routing.k)
