"""MLA training attention that returns each head's max logit: the launcher of
``cuda/mla_attention.cu``, its PyTorch reference, and the autograd function around them
(docs/kernels.md, "MLA").

Terms: B sequences of T tokens (packed documents), H heads, Dk = qk_nope + qk_rope,
Dv = v_head_dim. ``q``, ``k`` [B, H, T, Dk] and ``v`` [B, H, T, Dv] are the naive MLA path's
per-head tensors (:meth:`k2.model.mla.MLA._naive`). Documents follow the model's rule
(:func:`k2.model.mla.build_attention_mask`): a position that does not exceed its predecessor's
starts a new document, and query i sees keys j with ``doc_start[i] <= j <= i``.

The max logit is QK-Clip's S_max (docs/optim.md): per head, the largest ``scale * q_i . k_j``
over allowed pairs (the quantity ``MLA._record_max_logits`` records), here taken from the same
scores the forward already computes instead of a second QK pass.

* :func:`mla_attention_reference` — PyTorch: scores, the masked max, softmax, ``P V``;
* :func:`mla_attention_forward` — the kernel for bf16 CUDA tensors of supported shapes, the
  reference elsewhere; returns ``(out, max_logits [H])``;
* :class:`MLAAttention` / :func:`mla_attention` — differentiable in q, k, v. **The backward is
  PyTorch's reference math** (autograd through :func:`mla_attention_reference` recomputed in
  fp32), not a kernel: correct, O(T²) memory per head, as slow as the reference.
"""

from __future__ import annotations

import numpy as np
import torch

from k2.errors import KernelError

QTILE = 64    # queries per block (QTILE in mla_attention.cu)
KTILE = 64    # keys per shared-memory tile (KTILE)
THREADS = 128
DK_MAX = 192
DV_MAX = 128


def doc_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] int64: the index of the first token of each token's document (a position not
    greater than its predecessor starts one, as in ``build_attention_mask``)."""
    if position_ids.dim() != 2:
        raise KernelError(f"mla_attention: position_ids must be [B, T], got {tuple(position_ids.shape)}")
    B, T = position_ids.shape
    index = torch.arange(T, device=position_ids.device).expand(B, T)
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] <= position_ids[:, :-1]
    return torch.where(start, index, torch.zeros_like(index)).cummax(dim=1).values


def allowed_pairs(doc_start: torch.Tensor) -> torch.Tensor:
    """The [B, 1, T, T] bool mask: ``doc_start[i] <= j <= i``."""
    T = doc_start.shape[1]
    key = torch.arange(T, device=doc_start.device)
    return ((key[None, None, :] <= key[None, :, None])
            & (key[None, None, :] >= doc_start.long()[:, :, None]))[:, None]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise KernelError(f"mla_attention: q, k [B, H, T, Dk] and v [B, H, T, Dv] disagree: "
                          f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if doc_start.shape != (q.shape[0], q.shape[2]):
        raise KernelError(f"mla_attention: doc_start must be [B, T] = {(q.shape[0], q.shape[2])}, "
                          f"got {tuple(doc_start.shape)}")
    # Documents are contiguous runs: starts never decrease and never pass the token itself (the
    # kernel skips every key before its block's first document start).
    index = torch.arange(doc_start.shape[1], device=doc_start.device)
    bad = (doc_start < 0) | (doc_start > index)
    bad[:, 1:] |= doc_start[:, 1:] < doc_start[:, :-1]
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise KernelError(f"mla_attention: doc_start[{b}, {t}] = {int(doc_start[b, t])} is not a "
                          "document start (starts must not decrease and must not pass the token)")


def mla_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            doc_start: torch.Tensor, scale: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal, document-masked attention and each head's max scaled logit, in PyTorch.

    Scores ``q k^T`` in the inputs' dtype (as ``MLA._attend`` computes them for the max), the max
    over allowed pairs times ``scale`` (fp32, fp64 for fp64 inputs), then softmax in fp32 (fp64)
    and ``P V`` in the inputs' dtype.

    Returns:
        ``(out [B, H, T, Dv]`` in ``v.dtype``, ``max_logits [H])``.
    """
    _check(q, k, v, doc_start)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    allowed = allowed_pairs(doc_start.to(q.device))
    scores = torch.matmul(q, k.transpose(-1, -2)).to(acc)  # [B, H, T, T]
    scores = scores.masked_fill(~allowed, float("-inf"))
    max_logits = scores.amax(dim=(0, 2, 3)) * scale
    probs = torch.softmax(scores * scale, dim=-1)
    return torch.matmul(probs.to(v.dtype), v), max_logits


def supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel handles these head sizes (Dk % 16 == 0, Dk <= 192, Dv % 8 == 0,
    Dv <= 128)."""
    Dk, Dv = q.shape[-1], v.shape[-1]
    return Dk % 16 == 0 and 0 < Dk <= DK_MAX and Dv % 8 == 0 and 0 < Dv <= DV_MAX


def _aligned(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1]):
        return t
    return t.contiguous()


def mla_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel on bf16 CUDA tensors. Returns ``(out [B, H, T, Dv]`` bf16, ``lse [B, H, T]``
    fp32, ``max_logits [H]`` fp32)."""
    from k2.kernels.launch import kernel, launch, ptr

    dev = q.device
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    ds = doc_start.to(device=dev, dtype=torch.int32).contiguous()
    nqb = (T + QTILE - 1) // QTILE
    out = torch.empty(B, H, T, Dv, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=dev)
    max_part = torch.empty(B, H, nqb, dtype=torch.float32, device=dev)
    i32, i64 = np.int32, np.int64
    if T:
        launch(kernel("mla_attention.cu", "mla_attention_forward", dev), (nqb, H, B),
               (THREADS, 1, 1),
               (ptr(q), i64(q.stride(0)), i64(q.stride(1)), i64(q.stride(2)),
                ptr(k), i64(k.stride(0)), i64(k.stride(1)), i64(k.stride(2)),
                ptr(v), i64(v.stride(0)), i64(v.stride(1)), i64(v.stride(2)),
                ptr(ds), i32(H), i32(T), i32(Dk), i32(Dv), np.float32(scale),
                ptr(out), ptr(lse), ptr(max_part)), dev)
    return out, lse, max_part.amax(dim=(0, 2))


def _use_kernel(q, k, v) -> bool:
    from k2.kernels.launch import use_kernel

    return (use_kernel(q, k, v) and all(t.dtype == torch.bfloat16 for t in (q, k, v))
            and supported(q, v))


def mla_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          doc_start: torch.Tensor, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, max_logits)``: the kernel for bf16 CUDA tensors of supported head sizes, the
    reference elsewhere. Not differentiable (see :func:`mla_attention`)."""
    _check(q, k, v, doc_start)
    if _use_kernel(q, k, v):
        out, _, max_logits = mla_attention_cuda(q, k, v, doc_start, scale)
        return out, max_logits
    with torch.no_grad():
        return mla_attention_reference(q, k, v, doc_start, scale)


class MLAAttention(torch.autograd.Function):
    """Forward: :func:`mla_attention_forward` (the kernel on the GPU). Backward: PyTorch's
    reference math, autograd through :func:`mla_attention_reference` recomputed in fp32 (fp64
    for fp64 inputs). ``max_logits`` is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, doc_start, scale):
        out, max_logits = mla_attention_forward(q, k, v, doc_start, scale)
        ctx.save_for_backward(q, k, v, doc_start)
        ctx.scale = scale
        ctx.mark_non_differentiable(max_logits)
        return out, max_logits

    @staticmethod
    def backward(ctx, grad_out, _grad_max):
        q, k, v, doc_start = ctx.saved_tensors
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        with torch.enable_grad():
            qa, ka, va = (t.detach().to(acc).requires_grad_() for t in (q, k, v))
            out, _ = mla_attention_reference(qa, ka, va, doc_start, ctx.scale)
            gq, gk, gv = torch.autograd.grad(out, (qa, ka, va), grad_out.to(acc))
        return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, None


def mla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable causal document-masked attention with per-head max logits.

    Args:
        q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; position_ids: [B, T] (documents restart them);
        scale: the softmax scale.

    Returns:
        ``(out [B, H, T, Dv]``, ``max_logits [H]`` fp32), what ``MLA._attend`` computes and
        ``MLA._record_max_logits`` records for a training forward without padding.
    """
    return MLAAttention.apply(q, k, v, doc_starts(position_ids), scale)
