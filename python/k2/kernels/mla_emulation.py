"""NumPy emulations of the MLA kernels' block algorithms, for testing them without a GPU.

Each function walks the work in the order ``cuda/mla_decode.cu`` and ``cuda/mla_attention.cu``
do — the same split boundaries, tile sizes, first tile, key masks, exp2-domain online softmax
with the same ``-inf`` guards, probabilities rounded to bf16 before the value product, the
per-split normalization and the log-sum-exp combine — in fp32 NumPy. Matrix products are
NumPy's (their summation order is not the tensor cores'); the fragment layouts of ``mma.sync``
are not emulated. The tests compare these against the fp64 PyTorch references
(tests/test_kernels_mla_emulation.py), so the tiling and combine arithmetic are checked on a CPU;
what only a GPU can check is listed in docs/kernels.md ("MLA").
"""

from __future__ import annotations

import math

import numpy as np

from k2.kernels import mla_attention as attn
from k2.kernels import mla_decode as dec

LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)


def bf16(x: np.ndarray) -> np.ndarray:
    """Round fp32 values to the nearest bf16 (ties to even), kept as fp32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def decode_split_range(start: int, end: int, splits: int, split: int) -> tuple[int, int]:
    """Keys ``[kbeg, kend)`` of one split (``chunk`` whole tiles, as in mla_decode_partial)."""
    length = end - start
    chunk = math.ceil(math.ceil(length / splits) / dec.KEYS) * dec.KEYS
    kbeg = start + split * chunk
    return kbeg, min(end, kbeg + chunk)


def emulate_decode(q_latent: np.ndarray, q_pe: np.ndarray, c: np.ndarray, k_pe: np.ndarray,
                   starts: np.ndarray, ends: np.ndarray, scale: float, splits: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``mla_decode_partial`` + ``mla_decode_combine``. Shapes as
    :func:`k2.kernels.mla_decode.mla_decode_reference`; returns ``(out [B, T, H, R]`` (bf16
    values), ``lse [B, T, H])``."""
    B, T, H, R = q_latent.shape
    M = T * H
    q = bf16(np.concatenate([q_latent, q_pe], axis=-1)).reshape(B, M, -1)
    K = bf16(np.concatenate([c, k_pe], axis=-1))
    scale_log2 = np.float32(scale) * LOG2E
    o_part = np.zeros((B, splits, M, R), np.float32)
    lse_part = np.full((B, splits, M), -np.inf, np.float32)
    row_token = np.arange(M) // H
    for b in range(B):
        start, end = int(starts[b]), int(ends[b])
        row_end_all = end - (T - 1 - row_token)  # [M]
        for split in range(splits):
            kbeg, kend = decode_split_range(start, end, splits, split)
            ntiles = -(-(kend - kbeg) // dec.KEYS) if kend > kbeg else 0
            for row0 in range(0, M, dec.ROWS):
                rows = slice(row0, min(M, row0 + dec.ROWS))
                row_end = np.minimum(kend, row_end_all[rows])
                Q = q[b, rows]
                m = np.full(Q.shape[0], -np.inf, np.float32)
                l = np.zeros(Q.shape[0], np.float32)
                o = np.zeros((Q.shape[0], R), np.float32)
                for it in range(ntiles):
                    key0 = kbeg + it * dec.KEYS
                    keys = np.arange(key0, key0 + dec.KEYS)
                    tile = np.zeros((dec.KEYS, K.shape[-1]), np.float32)
                    live = keys < kend
                    tile[live] = K[b, keys[live]]
                    s = Q @ tile.T
                    v = np.where(keys[None, :] < row_end[:, None], s * scale_log2, -np.inf).astype(np.float32)
                    m_new = np.maximum(m, v.max(axis=1))
                    base = np.where(m_new == -np.inf, np.float32(0), m_new)
                    alpha = np.exp2(m - base)
                    p = np.exp2(v - base[:, None])
                    l = l * alpha + p.sum(axis=1)
                    m = m_new
                    o = o * alpha[:, None] + bf16(p) @ tile[:, :R]
                with np.errstate(divide="ignore"):
                    lse_part[b, split, rows] = np.where(l > 0, (m + np.log2(l)) * LN2, -np.inf)
                inv = np.where(l > 0, 1 / np.where(l > 0, l, 1), 0).astype(np.float32)
                o_part[b, split, rows] = o * inv[:, None]
    mx = lse_part.max(axis=1)                                  # [B, M]
    base = np.where(mx == -np.inf, np.float32(0), mx)
    w = np.exp(lse_part - base[:, None])                        # [B, splits, M]
    wsum = w.sum(axis=1)
    out = (w[..., None] * o_part).sum(axis=1) / wsum[..., None]
    with np.errstate(divide="ignore"):
        lse = np.where(wsum > 0, base + np.log(wsum), -np.inf)
    return bf16(out).reshape(B, T, H, R), lse.reshape(B, T, H)


def emulate_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, doc_start: np.ndarray,
                      scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``mla_attention_forward``: per (b, h, 64-query block), key tiles of 64 from the block's
    first document start (aligned down) to its last query. Returns ``(out [B, H, T, Dv]`` (bf16
    values), ``max_logits [H])``."""
    B, H, T, _ = q.shape
    Dv = v.shape[-1]
    q, k, v = bf16(q), bf16(k), bf16(v)
    scale32 = np.float32(scale)
    scale_log2 = scale32 * LOG2E
    out = np.zeros((B, H, T, Dv), np.float32)
    max_logits = np.full(H, -np.inf, np.float32)
    for b in range(B):
        for h in range(H):
            for q0 in range(0, T, attn.QTILE):
                rows = np.arange(q0, min(T, q0 + attn.QTILE))
                first = doc_start[b, rows]
                kv_lo, kv_hi = int(doc_start[b, q0]), min(T, q0 + attn.QTILE)
                m = np.full(len(rows), -np.inf, np.float32)
                l = np.zeros(len(rows), np.float32)
                o = np.zeros((len(rows), Dv), np.float32)
                for kt in range(kv_lo // attn.KTILE * attn.KTILE, kv_hi, attn.KTILE):
                    keys = np.arange(kt, kt + attn.KTILE)
                    live = keys < T
                    kt_k = np.zeros((attn.KTILE, k.shape[-1]), np.float32)
                    kt_v = np.zeros((attn.KTILE, Dv), np.float32)
                    kt_k[live], kt_v[live] = k[b, h, keys[live]], v[b, h, keys[live]]
                    s = q[b, h, rows] @ kt_k.T
                    allowed = (keys[None, :] <= rows[:, None]) & (keys[None, :] >= first[:, None])
                    if allowed.any():
                        max_logits[h] = max(max_logits[h], float((s * scale32)[allowed].max()))
                    x = np.where(allowed, s * scale_log2, -np.inf).astype(np.float32)
                    m_new = np.maximum(m, x.max(axis=1))
                    base = np.where(m_new == -np.inf, np.float32(0), m_new)
                    alpha = np.exp2(m - base)
                    p = np.exp2(x - base[:, None])
                    l = l * alpha + p.sum(axis=1)
                    m = m_new
                    o = o * alpha[:, None] + bf16(p) @ kt_v
                out[b, h, rows] = o / l[:, None]
    return bf16(out), max_logits
