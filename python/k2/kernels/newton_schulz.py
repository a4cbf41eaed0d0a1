"""Batched Newton–Schulz orthogonalization (Muon) on the GPU: the launcher of
``cuda/newton_schulz.cu``.

For a matrix M (m x n) the iteration approximates the orthogonal factor U Vᵀ of M = U S Vᵀ:

    X = M / (‖M‖_F + eps)         on the shorter side (a transpose by strides, no copy)
    repeat with per-step (a, b, c):
        A = X Xᵀ;  B = b A + c A A;  X = a X + B X

bf16 operands, fp32 accumulation, only half of each symmetric product computed.
:func:`newton_schulz_reference` beside it is the same iteration in PyTorch: the CPU path and the
kernel's test oracle. The dispatch between them, and the coefficient schedules, are Muon's:
:func:`k2.optim.newton_schulz.orthogonalize` sends bf16 CUDA batches to the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from k2.model.precision import upcast

Step = tuple[float, float, float]
"""One Newton–Schulz step's (a, b, c)."""


def newton_schulz_cuda(G: torch.Tensor, coefficients: Sequence[Step], eps: float = 1e-7) -> torch.Tensor:
    """Run the iteration on a CUDA tensor ``G`` [m, n] or [B, m, n] with one (a, b, c) per step
    (normalizing by the plain Frobenius norm). Returns bf16 in G's shape."""
    from k2.kernels.launch import kernel, launch, ptr

    squeeze = G.dim() == 2
    G3 = G.unsqueeze(0) if squeeze else G
    batch, m, n = G3.shape
    # Normalize in fp32 and store bf16, keeping G's orientation: X is contiguous [B, m, n].
    norm = torch.linalg.matrix_norm(G3.float(), keepdim=True)
    X = (G3.float() / (norm + eps)).to(torch.bfloat16).contiguous()
    # Work on the short side without copying: (rows, cols) strides of the view we iterate on.
    rows, cols = min(m, n), max(m, n)
    s_b = m * n
    s_r, s_c = (n, 1) if m <= n else (1, n)
    A = torch.empty(batch, rows, rows, dtype=torch.bfloat16, device=G.device)
    B = torch.empty_like(A)
    X_next = torch.empty_like(X)
    dev = G.device
    syrk = kernel("newton_schulz.cu", "ns_syrk", dev)
    gemm = kernel("newton_schulz.cu", "ns_gemm", dev)
    tiles = (rows + 63) // 64
    i32, i64, f32 = np.int32, np.int64, np.float32
    for a, b, c in coefficients:
        launch(syrk, (tiles * (tiles + 1) // 2, 1, batch), (128, 1, 1),
               (ptr(X), ptr(None), ptr(A), i32(rows), i32(cols), i64(s_b), i64(s_r), i64(s_c),
                f32(1.0), f32(0.0)), dev)
        launch(syrk, (tiles * (tiles + 1) // 2, 1, batch), (128, 1, 1),
               (ptr(A), ptr(A), ptr(B), i32(rows), i32(rows), i64(rows * rows), i64(rows),
                i64(1), f32(c), f32(b)), dev)
        launch(gemm, ((cols + 63) // 64, tiles, batch), (128, 1, 1),
               (ptr(B), ptr(X), ptr(X_next), i32(rows), i32(cols), i64(s_b), i64(s_r), i64(s_c),
                f32(a)), dev)
        X, X_next = X_next, X
    return X.squeeze(0) if squeeze else X


def newton_schulz_reference(G_BMN: Tensor, coefficients: Sequence[Step], input_scale: float = 1.0,
                            eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> Tensor:
    """The iteration in plain PyTorch on one batch [B, m, n]; returns [B, m, n] in ``dtype``.

    Each matrix is divided by ``input_scale * ‖G‖_F + eps``, then one step runs per (a, b, c) of
    ``coefficients``. This is the CPU path of :func:`k2.optim.newton_schulz.orthogonalize` and
    the oracle :func:`newton_schulz_cuda` is tested against (in fp64 as the exact reference, in
    bf16 as "what torch gets").
    """
    # The Gram matrix A is taken on the shorter side, r = min(m, n): A = X Xᵀ for wide matrices
    # and A = Xᵀ X for tall ones, where the step reads X ← X (a·I + B). Both are the iteration
    # on the wide orientation, without transposing anything.
    tall = G_BMN.shape[-2] > G_BMN.shape[-1]
    G_BMN = upcast(G_BMN)  # the norm in fp32 (fp64 for an fp64 run)
    norm_B11 = torch.linalg.vector_norm(G_BMN, dim=(-2, -1), keepdim=True)
    X = (G_BMN / (norm_B11 * input_scale + eps)).to(dtype).contiguous()
    r = min(X.shape[-2:])
    # Workspaces written with out=: fresh big tensors every step would cost page faults on CPUs.
    A_BRR, B_BRR, X_next = X.new_empty(X.shape[0], r, r), X.new_empty(X.shape[0], r, r), torch.empty_like(X)
    # (a·I + B)·X saves a copy of X every step, but in bf16 a·I + B would round away B's diagonal.
    fold_a = X.dtype == torch.float32
    for a, b, c in coefficients:
        left, right = (X.mT, X) if tall else (X, X.mT)
        torch.bmm(left, right, out=A_BRR)  # A = X Xᵀ (or Xᵀ X)
        torch.baddbmm(A_BRR, A_BRR, A_BRR, beta=b, alpha=c, out=B_BRR)  # B = b·A + c·A·A
        left, right = (X, B_BRR) if tall else (B_BRR, X)
        if fold_a:  # X ← (a·I + B)·X (or X·(a·I + B))
            B_BRR.diagonal(dim1=-2, dim2=-1).add_(a)
            torch.bmm(left, right, out=X_next)
        else:  # X ← a·X + B·X (or X·B)
            torch.baddbmm(X, left, right, beta=a, out=X_next)
        X, X_next = X_next, X
    return X
