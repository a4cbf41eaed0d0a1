"""Batched Newton–Schulz orthogonalization (Muon) on the GPU: the launcher of
``cuda/newton_schulz.cu``.

For a matrix M (m x n) the iteration approximates the orthogonal factor U Vᵀ of M = U S Vᵀ:

    X = M / (‖M‖_F + eps)         on the shorter side (a transpose by strides, no copy)
    repeat with per-step (a, b, c):
        A = X Xᵀ;  B = b A + c A A;  X = a X + B X

bf16 operands, fp32 accumulation, only half of each symmetric product computed. The PyTorch
reference, the CPU path and the dispatch live in :mod:`k2.optim.newton_schulz`
(``orthogonalize`` sends bf16 CUDA batches here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Coefficients = Sequence[tuple[float, float, float]]


def newton_schulz_cuda(G: torch.Tensor, coefficients: Coefficients, eps: float = 1e-7) -> torch.Tensor:
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
