"""K2's ultra-sparse Mixture-of-Experts: sigmoid router, stacked SwiGLU experts, shared expert.

Per token (docs/model.md): scores ``s = sigmoid(x W_gate^T)``; a per-expert bias ``b`` (a buffer,
not a trained parameter) is added only to *choose* the top-k experts (group-limited when
``n_group > 1``); the chosen experts' unbiased scores are normalized to sum to 1 and multiplied by
``routed_scaling_factor``; the output is the weighted sum of the chosen experts' SwiGLU outputs
plus the shared expert's output.

Dispatch goes through :mod:`k2.kernels.moe_dispatch`: ``route`` (expert histogram and a stable
expert-contiguous order), ``permute`` (gather token rows into that order) and ``combine`` (each
token's weighted sum of its experts' outputs). On CUDA they run the hand-written kernels; on the
CPU, their PyTorch references.

Balancing is auxiliary-loss-free (DeepSeek-V3): :meth:`MoE.update_router_bias` nudges ``b``
toward equal expert load after each optimizer step; an optional sequence-wise balance loss is
kept in ``MoE.aux_loss``.

Shapes: N tokens, H hidden, I expert intermediate, E routed experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from k2.kernels.moe_dispatch import combine, permute, route
from k2.model.config import K2Config
from k2.model.precision import upcast


class MLP(nn.Module):
    """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid top-k router with a selection bias (``e_score_correction_bias``) and group limit."""

    def __init__(self, config: K2Config) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        # The selection bias stays fp32 whatever dtype the model is cast to (as in transformers).
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens.

        Args:
            x: [N, H].

        Returns:
            scores [N, E] (fp32 sigmoid scores), weights [N, K] (fp32, normalized and scaled),
            experts [N, K] (int64 expert ids).
        """
        scores = F.linear(upcast(x), upcast(self.weight)).sigmoid()  # [N, E]
        choice = scores.detach() + self.e_score_correction_bias  # [N, E]
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, groups]
            keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        experts = choice.topk(self.top_k, dim=-1, sorted=False).indices  # [N, K]
        weights = scores.gather(1, experts)  # [N, K]
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, weights * self.routed_scaling_factor, experts


class Experts(nn.Module):
    """E routed SwiGLU experts stored as three stacks ``[E, out, in]`` (gate, up, down)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Run each expert on its contiguous block of rows.

        Args:
            x_sorted: [N*K, H] token rows grouped by expert (from ``k2.kernels.moe_dispatch.permute``).
            counts: rows per expert, length E, summing to N*K.

        Returns:
            [N*K, H] expert outputs in the same order. Experts that got no rows do no work; their
            weights still receive an (exactly zero) gradient.
        """
        return GroupedSwiGLU.apply(x_sorted, self.gate_proj, self.up_proj, self.down_proj, counts)


class GroupedSwiGLU(torch.autograd.Function):
    """``y_e = (silu(x_e G_e^T) * (x_e U_e^T)) D_e^T`` for each expert e's contiguous rows x_e.

    A grouped GEMM written as a loop of per-expert matrix products into preallocated buffers, with
    the elementwise SwiGLU done once over all rows, and a hand-written backward (one autograd node
    instead of a dozen per expert). Idle experts get exactly zero gradients.
    """

    @staticmethod
    def forward(ctx, x, gate, up, down, counts):  # noqa: ANN001, ANN205
        rows, hidden = x.shape
        a = x.new_empty(rows, gate.shape[1])  # gate pre-activation [N*K, I]
        b = x.new_empty(rows, up.shape[1])  # up projection [N*K, I]
        for expert, block in _expert_blocks(counts):
            torch.mm(x[block], gate[expert].T, out=a[block])
            torch.mm(x[block], up[expert].T, out=b[block])
        silu_a = F.silu(a)
        h = silu_a * b  # [N*K, I]
        y = x.new_empty(rows, hidden)
        for expert, block in _expert_blocks(counts):
            torch.mm(h[block], down[expert].T, out=y[block])
        ctx.save_for_backward(x, gate, up, down, a, b, silu_a, h)
        ctx.counts = counts
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        x, gate, up, down, a, b, silu_a, h = ctx.saved_tensors
        dy = dy.contiguous()
        d_gate, d_up, d_down = torch.zeros_like(gate), torch.zeros_like(up), torch.zeros_like(down)
        dh = torch.empty_like(h)
        for expert, block in _expert_blocks(ctx.counts):
            torch.mm(dy[block], down[expert], out=dh[block])
            torch.mm(dy[block].T, h[block], out=d_down[expert])
        da = torch.ops.aten.silu_backward(dh * b, a)  # dh * b * silu'(a)
        db = dh * silu_a
        dx = torch.empty_like(x)
        for expert, block in _expert_blocks(ctx.counts):
            torch.mm(da[block], gate[expert], out=dx[block])
            dx[block].addmm_(db[block], up[expert])
            torch.mm(da[block].T, x[block], out=d_gate[expert])
            torch.mm(db[block].T, x[block], out=d_up[expert])
        return dx, d_gate, d_up, d_down, None


def _expert_blocks(counts: list[int]) -> Iterator[tuple[int, slice]]:
    """(expert, row slice) for every expert with at least one row."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, slice(start, start + count)
        start += count


class MoE(nn.Module):
    """Routed experts plus shared experts, with load statistics and bias balancing."""

    def __init__(self, config: K2Config) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.seq_aux_loss_alpha = config.seq_aux_loss_alpha
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0
            else None
        )
        self.expert_load: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, T, H]. Returns: [B, T, H].

        Training forwards add the per-expert token counts to ``expert_load`` and, when
        ``seq_aux_loss_alpha > 0``, set ``aux_loss`` to this forward's sequence-wise balance loss.
        """
        batch, length, hidden = x.shape
        flat = x.reshape(-1, hidden)  # [N, H]
        scores, weights, experts = self.gate(flat)
        routing = route(experts, self.num_experts)
        counts = routing.tokens_per_expert
        y_sorted = self.experts(permute(flat, routing), counts.tolist())
        out = combine(y_sorted, weights, routing).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        if self.training:
            load = counts.detach().float()
            self.expert_load = load if self.expert_load is None else self.expert_load + load
            if self.seq_aux_loss_alpha > 0:
                self.aux_loss = self.seq_aux_loss_alpha * sequence_balance_loss(
                    scores.view(batch, length, -1), experts.view(batch, length, -1)
                )
        return out.view(batch, length, hidden)

    def pop_expert_load(self) -> torch.Tensor | None:
        """Tokens routed to each expert (fp32 [E]) since the last call, or None; resets."""
        load, self.expert_load = self.expert_load, None
        return load

    @torch.no_grad()
    def update_router_bias(self, load: torch.Tensor, rate: float = 1e-3) -> None:
        """Auxiliary-loss-free balancing: ``b += rate * sign(mean(load) - load)``, re-centred.

        Args:
            load: [E] tokens per expert (all-reduce it across ranks first under data parallelism).
            rate: the bias step (DeepSeek-V3's gamma; 1e-3 by default).
        """
        bias = self.gate.e_score_correction_bias
        load = load.to(device=bias.device, dtype=torch.float32)
        bias += rate * torch.sign(load.mean() - load)
        bias -= bias.mean()


def sequence_balance_loss(scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, ``sum_i f_i P_i`` averaged over sequences.

    ``f_i = E / (K T) * #{t : expert i chosen for token t}`` and ``P_i = mean_t s'_{i,t}`` with
    ``s'`` the sigmoid scores normalized over experts.

    Args:
        scores: [B, T, E] sigmoid scores.
        experts: [B, T, K] chosen experts.

    Returns:
        A scalar; 1 when routing is perfectly balanced and the scores uniform.
    """
    batch, length, num_experts = scores.shape
    top_k = experts.shape[-1]
    chosen = torch.zeros_like(scores).scatter_(2, experts, 1.0).sum(dim=1)  # [B, E]
    frequency = chosen * num_experts / (top_k * length)
    probability = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
    return (frequency * probability).sum(dim=-1).mean()
