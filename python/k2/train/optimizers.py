"""The optimizer a run trains with: K2's MuonClip, or plain AdamW as the baseline to compare with.

- ``--optimizer muonclip`` (the default): :class:`k2.optim.MuonClip` (Muon for the matrices and
  expert stacks at ``lr``, AdamW for the rest at ``adamw_lr``, QK-Clip at ``qk_clip_tau``, the
  router-bias update after each step).
- ``--optimizer adamw``: ``torch.optim.AdamW`` on every parameter at ``adamw_lr``, with
  MuonClip's AdamW settings (betas (0.9, 0.95), eps 1e-8, ``weight_decay``), wrapped by
  :class:`AdamWWithRouterBias` so the MoE layers still get their auxiliary-loss-free router-bias
  update after each step. No QK-Clip.

Either way ``optimizer.last_report`` is a :class:`k2.optim.StepReport`. The max attention logits
are logged for every run: MuonClip reports them when it clips; otherwise (AdamW, or MuonClip with
``qk_clip_tau = 0``) a :class:`MaxLogitWatch` pops them after each step.

Both drive the router-bias update through :mod:`k2.optim.contract`, so under ``torchrun`` the
expert loads are summed and the max logits maxed over the ranks (:mod:`k2.parallel.agree`) the
same way, and every rank updates the same router biases and logs the same values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from k2.optim import LayerClip, MuonClip, StepReport
from k2.optim.contract import find_moe_layers, pop_expert_loads, update_router_biases
from k2.optim.qk_clip import find_clip_targets
from k2.parallel.agree import max_over_ranks
from k2.train.config import TrainConfig

ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8
ROUTER_BIAS_RATE = 1e-3


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names, over ``model``'s parameters.

    Args:
        config: the run's settings (``optimizer``, ``lr``, ``adamw_lr``, ``weight_decay``,
            ``qk_clip_tau``).
        model: the model, bare or wrapped by DDP.

    Returns:
        A ``torch.optim.Optimizer`` with a ``last_report`` (:class:`StepReport`) after each step.
    """
    if config.optimizer == "adamw":
        return AdamWWithRouterBias(model, lr=config.adamw_lr, weight_decay=config.weight_decay)
    from k2.optim.distributed import DistributedMuonClip
    from k2.parallel.fsdp import is_sharded

    muonclip = DistributedMuonClip if is_sharded(model) else MuonClip  # FSDP2: sharded matrices
    return muonclip(model, lr=config.lr, adamw_lr=config.adamw_lr, weight_decay=config.weight_decay,
                    qk_clip_tau=config.qk_clip_tau, adamw_betas=ADAMW_BETAS,
                    adamw_eps=ADAMW_EPS, router_bias_rate=ROUTER_BIAS_RATE)


class AdamWWithRouterBias(torch.optim.AdamW):
    """``torch.optim.AdamW`` on every trainable parameter, then the MoE router-bias update.

    Args:
        model: the model, bare or wrapped by DDP; its MoE layers (modules with
            ``pop_expert_load()`` and ``update_router_bias()``) get the bias update.
        lr: learning rate.
        weight_decay: decoupled weight decay.
        betas: AdamW (β1, β2).
        eps: AdamW eps.
        router_bias_rate: rate of the router-bias update (as MuonClip's).
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float,
                 betas: tuple[float, float] = ADAMW_BETAS, eps: float = ADAMW_EPS,
                 router_bias_rate: float = ROUTER_BIAS_RATE) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        # torch's foreach kernels take one DTensor mesh for a whole list: with FSDP2 x EP (dense
        # and expert parameters on different meshes) the per-tensor loop is the correct one.
        meshes = {tuple(p.device_mesh.mesh.flatten().tolist()) for p in params if isinstance(p, DTensor)}
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         foreach=False if len(meshes) > 1 else None)
        self.router_bias_rate = router_bias_rate
        self.moe_layers = find_moe_layers(model)
        self.last_report: StepReport | None = None

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One AdamW step, then one router-bias update per MoE layer from the step's loads.

        Args:
            closure: optional, re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, if given.
        """
        loss = super().step(closure)
        loads = update_router_biases(self.moe_layers, pop_expert_loads(self.moe_layers),
                                     self.router_bias_rate)
        first = self.param_groups[0]["params"][0]
        step = int(self.state[first]["step"]) if "step" in self.state[first] else 0
        self.last_report = StepReport(step, False, (), 0, (), tuple(loads))
        return loss


class MaxLogitWatch:
    """Pops every attention layer's max logits after a step and reports them per layer.

    For runs whose optimizer does not pop them itself (AdamW, MuonClip with QK-Clip off): the
    report is what MuonClip's holds, with no head clipped.

    Args:
        model: the model, bare or wrapped by DDP (its attention modules must record max logits
            in training forwards, as k2's MLA does by default).
    """

    def __init__(self, model: nn.Module) -> None:
        self.targets = find_clip_targets(model)

    def pop(self) -> list[LayerClip]:
        """The largest logit of each layer since the last call (maxed over ranks); resets them.

        Raises:
            ConfigError: a layer recorded nothing (its forward did not run in training mode).
        """
        if not self.targets:
            return []
        S_max = [target.pop_max_logits() for target in self.targets]  # fp32 [H] each
        (layer_max,) = max_over_ranks([torch.stack([s.max() for s in S_max])])
        return [LayerClip(target.name, value, 0, target.num_heads)
                for target, value in zip(self.targets, layer_max.tolist())]


def logit_watch(optimizer: torch.optim.Optimizer, model: nn.Module) -> MaxLogitWatch | None:
    """A :class:`MaxLogitWatch` for ``model`` unless ``optimizer`` already pops the max logits
    (MuonClip with QK-Clip on)."""
    if isinstance(optimizer, MuonClip) and optimizer.clip_targets:
        return None
    return MaxLogitWatch(model)
