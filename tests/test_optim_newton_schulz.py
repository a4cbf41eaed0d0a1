"""Newton–Schulz orthogonalization against the SVD polar factor."""

from __future__ import annotations

import pytest
import torch

from k2.errors import ConfigError
from k2.optim.newton_schulz import POLAR_EXPRESS, QUINTIC, NewtonSchulzSchedule, orthogonalize


def _polar_factor(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).float()


def _cosine(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return (A * B).sum((-2, -1)) / (A.norm(dim=(-2, -1)) * B.norm(dim=(-2, -1)))


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_schedules_approach_the_polar_factor(shape: tuple[int, int]) -> None:
    # Full-rank random matrices with singular values in [0.5, 2] (a well-conditioned input).
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(3, shape[0], shape[0]))
    V, _ = torch.linalg.qr(torch.randn(3, shape[1], shape[1]))
    r = min(shape)
    S = torch.diag_embed(torch.linspace(0.5, 2.0, r).expand(3, r))
    G = U[..., :r] @ S @ V[..., :r].mT
    polar = _polar_factor(G)
    quintic = orthogonalize(G, NewtonSchulzSchedule.resolve("quintic"), dtype=torch.float32)
    express = orthogonalize(G, NewtonSchulzSchedule.resolve("polar_express"), dtype=torch.float32)
    assert quintic.shape == G.shape and express.shape == G.shape
    sv_quintic, sv_express = torch.linalg.svdvals(quintic), torch.linalg.svdvals(express)
    # The quintic iteration overshoots: singular values near, not at, 1.
    assert sv_quintic.min() > 0.6 and sv_quintic.max() < 1.25
    assert (sv_express - 1).abs().max() < (sv_quintic - 1).abs().max()
    assert _cosine(quintic, polar).min() > 0.97
    assert _cosine(express, polar).min() > _cosine(quintic, polar).min()


def test_batch_equals_one_matrix_at_a_time_and_transposes() -> None:
    torch.manual_seed(1)
    G = torch.randn(5, 24, 40)
    schedule = NewtonSchulzSchedule.resolve("quintic")
    batched = orthogonalize(G, schedule, dtype=torch.float32)
    for i in range(5):
        single = orthogonalize(G[i : i + 1], schedule, dtype=torch.float32)
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-5, atol=1e-6)
    # Orthogonalizing Gᵀ gives Oᵀ (the iteration always runs on the wide orientation).
    torch.testing.assert_close(orthogonalize(G.mT, schedule, dtype=torch.float32), batched.mT)


def test_bf16_agrees_with_fp32_and_zero_stays_zero() -> None:
    torch.manual_seed(2)
    G = torch.randn(2, 32, 64)
    schedule = NewtonSchulzSchedule.resolve("quintic")
    fp32 = orthogonalize(G, schedule, dtype=torch.float32)
    bf16 = orthogonalize(G, schedule, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    assert (bf16.float() - fp32).norm() / fp32.norm() < 3e-2
    assert torch.equal(orthogonalize(torch.zeros(1, 8, 4), schedule, dtype=torch.float32), torch.zeros(1, 8, 4))


def test_schedule_resolution() -> None:
    assert NewtonSchulzSchedule.resolve("quintic", 3).coefficients == (QUINTIC,) * 3
    express = NewtonSchulzSchedule.resolve("polar_express", 7)
    assert express.coefficients == POLAR_EXPRESS + (POLAR_EXPRESS[-1],) * 2
    assert express.input_scale == 1.02
    assert NewtonSchulzSchedule.resolve((2.0, -1.5, 0.5), 2).coefficients == ((2.0, -1.5, 0.5),) * 2
    custom = NewtonSchulzSchedule.resolve([(3.0, -3.0, 1.0), (2.0, -1.5, 0.5)])
    assert custom.steps == 2
    with pytest.raises(ConfigError, match="unknown schedule"):
        NewtonSchulzSchedule.resolve("cubic")
    with pytest.raises(ConfigError, match="at least 1"):
        NewtonSchulzSchedule.resolve("quintic", 0)


def test_folded_first_step_equals_scaled_input() -> None:
    torch.manual_seed(3)
    G = torch.randn(2, 16, 24)
    express = NewtonSchulzSchedule.resolve("polar_express")
    folded = NewtonSchulzSchedule(express.folded(), input_scale=1.0)
    torch.testing.assert_close(orthogonalize(G, folded, dtype=torch.float32),
                               orthogonalize(G, express, dtype=torch.float32), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["quintic", "polar_express"])
def test_cuda_path_agrees_with_fp32_reference(name: str) -> None:
    torch.manual_seed(4)
    G = torch.randn(6, 96, 160, device="cuda")
    schedule = NewtonSchulzSchedule.resolve(name)
    gpu = orthogonalize(G, schedule)  # bf16: the CUDA kernel where available
    reference = orthogonalize(G.cpu(), schedule, dtype=torch.float32)
    assert gpu.dtype == torch.bfloat16
    assert (gpu.float().cpu() - reference).norm() / reference.norm() < 3e-2
