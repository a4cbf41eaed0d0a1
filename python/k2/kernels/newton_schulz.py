"""Batched Newton–Schulz orthogonalization (Muon): the PyTorch reference and the CUDA kernel.

For a matrix M (m x n) the iteration approximates the orthogonal factor U Vᵀ of M = U S Vᵀ:

    X = M / (‖M‖_F + eps)         transposed so that the rows are the shorter side
    repeat with per-step (a, b, c):
        A = X Xᵀ;  B = b A + c A A;  X = a X + B X

``newton_schulz`` picks the CUDA kernel for CUDA tensors (bf16 operands, fp32 accumulation, only
half of each symmetric product computed) and the reference everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Coefficients = Sequence[tuple[float, float, float]]

QUINTIC = (3.4445, -4.7750, 2.0315)
"""Muon's default quintic coefficients (a, b, c), used for every step."""


def newton_schulz_reference(
    G: torch.Tensor, coefficients: Coefficients, eps: float = 1e-7, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The iteration in plain PyTorch on ``[..., m, n]``, computed in ``dtype`` (default fp32).

    Args:
        G: the matrices to orthogonalize, any leading batch dimensions.
        coefficients: one (a, b, c) per step.
        eps: added to the Frobenius norm before dividing.
        dtype: the precision of every matmul (fp32 on CPU; bf16 mimics the GPU path).

    Returns:
        The orthogonalized matrices, shape of ``G``, in ``dtype``.
    """
    X = G.to(dtype or torch.float32)
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT
    norm = torch.linalg.matrix_norm(X.float(), keepdim=True).to(X.dtype)
    X = X / (norm + eps)
    for a, b, c in coefficients:
        A = X @ X.mT                    # [..., m, m]
        B = b * A + c * (A @ A)         # [..., m, m]
        X = a * X + B @ X               # [..., m, n]
    return X.mT if transposed else X


def newton_schulz(
    G: torch.Tensor, coefficients: Coefficients, eps: float = 1e-7, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Orthogonalize ``G`` ([m, n] or [B, m, n]): the CUDA kernel for CUDA tensors when kernels are
    available (result in bf16), else :func:`newton_schulz_reference` in ``dtype``."""
    from k2.kernels.launch import use_kernel

    if use_kernel(G) and G.dim() in (2, 3) and G.numel() > 0:
        return newton_schulz_cuda(G, coefficients, eps)
    return newton_schulz_reference(G, coefficients, eps, dtype)


def newton_schulz_cuda(G: torch.Tensor, coefficients: Coefficients, eps: float = 1e-7) -> torch.Tensor:
    """The CUDA kernel path; ``G`` is a CUDA tensor [m, n] or [B, m, n]. Returns bf16 in G's shape."""
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
