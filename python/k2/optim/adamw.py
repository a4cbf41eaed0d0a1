"""AdamW for the parameters Muon does not take (embeddings, output head, norms, biases).

The arithmetic follows ``torch.optim.AdamW`` operation for operation, so the two agree to the last
few bits; it runs as multi-tensor (``torch._foreach_*``) operations over the whole group.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def adamw_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step over a list of parameters, everything updated in place.

    Args:
        params: parameters.
        grads: their gradients.
        exp_avgs: first moments m.
        exp_avg_sqs: second moments v.
        steps: per-parameter step counts (0-d float tensors), incremented here.
        lr: learning rate.
        beta1: decay of m.
        beta2: decay of v.
        eps: added to sqrt(v̂).
        weight_decay: decoupled weight decay (param ← param·(1 − lr·wd)).
    """
    if not params:
        return
    torch._foreach_add_(steps, 1.0)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    counts = [s.item() for s in steps]
    step_sizes = [-lr / (1.0 - beta1 ** t) for t in counts]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [math.sqrt(1.0 - beta2 ** t) for t in counts])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
