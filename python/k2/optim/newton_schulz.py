"""Newton–Schulz orthogonalization: the matrix step at the heart of Muon (docs/optim.md).

Given a batch of matrices G [B, m, n], the iteration drives every singular value of
X = G / (s·‖G‖_F + eps) towards 1 while keeping the singular vectors, so the result is close to
the orthogonal polar factor U Vᵀ of G = U S Vᵀ. Each step, with the rows being the shorter side,
is the odd quintic polynomial

    A = X Xᵀ;   B = b·A + c·A·A;   X = a·X + B·X.

Two coefficient schedules are built in:

- ``"quintic"``: Keller Jordan's constant (a, b, c) = (3.4445, −4.7750, 2.0315), 5 steps. It buys
  speed by overshooting: singular values end in roughly [0.7, 1.2] rather than at 1, which Muon
  does not mind.
- ``"polar_express"``: the per-step schedule of Polar Express (Amsel et al., arXiv 2505.16932),
  5 steps, designed with a 2% safety margin (the input is also divided by 1.02, as in
  modded-nanogpt); it converges closer to 1 in the same number of steps.

A schedule may also be given as one (a, b, c) tuple (repeated every step) or a sequence of them
(one per step).

:func:`orthogonalize` is the one function that does the work on a batch ``[B, m, n]``; it is the
seam where accelerated kernels plug in: bf16 batches on a CUDA device go to the CUDA kernel of
``k2.kernels.newton_schulz`` when kernels are available (``K2_KERNELS`` not 0, CuPy installed).
Precision: fp32 on the CPU (bf16 matmuls are hundreds of times slower there) and bf16 on the GPU,
unless chosen explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from k2.errors import ConfigError
from k2.kernels.newton_schulz import Step, newton_schulz_reference

Coefficients = Step
"""One step's (a, b, c) (defined beside the kernel that consumes it)."""

QUINTIC: Coefficients = (3.4445, -4.7750, 2.0315)

# Polar Express, 5 steps, l = 1e-3, safety factor 1.02 (arXiv 2505.16932; the table modded-nanogpt uses).
POLAR_EXPRESS: tuple[Coefficients, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


@dataclass(frozen=True)
class NewtonSchulzSchedule:
    """The coefficients of every Newton–Schulz step, and how the input is normalized.

    Attributes:
        coefficients: one (a, b, c) per step.
        input_scale: the input is divided by ``input_scale * ‖G‖_F + eps`` (1.0 for the quintic
            iteration; 1.02 for Polar Express, whose coefficients assume that safety margin).
    """

    coefficients: tuple[Coefficients, ...]
    input_scale: float = 1.0

    @property
    def steps(self) -> int:
        return len(self.coefficients)

    def folded(self) -> tuple[Coefficients, ...]:
        """The coefficients with ``input_scale`` folded into the first step.

        Dividing the input by s before the first polynomial p(x) = a·x + b·x³ + c·x⁵ is the same
        as using (a/s, b/s³, c/s⁵) on the undivided input, for kernels that only normalize by
        ‖G‖_F.
        """
        s = self.input_scale
        (a, b, c), rest = self.coefficients[0], self.coefficients[1:]
        return ((a / s, b / s**3, c / s**5), *rest)

    @staticmethod
    def resolve(spec: str | Coefficients | Sequence[Coefficients] | NewtonSchulzSchedule,
                steps: int = 5) -> NewtonSchulzSchedule:
        """Turn a user's choice of coefficients into a schedule of ``steps`` steps.

        Args:
            spec: ``"quintic"``, ``"polar_express"``, one (a, b, c) tuple (used for every step), a
                sequence of (a, b, c) tuples (one per step: its length wins over ``steps``), or a
                schedule (returned as is).
            steps: number of steps for the named schedules and a single tuple. Polar Express
                repeats its last step beyond its 5 designed steps and is cut short below them.

        Returns:
            The schedule.

        Raises:
            ConfigError: for an unknown name, a malformed tuple or a step count below 1.
        """
        if isinstance(spec, NewtonSchulzSchedule):
            return spec
        if steps < 1:
            raise ConfigError(f"ns_steps must be at least 1, got {steps}")
        if isinstance(spec, str):
            if spec == "quintic":
                return NewtonSchulzSchedule((QUINTIC,) * steps)
            if spec == "polar_express":
                table = POLAR_EXPRESS[:steps] + (POLAR_EXPRESS[-1],) * max(0, steps - len(POLAR_EXPRESS))
                return NewtonSchulzSchedule(table, input_scale=1.02)
            raise ConfigError(f"ns_coefficients: unknown schedule {spec!r} "
                              "(use 'quintic', 'polar_express' or (a, b, c) tuples)")
        items = tuple(spec)
        if len(items) == 3 and all(isinstance(v, (int, float)) for v in items):
            return NewtonSchulzSchedule((_coefficients(items),) * steps)
        if not items:
            raise ConfigError("ns_coefficients: empty schedule")
        return NewtonSchulzSchedule(tuple(_coefficients(step) for step in items))


def _coefficients(values: Sequence[float]) -> Coefficients:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ConfigError(f"ns_coefficients: each step needs (a, b, c), got {values}")
    return values  # type: ignore[return-value]


# On the CPU a batch is iterated in pieces of about this many numbers (2 MiB of fp32), which keep
# the working set in cache: one thread here reached ~0.75 of its fp32 matmul rate on 128 x 256
# matrices in pieces of 16, against ~0.6 in one batch of 106.
CPU_PIECE_NUMEL = 1 << 19


def default_dtype(device: torch.device, dtype: torch.dtype | None = None) -> torch.dtype:
    """The Newton–Schulz precision that is fast on ``device``: bf16 on GPUs, fp32 elsewhere;
    fp64 for fp64 gradients (``dtype``), which are for exact comparisons, not speed."""
    if dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def orthogonalize(G_BMN: Tensor, schedule: NewtonSchulzSchedule, *, eps: float = 1e-7,
                  dtype: torch.dtype | None = None) -> Tensor:
    """Approximately orthogonalize each matrix of a batch with Newton–Schulz.

    This is the seam for accelerated kernels: everything Muon needs from the iteration passes
    through this one function.

    Args:
        G_BMN: the matrices, [B, m, n]; each is normalized by its own Frobenius norm.
        schedule: coefficients per step and input scale.
        eps: added to the norm so that a zero matrix stays zero.
        dtype: precision of the iteration (default: :func:`default_dtype` of the device and
            the gradients' dtype). The norm is taken in fp32 (fp64 for fp64 gradients).

    Returns:
        [B, m, n] in ``dtype``: each matrix's approximate polar factor.
    """
    if G_BMN.ndim != 3:
        raise ValueError(f"orthogonalize expects a batch [B, m, n], got shape {tuple(G_BMN.shape)}")
    dtype = dtype or default_dtype(G_BMN.device, G_BMN.dtype)
    if dtype == torch.bfloat16 and G_BMN.is_cuda and G_BMN.numel():
        from k2.kernels.launch import use_kernel
        from k2.kernels.newton_schulz import newton_schulz_cuda

        if use_kernel(G_BMN):
            return newton_schulz_cuda(G_BMN, schedule.folded(), eps)
    if G_BMN.device.type == "cpu":  # in cache-sized pieces
        per_piece = max(1, CPU_PIECE_NUMEL // (G_BMN.shape[-2] * G_BMN.shape[-1]))
        if G_BMN.shape[0] > per_piece:
            return torch.cat([newton_schulz_reference(part, schedule.coefficients, schedule.input_scale,
                                                      eps, dtype) for part in G_BMN.split(per_piece)])
    return newton_schulz_reference(G_BMN, schedule.coefficients, schedule.input_scale, eps, dtype)
