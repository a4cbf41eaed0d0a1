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


# --- The hand-written backward passes (the CPU path runs them too) ---------------------------

def test_permute_and_combine_gradients_match_autograd_of_the_references() -> None:
    torch.manual_seed(3)
    T, k, E, H = 6, 2, 4, 5
    topk = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    r = md.route_reference(topk, E)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(T * k, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: md.permute(x, r), (x,))
    torch.autograd.gradcheck(lambda rows, w: md.combine(rows, w, r), (rows, w))

    g_rows = torch.randn(T * k, H, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(md.permute(x, r), x, g_rows),
                               torch.autograd.grad(md.permute_reference(x, r), x, g_rows))
    g = torch.randn(T, H, dtype=torch.float64)
    got = torch.autograd.grad(md.combine(rows, w, r), (rows, w), g)
    want = torch.autograd.grad(md.combine_reference(rows, w, r), (rows, w), g)
    torch.testing.assert_close(got, want)


def test_bf16_rows_accumulate_in_fp32() -> None:
    torch.manual_seed(4)
    T, k, E, H = 64, 8, 16, 32
    topk = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    r = md.route(topk, E)
    rows = torch.randn(T * k, H).to(torch.bfloat16)
    w = torch.rand(T, k)
    exact = md.combine_reference(rows.double(), w.double(), r)
    torch.testing.assert_close(md.combine(rows, w, r).double(), exact, atol=0.02, rtol=0.01)
