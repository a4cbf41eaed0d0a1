"""The language-model loss: next-token cross-entropy, alone or fused with the output head.

Both autograd functions give the value and gradient of ``F.cross_entropy(...,
ignore_index=-100)`` with fewer passes over the ``[N, V]`` logits: the forward keeps
``exp(logits - max)`` (what torch keeps as log-probabilities), and the backward turns that buffer
in place into ``softmax - onehot``, scaled. The output head is memory-bound on a CPU, where this
is markedly faster.

* :class:`CrossEntropy` takes logits and hands the buffer to autograd as their gradient.
* :class:`LinearCrossEntropy` takes the hidden states and the head's weight, returns the logits
  *and* the loss, and computes the hidden states' and weight's gradients itself, so the buffer
  never leaves it. This is what ``K2ForCausalLM`` uses when it is given labels. On a CPU its
  logits and softmax buffers are reused across steps (:mod:`k2.model.speedups`).

A second backward through either is refused, since the buffer is spent by the first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from k2.errors import DataError
from k2.model.precision import reduce_dtype, upcast
from k2.model.speedups import reusable_empty

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction: position t predicts ``labels[t + 1]`` (the last
    position gets -100), exactly as transformers shifts them."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts ``labels[t + 1]``; -100 is ignored.

    The labels are shifted (not the logits, which would copy them) exactly as transformers does.

    Args:
        logits: [B, T, V].
        labels: [B, T].

    Returns:
        A scalar in fp32 (NaN when no position has a target, as in torch).
    """
    if labels.shape != logits.shape[:2]:
        raise DataError(f"labels have shape {tuple(labels.shape)}; expected {tuple(logits.shape[:2])}")
    targets = shift_labels(labels)
    return CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output head and the mean cross-entropy against already-shifted ``targets``, fused.

    Args:
        hidden: [B, T, D] final hidden states.
        weight: [V, D] the head's weight (no bias).
        targets: [B, T] the token each position must predict, -100 for none.

    Returns:
        ``(logits [B, T, V], loss)``; both carry gradients.
    """
    if targets.shape != hidden.shape[:2]:
        raise DataError(f"targets have shape {tuple(targets.shape)}; expected {tuple(hidden.shape[:2])}")
    logits, loss = LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1))
    return logits.view(*hidden.shape[:2], -1), loss


# ---------------------------------------------------------------------------- shared arithmetic
def _softmax_terms(logits: torch.Tensor, targets: torch.Tensor, out: torch.Tensor | None = None):
    """The loss and what its gradient needs: ``exp(logits - max)`` (in ``out`` if given), row
    sums, the targets made safe to index with, the valid-row mask and count."""
    valid = targets != IGNORE_INDEX  # [N]
    safe = targets.masked_fill(~valid, 0)
    peak = upcast(logits.amax(dim=-1, keepdim=True))  # [N, 1]
    unnormalized = torch.sub(logits, peak, out=out).exp_()  # fp32 [N, V]
    total = unnormalized.sum(dim=-1)  # [N]
    log_normalizer = peak.squeeze(1) + total.log()
    picked = upcast(logits.gather(1, safe[:, None]).squeeze(1))
    count = valid.sum()
    loss = ((log_normalizer - picked) * valid).sum() / count
    return loss, (unnormalized, total, safe, valid, count)


def _gradient_in_place(grad: torch.Tensor, unnormalized: torch.Tensor, total: torch.Tensor,
                       safe: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Turn ``unnormalized`` into d(grad * loss)/d(logits) = scaled (softmax - onehot)."""
    row_scale = valid * (grad / count)  # [N]
    unnormalized.mul_((row_scale / total)[:, None])
    return unnormalized.scatter_add_(1, safe[:, None], -row_scale[:, None])


def _refuse_second_backward(ctx, name: str) -> None:  # noqa: ANN001
    if ctx.spent:
        raise RuntimeError(
            f"k2 {name}: a second backward through the same loss is not supported "
            "(its softmax buffer became the first backward's gradient)"
        )
    ctx.spent = True


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over rows whose target is not -100, from logits [N, V]; see the
    module docs."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        loss, saved = _softmax_terms(logits, targets)
        ctx.save_for_backward(*saved)
        ctx.logits_dtype = logits.dtype
        ctx.spent = False
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        _refuse_second_backward(ctx, "CrossEntropy")
        return _gradient_in_place(grad, *ctx.saved_tensors).to(ctx.logits_dtype), None


# ---------------------------------------------------------------------------- fused head + loss
class LinearCrossEntropy(torch.autograd.Function):
    """``logits = hidden @ weight.T`` and their mean cross-entropy against ``targets`` (-100:
    none), from hidden [N, D], weight [V, D], targets [N]; see the module docs. A gradient that
    reaches the returned logits from elsewhere is added to the loss's."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):  # noqa: ANN001, ANN205
        shape = (hidden.shape[0], weight.shape[0])
        logits = torch.mm(hidden, weight.t(), out=reusable_empty("logits", shape, hidden.dtype, hidden.device))
        scratch = reusable_empty("softmax", shape, reduce_dtype(hidden.dtype), hidden.device)
        loss, saved = _softmax_terms(logits, targets, out=scratch)
        ctx.save_for_backward(hidden, weight, *saved)
        ctx.spent = False
        ctx.set_materialize_grads(False)
        return logits, loss

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor | None, grad_loss: torch.Tensor | None):  # noqa: ANN001, ANN205
        _refuse_second_backward(ctx, "LinearCrossEntropy")
        hidden, weight, *saved = ctx.saved_tensors
        if grad_loss is None:
            grad = saved[0].zero_()
        else:
            grad = _gradient_in_place(grad_loss, *saved)
        if grad_logits is not None:
            grad.add_(grad_logits)
        grad = grad.to(hidden.dtype)
        grad_hidden = torch.mm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.mm(grad.t(), hidden) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None
