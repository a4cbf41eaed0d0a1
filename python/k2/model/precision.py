"""The precision of the model's reductions: at least float32, float64 when the model is float64.

Norms, attention scores, the router's scores, the loss's softmax and QK-Clip's factors are
computed in float32 whatever the parameters' dtype (bf16 on GPUs), as transformers does. A model
cast to float64 keeps float64 there too, so that a float64 run carries no float32 rounding at all:
that is how two runs that must agree mathematically (one process against a sharded mesh,
docs/parallel.md "How exact is a sharded run?") are compared without float32's noise being
amplified by optimizer steps. For float32 and lower-precision models nothing changes.
"""

from __future__ import annotations

import torch


def reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`reduce_dtype` of its dtype (``x`` itself when it already is)."""
    return x.to(reduce_dtype(x.dtype))
