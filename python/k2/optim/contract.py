"""What an optimizer may ask of a model: the one protocol MuonClip and the AdamW path share.

A model stays plain PyTorch; its modules opt into two small roles, found by duck typing (through
DDP's ``module`` and ``torch.compile``'s ``_orig_mod`` wrappers):

* an **attention module** records the largest pre-softmax logit per head during training
  forwards and hands it over with ``pop_max_logits() -> Tensor | None`` (fp32 [num_heads],
  resetting it). QK-Clip acts on it; every run logs it. k2's MLA does this; a plain multi-head
  attention module joins with :func:`k2.optim.register_qk_clip`. Found by
  :func:`k2.optim.qk_clip.find_clip_targets`.
* an **MoE module** counts the tokens routed to each expert (``pop_expert_load() -> Tensor |
  None``, fp32 [num_experts], resetting), exposes ``num_experts`` and applies the
  auxiliary-loss-free balancing step ``update_router_bias(load, rate)``. Found by
  :func:`find_moe_layers`; :func:`pop_expert_loads` and :func:`update_router_biases` are the
  one place the update is driven from, for every optimizer.

Statistics are agreed across ranks through :mod:`k2.parallel.agree` before they are acted on, so
all replicas clip the same heads and move the same biases. Design: ``docs/optim.md``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from k2.optim.split import canonical_name
from k2.parallel.agree import sum_over_ranks


@runtime_checkable
class RecordsMaxLogits(Protocol):
    """An attention module QK-Clip and the logit log can read."""

    def pop_max_logits(self) -> Tensor | None: ...


@runtime_checkable
class BalancesExperts(Protocol):
    """An MoE module with load statistics and the router-bias update."""

    num_experts: int

    def pop_expert_load(self) -> Tensor | None: ...

    def update_router_bias(self, load: Tensor, rate: float) -> None: ...


def find_moe_layers(model: nn.Module) -> list[tuple[str, BalancesExperts]]:
    """Every MoE module of ``model`` (each once, wrappers looked through), in module order, with
    its canonical name."""
    found: list[tuple[str, BalancesExperts]] = []
    seen: set[int] = set()
    for raw_name, module in model.named_modules():
        module = getattr(module, "_orig_mod", module)
        if id(module) not in seen and isinstance(module, BalancesExperts):
            seen.add(id(module))
            found.append((canonical_name(raw_name), module))
    return found


def pop_expert_loads(moe_layers: list[tuple[str, BalancesExperts]]) -> list[Tensor]:
    """Each MoE layer's expert loads since the last call (fp32 [num_experts]; zeros for a layer
    that saw no tokens), resetting them. Pop them every step, also a skipped one."""
    loads = []
    for _, moe in moe_layers:
        load = moe.pop_expert_load()
        loads.append(torch.zeros(moe.num_experts) if load is None else load.float())
    return loads


@torch.no_grad()
def update_router_biases(moe_layers: list[tuple[str, BalancesExperts]], loads: list[Tensor],
                         rate: float, group: torch.distributed.ProcessGroup | None = None) -> list[Tensor]:
    """Sum each MoE layer's expert loads over the ranks and take one balancing step.

    A layer that saw no tokens on any rank keeps its bias.

    Args:
        moe_layers: from :func:`find_moe_layers`.
        loads: from :func:`pop_expert_loads`, one per layer.
        rate: the bias step (DeepSeek-V3's gamma).
        group: the ranks whose loads are summed (default: all of them).

    Returns:
        The summed loads, fp32 [num_experts] on the CPU, one per layer (for the step report).
    """
    summed = sum_over_ranks(loads, group)
    for (_, moe), load in zip(moe_layers, summed):
        if load.sum() > 0:
            moe.update_router_bias(load, rate)
    return summed
