"""The CUDA kernels against their PyTorch references, on a GPU (skipped without CUDA).

Floating outputs are judged with one named metric, the relative Frobenius error
``rel_err(y) = ‖y − y_ref‖_F / ‖y_ref‖_F`` against an fp32 (or fp64) reference: the kernel must
satisfy ``rel_err(kernel) <= 2 * rel_err(torch in bf16) + atol``. Integer outputs must be equal.
"""

from __future__ import annotations

import pytest
import torch

from k2.kernels import moe_dispatch as md
from k2.kernels.newton_schulz import newton_schulz_cuda, newton_schulz_reference
from k2.optim.newton_schulz import NewtonSchulzSchedule, orthogonalize

pytestmark = pytest.mark.gpu


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def require_kernels() -> None:
    from k2.kernels.launch import cuda_kernels_available

    if not cuda_kernels_available():
        pytest.fail("a CUDA device is present but the kernels cannot run (CuPy or cuda-python "
                    "missing, or K2_KERNELS=0): install 'k2-train[cuda,test]'")


NS_SHAPES = [
    (1, 1, 1), (1, 8, 8), (1, 17, 33), (1, 33, 17), (3, 64, 64), (2, 65, 130), (1, 130, 65),
    (4, 100, 300), (1, 512, 1792), (8, 1792, 512), (1, 1024, 4096),
]


@pytest.mark.parametrize("shape", NS_SHAPES)
@pytest.mark.parametrize("schedule", ["quintic", "polar_express"])
def test_newton_schulz_matches_reference(shape, schedule) -> None:
    require_kernels()
    sched = NewtonSchulzSchedule.resolve(schedule, 5)
    torch.manual_seed(sum(shape))
    G = torch.randn(*shape, device="cuda")
    ref = newton_schulz_reference(G.double(), sched.coefficients, sched.input_scale, dtype=torch.float64)
    torch_bf16 = newton_schulz_reference(G, sched.coefficients, sched.input_scale, dtype=torch.bfloat16)
    out = newton_schulz_cuda(G, sched.folded())
    assert out.shape == G.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    e_kernel, e_torch = rel_err(out, ref), rel_err(torch_bf16, ref)
    assert e_kernel <= 2 * e_torch + 1e-3, (e_kernel, e_torch)
    # Muon's seam sends bf16 CUDA batches to the kernel.
    assert torch.equal(orthogonalize(G, sched, dtype=torch.bfloat16), out)


def test_newton_schulz_two_dimensional_and_strided_input() -> None:
    require_kernels()
    sched = NewtonSchulzSchedule.resolve("quintic", 5)
    G = torch.randn(96, 200, device="cuda")
    ref = newton_schulz_reference(G[None].double(), sched.coefficients, sched.input_scale, dtype=torch.float64)[0]
    e_torch = rel_err(newton_schulz_reference(G[None], sched.coefficients, sched.input_scale, dtype=torch.bfloat16)[0], ref)
    for inp in (G, G.T.contiguous().T):  # the same matrix in column-major storage
        out = newton_schulz_cuda(inp, sched.folded())
        assert out.shape == (96, 200)
        assert rel_err(out, ref) <= 2 * e_torch + 1e-3


MOE_CASES = [  # (T, k, E, H)
    (1, 1, 1, 8), (5, 2, 3, 33), (64, 2, 16, 128), (300, 8, 384, 256),  # most experts empty
    (257, 3, 7, 1), (1000, 8, 64, 7168), (2048, 2, 8, 512),
]


def routed(T, k, E, device="cuda", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    topk = scores.topk(k, dim=1).indices.to(device)
    weights = torch.rand(T, k, generator=g).to(device)
    return topk, weights


@pytest.mark.parametrize("case", MOE_CASES)
def test_route_is_exactly_the_reference(case) -> None:
    require_kernels()
    T, k, E, _ = case
    topk, _ = routed(T, k, E)
    got, want = md.route(topk, E), md.route_reference(topk, E)
    for field in ("tokens_per_expert", "expert_offsets", "pos", "assignment_of_row"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_route_with_all_tokens_on_one_expert_and_bad_ids() -> None:
    require_kernels()
    topk = torch.full((700, 1), 5, dtype=torch.int64, device="cuda")
    r = md.route(topk, 8)
    assert r.tokens_per_expert.tolist() == [0] * 5 + [700] + [0] * 2
    assert torch.equal(r.assignment_of_row, torch.arange(700, device="cuda"))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        md.route(torch.tensor([[0, 8]], device="cuda"), 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", MOE_CASES)
def test_permute_and_combine_match_reference(case, dtype) -> None:
    require_kernels()
    T, k, E, H = case
    topk, w = routed(T, k, E)
    r = md.route(topk, E)
    x = torch.randn(T, H, device="cuda").to(dtype)
    rows = md.permute(x, r)
    assert torch.equal(rows, md.permute_reference(x, r))  # a pure copy: exact

    y = torch.randn(T * k, H, device="cuda").to(dtype)
    out = md.combine(y, w, r)
    ref = md.combine_reference(y.double(), w.double(), r)
    torch_low = md.combine_reference(y, w.to(dtype), r) if dtype == torch.bfloat16 else ref
    assert rel_err(out, ref) <= 2 * rel_err(torch_low, ref) + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", [(5, 2, 3, 33), (64, 2, 16, 128), (300, 8, 384, 64)])
def test_gradients_match_autograd_of_the_reference(case, dtype) -> None:
    require_kernels()
    T, k, E, H = case
    topk, w0 = routed(T, k, E, seed=1)
    r = md.route(topk, E)
    x0 = torch.randn(T, H, device="cuda").to(dtype)
    experts = torch.randn(E, device="cuda")
    g = torch.randn(T, H, device="cuda").to(dtype)

    def run(permute, combine, x_, w_):
        rows = permute(x_, r)
        rows = rows * experts[topk.reshape(-1)[r.assignment_of_row]].to(dtype)[:, None]
        return combine(rows, w_, r)

    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    (run(md.permute, md.combine, x, w) * g).sum().backward()
    xr, wr = x0.double().requires_grad_(), w0.double().requires_grad_()
    (run(md.permute_reference, md.combine_reference, xr, wr) * g.double()).sum().backward()
    xl, wl = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    (run(md.permute_reference, md.combine_reference, xl, wl) * g).sum().backward()
    assert rel_err(x.grad, xr.grad) <= 2 * rel_err(xl.grad, xr.grad) + 1e-6
    assert rel_err(w.grad, wr.grad) <= 2 * rel_err(wl.grad, wr.grad) + 1e-5
