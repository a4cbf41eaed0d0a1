"""MuonClip: Muon + QK-Clip for the matrices, AdamW for the rest, in one optimizer (docs/optim.md).

One ``step()`` does, in order:

1. collect what the forward recorded since the last step: each attention layer's max logits
   (for QK-Clip) and each MoE layer's expert loads (for the router bias);
2. decide whether the step is finite: a NaN/Inf in any gradient or max logit skips the whole
   step (no parameter, moment or router bias changes), counts it and reports it;
3. Muon on hidden matrices and expert stacks, AdamW on the other parameters;
4. QK-Clip on every head whose max logit exceeded τ;
5. the auxiliary-loss-free router-bias update of every MoE layer.

Under data parallelism (``torch.distributed`` initialized, e.g. DDP) the ranks agree on three
things, each with one all-reduce: the skip decision (MAX), the max logits (MAX, so every rank clips
the same heads) and the expert loads (SUM). Gradients are DDP's business. With that, N ranks give
the result of one process running the same global batch.

Usage::

    opt = MuonClip(model, lr=2e-4)
    print(opt.split)                      # which parameter goes to Muon, which to AdamW, and why
    loss = model(ids, labels=ids).loss; loss.backward()
    opt.step(); opt.zero_grad()
    print(opt.last_report)                # max logit and clipped heads per layer, skips
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from k2.errors import ConfigError
from k2.optim.adamw import adamw_step
from k2.optim.contract import find_moe_layers, pop_expert_loads, update_router_biases
from k2.optim.muon import MOONLIGHT, TORCH_MUON, MuonConventions, muon_step
from k2.optim.newton_schulz import Coefficients, NewtonSchulzSchedule
from k2.optim.qk_clip import LayerClip, find_clip_targets, qk_clip
from k2.optim.split import ParamSplit, split_parameters
from k2.parallel.agree import any_rank, max_over_ranks

log = logging.getLogger(__name__)

_CONVENTIONS = {"moonlight": MOONLIGHT, "torch": TORCH_MUON}
_NS_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StepReport:
    """What one ``MuonClip.step()`` did.

    Attributes:
        step: number of steps attempted so far, this one included.
        skipped: the step was skipped because something was not finite (on some rank).
        nonfinite: the local tensors that were not finite (gradients by parameter name, max
            logits as ``<layer>.max_logits``); empty on a rank whose own values were finite.
        skipped_steps: steps skipped so far.
        layers: QK-Clip per attention layer (empty when skipped or QK-Clip is off).
        expert_loads: per MoE layer, the tokens each expert received this step, summed over
            ranks (fp32 [E] on the CPU); empty when skipped or the router-bias update is off.
    """

    step: int
    skipped: bool
    nonfinite: tuple[str, ...]
    skipped_steps: int
    layers: tuple[LayerClip, ...]
    expert_loads: tuple[Tensor, ...] = ()

    @property
    def clipped_heads(self) -> int:
        return sum(layer.clipped_heads for layer in self.layers)

    @property
    def max_logit(self) -> float | None:
        return max((layer.max_logit for layer in self.layers), default=None)

    def __str__(self) -> str:
        if self.skipped:
            where = ", ".join(self.nonfinite[:5]) or "another rank"
            return (f"step {self.step}: skipped, non-finite values ({where}); "
                    f"{self.skipped_steps} skipped so far")
        text = f"step {self.step}"
        if self.layers:
            text += f": max logit {self.max_logit:.2f}, {self.clipped_heads} heads clipped"
            text += "".join(f"\n  {layer.name}: max logit {layer.max_logit:.2f}, "
                            f"{layer.clipped_heads}/{layer.num_heads} clipped" for layer in self.layers)
        return text


class MuonClip(torch.optim.Optimizer):
    """Muon with QK-Clip for hidden matrices and expert stacks, AdamW for everything else.

    Args:
        model: the model (bare, or wrapped by DDP / torch.compile): its parameters are split by
            :func:`~k2.optim.split.split_parameters`, its MLA modules feed QK-Clip and its MoE
            modules get the router-bias update.
        lr: Muon learning rate (K2: 2e-4 at the plateau of its WSD schedule).
        weight_decay: decoupled weight decay for Muon, with the unadjusted lr (K2: 0.1).
        momentum: μ.
        nesterov: Nesterov momentum.
        qk_clip_tau: τ (K2: 100); 0 turns QK-Clip off (the one spelling, as in ``k2 train``).
        ns_coefficients: ``"quintic"``, ``"polar_express"``, one (a, b, c) or one per step.
        ns_steps: Newton–Schulz steps (for the named schedules and a single tuple).
        ns_eps: eps of the Newton–Schulz normalization.
        ns_dtype: ``"auto"`` (fp32 on CPU, bf16 on GPU), ``"float32"`` or ``"bfloat16"``.
        conventions: ``"moonlight"`` (default: sum momentum, lr·0.2·sqrt(max(m, n))),
            ``"torch"`` (torch.optim.Muon: EMA momentum, lr·sqrt(max(1, m/n))) or a
            :class:`MuonConventions`.
        batch_same_shape: orthogonalize all matrices of one shape as one batch.
        adamw_lr: AdamW learning rate (default: lr; the Muon update RMS matches AdamW's).
        adamw_betas: AdamW (β1, β2).
        adamw_eps: AdamW eps.
        adamw_weight_decay: AdamW weight decay (default: weight_decay).
        router_bias_rate: rate of the MoE router-bias update after each step; None turns it off.
        split_overrides: pattern -> ``"muon"``/``"adamw"``, see :func:`split_parameters`.
        process_group: the group the ranks agree over (default: the world, when initialized).
    """

    def __init__(self, model: nn.Module, lr: float = 2e-4, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, qk_clip_tau: float = 100.0,
                 ns_coefficients: str | Coefficients | Sequence[Coefficients] = "quintic",
                 ns_steps: int = 5, ns_eps: float = 1e-7, ns_dtype: str = "auto",
                 conventions: str | MuonConventions = "moonlight", batch_same_shape: bool = True,
                 adamw_lr: float | None = None, adamw_betas: tuple[float, float] = (0.9, 0.95),
                 adamw_eps: float = 1e-8, adamw_weight_decay: float | None = None,
                 router_bias_rate: float | None = 1e-3,
                 split_overrides: Mapping[str, str] | None = None,
                 process_group: dist.ProcessGroup | None = None) -> None:
        if lr < 0 or (adamw_lr is not None and adamw_lr < 0):
            raise ConfigError(f"learning rates must be >= 0, got lr={lr}, adamw_lr={adamw_lr}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
        if qk_clip_tau is None or not math.isfinite(qk_clip_tau) or qk_clip_tau < 0:
            raise ConfigError(f"qk_clip_tau must be a finite number > 0, or 0 to turn QK-Clip off; "
                              f"got {qk_clip_tau}")
        if ns_dtype not in _NS_DTYPES:
            raise ConfigError(f"ns_dtype must be one of {sorted(_NS_DTYPES)}, got {ns_dtype!r}")
        if isinstance(conventions, str):
            if conventions not in _CONVENTIONS:
                raise ConfigError(f"conventions must be one of {sorted(_CONVENTIONS)} or a MuonConventions, "
                                  f"got {conventions!r}")
            conventions = _CONVENTIONS[conventions]
        schedule = NewtonSchulzSchedule.resolve(ns_coefficients, ns_steps)

        self.split: ParamSplit = split_parameters(model, overrides=split_overrides)
        groups = []
        if self.split.muon:
            groups.append({
                "kind": "muon", "names": [n for n, _ in self.split.muon],
                "params": [p for _, p in self.split.muon], "lr": lr, "weight_decay": weight_decay,
                "momentum": momentum, "nesterov": nesterov, "ns_coefficients": schedule.coefficients,
                "ns_input_scale": schedule.input_scale, "ns_eps": ns_eps,
            })
        if self.split.adamw:
            groups.append({
                "kind": "adamw", "names": [n for n, _ in self.split.adamw],
                "params": [p for _, p in self.split.adamw], "lr": lr if adamw_lr is None else adamw_lr,
                "betas": tuple(adamw_betas), "eps": adamw_eps,
                "weight_decay": weight_decay if adamw_weight_decay is None else adamw_weight_decay,
            })
        if not groups:
            raise ConfigError(f"MuonClip: {type(model).__name__} has no trainable parameters")
        super().__init__(groups, {})

        self.conventions = conventions
        self.ns_dtype = _NS_DTYPES[ns_dtype]
        self.batch_same_shape = batch_same_shape
        self.qk_clip_tau = qk_clip_tau
        self.router_bias_rate = router_bias_rate
        self.process_group = process_group
        self.clip_targets = find_clip_targets(model) if qk_clip_tau > 0 else []
        if qk_clip_tau > 0 and not self.clip_targets:
            raise ConfigError(f"QK-Clip: {type(model).__name__} has no attention module QK-Clip knows "
                              "(k2's MLA, or one registered with k2.optim.register_qk_clip); "
                              "register yours or pass qk_clip_tau=0")
        self.moe_layers = find_moe_layers(model) if router_bias_rate is not None else []
        self.steps = 0
        self.skipped_steps = 0
        self.last_report: StepReport | None = None

    # ---------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One MuonClip step (see the module docstring for its parts).

        Args:
            closure: optional, re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, if given.

        Raises:
            ConfigError: QK-Clip is on and an attention layer recorded no max logits.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        S_max = [target.pop_max_logits() for target in self.clip_targets]
        loads = pop_expert_loads(self.moe_layers)
        self.steps += 1

        nonfinite = self._nonfinite(S_max)
        if any_rank(bool(nonfinite), self.process_group):
            self.skipped_steps += 1
            self.last_report = StepReport(self.steps, True, tuple(nonfinite), self.skipped_steps, ())
            log.warning("%s", self.last_report)
            return loss

        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_group(group)
            else:
                self._adamw_group(group)
        layers = self._qk_clip(max_over_ranks(S_max, self.process_group)) if S_max else []
        expert_loads = update_router_biases(self.moe_layers, loads, self.router_bias_rate,
                                            self.process_group)
        self.last_report = StepReport(self.steps, False, (), self.skipped_steps, tuple(layers),
                                      tuple(expert_loads))
        return loss

    def _qk_clip(self, S_max: list[Tensor]) -> list[LayerClip]:
        """QK-Clip with the max logits agreed over the ranks (a subclass may clip sharded weights)."""
        return qk_clip(self.clip_targets, S_max, self.qk_clip_tau)

    @staticmethod
    def _local(tensor: Tensor) -> Tensor:
        """The part of ``tensor`` this process updates: the tensor itself here; a DTensor's local
        shard in :class:`k2.optim.distributed.DistributedMuonClip`."""
        return tensor

    def _muon_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffers.append(state["momentum_buffer"])
        schedule = NewtonSchulzSchedule(tuple(map(tuple, group["ns_coefficients"])), group["ns_input_scale"])
        muon_step(params, grads, buffers, lr=group["lr"], weight_decay=group["weight_decay"],
                  momentum=group["momentum"], nesterov=group["nesterov"], conventions=self.conventions,
                  schedule=schedule, eps=group["ns_eps"], dtype=self.ns_dtype,
                  batch_same_shape=self.batch_same_shape)

    def _adamw_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        local = self._local
        adamw_step([local(p) for p in params], [local(p.grad) for p in params],
                   [local(s["exp_avg"]) for s in states], [local(s["exp_avg_sq"]) for s in states],
                   [s["step"] for s in states], lr=group["lr"],
                   beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])

    # ---------------------------------------------------------------- finiteness

    def _nonfinite(self, S_max: list[Tensor]) -> list[str]:
        """Names of the local gradients and max logits holding a NaN or Inf."""
        named = [(name, self._local(p.grad)) for group in self.param_groups
                 for name, p in zip(group["names"], group["params"]) if p.grad is not None]
        named += [(f"{t.name}.max_logits", s) for t, s in zip(self.clip_targets, S_max)]
        if not named:
            return []
        # A NaN or Inf makes the L2 norm NaN or Inf: one fast pass per tensor and one sync in all.
        # A norm can also overflow on huge finite values, so suspects are confirmed one by one.
        norms = torch._foreach_norm([t for _, t in named])
        suspect = ~torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms]))
        if not bool(suspect.any()):
            return []
        return [name for (name, t), s in zip(named, suspect.tolist()) if s and not bool(torch.isfinite(t).all())]

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The optimizer state (moments, momentum buffers, groups) plus the step counters."""
        state = super().state_dict()
        state["muonclip"] = {"steps": self.steps, "skipped_steps": self.skipped_steps}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` returned (the same model's split)."""
        state_dict = dict(state_dict)
        counters = state_dict.pop("muonclip", {"steps": 0, "skipped_steps": 0})
        super().load_state_dict(state_dict)
        self.steps = counters["steps"]
        self.skipped_steps = counters["skipped_steps"]

