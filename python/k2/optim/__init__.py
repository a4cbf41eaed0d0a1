"""MuonClip, the optimizer of Kimi K2 (docs/optim.md).

- :class:`MuonClip`: Muon (Newton–Schulz-orthogonalized momentum, AdamW-matched update RMS) for
  hidden matrices and stacked experts, QK-Clip on attention heads, AdamW for the rest.
- :func:`split_parameters`: which parameter goes to which optimizer (printable).
- :func:`orthogonalize`: the batched Newton–Schulz iteration (the seam for the CUDA kernel).
- :func:`register_qk_clip`: make a plain multi-head attention module clippable.
"""

from k2.optim.muon import MOONLIGHT, TORCH_MUON, MuonConventions
from k2.optim.muonclip import MuonClip, StepReport
from k2.optim.newton_schulz import NewtonSchulzSchedule, orthogonalize
from k2.optim.qk_clip import LayerClip, register_qk_clip
from k2.optim.split import ParamSplit, canonical_name, split_parameters

__all__ = [
    "MOONLIGHT", "TORCH_MUON", "LayerClip", "MuonClip", "MuonConventions", "NewtonSchulzSchedule",
    "ParamSplit", "StepReport", "canonical_name", "orthogonalize", "register_qk_clip",
    "split_parameters",
]
