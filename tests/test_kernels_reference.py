"""The PyTorch references of the MoE dispatch kernels (the CPU path and the GPU tests' oracle),
checked against hand-computed routing, a per-token loop and autograd. (The Newton–Schulz
reference is k2.optim's ``orthogonalize``, tested in test_optim_newton_schulz.py.)"""

from __future__ import annotations

import pytest
import torch

from k2.kernels import moe_dispatch as md


def test_routing_of_a_hand_worked_example() -> None:
    topk = torch.tensor([[2, 0], [0, 1], [1, 2]])
    r = md.route(topk, num_experts=4)  # expert 3 receives nothing
    assert r.tokens_per_expert.tolist() == [2, 2, 2, 0]
    assert r.expert_offsets.tolist() == [0, 2, 4, 6, 6]
    # flat assignments [2, 0, 0, 1, 1, 2]: expert 0 gets 1, 2; expert 1 gets 3, 4; expert 2 gets 0, 5
    assert r.assignment_of_row.tolist() == [1, 2, 3, 4, 0, 5]
    assert r.pos.tolist() == [4, 0, 1, 2, 3, 5]
    assert r.token_of_row.tolist() == [0, 1, 1, 2, 0, 2]


def test_routing_rejects_bad_expert_ids() -> None:
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        md.route(torch.tensor([[0, 4]]), num_experts=4)
    with pytest.raises(ValueError, match="int64"):
        md.route(torch.tensor([[0, 1]], dtype=torch.int32), num_experts=4)


def test_permute_then_combine_equals_a_per_token_loop() -> None:
    torch.manual_seed(2)
    T, k, E, H = 13, 3, 5, 7
    x = torch.randn(T, H)
    topk = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k)
    scale = torch.arange(1, E + 1, dtype=torch.float32)  # expert e multiplies by e + 1
    r = md.route(topk, E)
    rows = md.permute(x, r)
    experts_of_rows = topk.reshape(-1)[r.assignment_of_row]
    out = md.combine(rows * scale[experts_of_rows, None], w, r)
    expected = torch.stack([
        sum(w[t, s] * scale[topk[t, s]] * x[t] for s in range(k)) for t in range(T)
    ])
    torch.testing.assert_close(out, expected)


# --- The CUDA autograd wiring, run on the CPU against kernel emulations -----------------------
# The kernels' contracts (documented in cuda/moe_dispatch.cu) emulated in PyTorch, so the
# hand-written backward passes of _Permute and _Combine are checked by gradcheck without a GPU.

def _emulated_gather(src, src_row, scale, n_rows):
    out = src.index_select(0, src_row)
    return out if scale is None else out * scale.to(src.dtype).unsqueeze(1)


def _emulated_combine(rows, pos, weights, T, k):
    picked = rows.index_select(0, pos).view(T, k, -1)
    w = torch.ones(T, k, dtype=rows.dtype) if weights is None else weights.to(rows.dtype)
    return (picked * w.unsqueeze(-1)).sum(1)


def _emulated_grad_w(grad_out, rows, pos, T, k):
    picked = rows.index_select(0, pos).view(T, k, -1)
    return (picked * grad_out.unsqueeze(1)).sum(-1)


def test_hand_written_backward_passes(monkeypatch) -> None:
    monkeypatch.setattr(md, "_gather", _emulated_gather)
    monkeypatch.setattr(md, "_combine", _emulated_combine)
    monkeypatch.setattr(md, "_combine_grad_w", _emulated_grad_w)
    torch.manual_seed(3)
    T, k, E, H = 6, 2, 4, 5
    topk = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    r = md.route_reference(topk, E)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(T * k, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)

    torch.autograd.gradcheck(lambda x: md._Permute.apply(x, r.token_of_row, r.pos, k), (x,))
    # float64 weights go through the fp32 kernel contract, so compare in a loose-enough way:
    # check the analytic gradients against the reference's autograd instead of finite differences.
    out = md._Combine.apply(rows, w, r.pos, r.assignment_of_row, k)
    g = torch.randn_like(out)
    grad_rows, grad_w = torch.autograd.grad(out, (rows, w), g)
    ref = md.combine_reference(rows, w, r)
    ref_rows, ref_w = torch.autograd.grad(ref, (rows, w), g)
    torch.testing.assert_close(grad_rows, ref_rows, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_w, ref_w, atol=1e-6, rtol=1e-6)
