"""The fused output head + cross-entropy (k2.model.loss) against plain torch, and its buffer pool."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from k2.model import K2Config, K2ForCausalLM
from k2.model.loss import IGNORE_INDEX, linear_cross_entropy, shift_labels


def inputs(dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, 16, generator=g).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(40, 16, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, 40, (3, 5), generator=g)
    targets[0, 1] = targets[2, 4] = IGNORE_INDEX
    return hidden, weight, targets


def test_value_and_gradients_equal_torch_including_a_gradient_through_the_logits() -> None:
    hidden, weight, targets = inputs()
    logits, loss = linear_cross_entropy(hidden, weight, targets)
    # The logits are used elsewhere too: their gradient must add to the loss's.
    total = 2.0 * loss + (logits ** 2).mean()
    ours = torch.autograd.grad(total, (hidden, weight))

    ref_logits = F.linear(hidden, weight)
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, 40), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    expected = torch.autograd.grad(2.0 * ref_loss + (ref_logits ** 2).mean(), (hidden, weight))

    torch.testing.assert_close(logits, ref_logits)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want)


def test_bf16_inputs_get_bf16_gradients_close_to_fp32() -> None:
    hidden, weight, targets = inputs(torch.bfloat16)
    logits, loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert logits.dtype == hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = F.cross_entropy(F.linear(h32, w32).reshape(-1, 40), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    torch.testing.assert_close(hidden.grad.float(), h32.grad, atol=2e-2, rtol=5e-2)


def test_a_second_backward_is_refused() -> None:
    hidden, weight, targets = inputs()
    _, loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_pooled_buffers_never_overwrite_logits_someone_still_holds() -> None:
    hidden, weight, targets = inputs()
    first, loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    view = first[1]  # a view keeps the memory in use as well
    kept = first.detach().clone()
    del first
    for seed in (1, 2):
        other_hidden, _, _ = inputs(seed=seed)
        second, loss = linear_cross_entropy(other_hidden, weight, targets)
        loss.backward()
        assert second.data_ptr() != view.data_ptr()
    torch.testing.assert_close(view, kept[1], rtol=0, atol=0)
    # Once nothing holds them, the buffers are reused (no fresh memory each step).
    del view, second, loss
    third, loss = linear_cross_entropy(hidden, weight, targets)
    address = third.data_ptr()
    loss.backward()
    del third, loss
    fourth, loss = linear_cross_entropy(hidden, weight, targets)
    assert fourth.data_ptr() == address


def test_the_model_takes_shifted_targets_or_labels_but_not_both() -> None:
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.from_preset("tiny")).eval()
    ids = torch.randint(0, 8192, (2, 12))
    with torch.no_grad():
        by_labels = model(ids, labels=ids)
        by_targets = model(ids, targets=shift_labels(ids))
        plain = model(ids)
    assert torch.equal(by_labels.loss, by_targets.loss)
    torch.testing.assert_close(by_labels.logits, plain.logits)
    expected = F.cross_entropy(plain.logits[:, :-1].reshape(-1, 8192), ids[:, 1:].reshape(-1))
    assert by_labels.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="labels or targets"):
        model(ids, labels=ids, targets=ids)
