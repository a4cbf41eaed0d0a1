"""The K2 decoder: embeddings, pre-norm blocks of MLA + (dense MLP | MoE), the output head.

``K2ForCausalLM`` follows transformers' calling conventions (``forward(input_ids,
attention_mask=None, position_ids=None, labels=None)`` returns an object with ``.logits`` and
``.loss``; labels are aligned with the inputs and shifted inside) and its parameter names are the
Hub checkpoint's, except that routed experts are stacked ``[E, out, in]`` (see :mod:`k2.model.hub_names`
for the per-expert Hub names).

Packed sequences: positions that restart (a position not larger than its predecessor) start a
new document; attention is block-diagonal causal, so no token sees another document.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from k2.errors import DataError
from k2.model.config import K2Config
from k2.model.loss import linear_cross_entropy, shift_labels
from k2.model.mla import MLA, AttentionMask, KVCache, LatentCache, RMSNorm, build_attention_mask
from k2.model.moe import MLP, MoE, Experts, Router
from k2.model.rope import RotaryEmbedding


@dataclass
class CausalLMOutput:
    """What :meth:`K2ForCausalLM.forward` returns.

    Attributes:
        logits: [B, T, V] (or fewer positions with ``logits_to_keep``).
        loss: mean next-token cross-entropy over labels != -100 (plus the balance loss when
            enabled), or None without labels.
        aux_loss: the summed sequence-wise balance loss of the MoE layers, or None.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    """``h = x + MLA(norm(x)); out = h + FFN(norm(h))`` with FFN a dense MLP or an MoE."""

    def __init__(self, config: K2Config, layer_index: int) -> None:
        super().__init__()
        self.self_attn = MLA(config)
        if layer_index < config.first_k_dense_replace:
            self.mlp: MLP | MoE = MLP(config.hidden_size, config.intermediate_size)
        else:
            self.mlp = MoE(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """Args: x [B, T, hidden]. Returns: [B, T, hidden]."""
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class K2Model(nn.Module):
    """The decoder stack without the output head; returns the final-normed hidden states."""

    def __init__(self, config: K2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Run the decoder.

        Args:
            input_ids: [B, T] token ids.
            attention_mask: [B, past + T], 1 for real tokens and 0 for padding; None: all real.
            position_ids: [B, T]; default ``past .. past + T - 1``. Without a cache, restarting
                positions mark document boundaries.
            cache: a :class:`KVCache` to read and extend (decoding).

        Returns:
            [B, T, hidden].

        Raises:
            DataError: for token ids outside the vocabulary, a sequence longer than
                ``max_position_embeddings``, or a mask of the wrong shape.
        """
        past = cache.length if cache is not None else 0
        self._check_inputs(input_ids, attention_mask, position_ids, past)
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=input_ids.device).expand(batch, -1)
        key_valid = attention_mask.bool() if attention_mask is not None else None
        mask = build_attention_mask(position_ids, key_valid, past, documents=cache is None)
        rope = self.rotary_emb(position_ids)
        hidden = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, rope, mask, cache.layers[i] if cache is not None else None)
        return self.norm(hidden)

    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past: int,
    ) -> None:
        config = self.config
        if input_ids.dim() != 2:
            raise DataError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        if past + length > config.max_position_embeddings:
            raise DataError(
                f"sequence of {past + length} tokens is longer than max_position_embeddings="
                f"{config.max_position_embeddings}"
            )
        if input_ids.numel():
            low, high = torch.aminmax(input_ids)
            if low < 0 or high >= config.vocab_size:
                bad = low if low < 0 else high
                raise DataError(
                    f"token id {int(bad)} in input_ids is outside the vocabulary "
                    f"[0, vocab_size={config.vocab_size})"
                )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + length):
            raise DataError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                f"{(batch, past + length)} (cached + new tokens)"
            )
        if position_ids is not None:
            if tuple(position_ids.shape) != (batch, length):
                raise DataError(
                    f"position_ids has shape {tuple(position_ids.shape)}; expected {(batch, length)}"
                )
            if length and int(position_ids.max()) >= config.max_position_embeddings:
                raise DataError(
                    f"position id {int(position_ids.max())} is beyond max_position_embeddings="
                    f"{config.max_position_embeddings}"
                )


class K2ForCausalLM(nn.Module):
    """The K2 causal language model (``.model`` decoder + ``.lm_head``)."""

    def __init__(self, config: K2Config) -> None:
        super().__init__()
        self.config = config
        self.model = K2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    # ------------------------------------------------------------------ initialization
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialize as transformers does: normal(0, initializer_range) matrices, unit norms,
        zero selection biases, and recompute the rotary frequencies."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Router)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, Router):
                module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                for weight in (module.gate_proj, module.up_proj, module.down_proj):
                    nn.init.normal_(weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the non-persistent rotary frequencies (after ``to_empty``, for example)."""
        rotary = self.model.rotary_emb
        fresh = RotaryEmbedding(self.config)
        rotary.inv_freq = fresh.inv_freq.to(rotary.inv_freq.device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        targets: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits, and the loss when ``labels`` (or ``targets``) are given.

        Args:
            input_ids: [B, T] token ids.
            attention_mask: [B, past + T], 0 marks padding.
            position_ids: [B, T]; restarting positions mark packed documents.
            labels: [B, T] aligned with ``input_ids`` (shifted inside, as transformers does);
                -100 marks positions without a target.
            cache: a :class:`KVCache` for decoding.
            logits_to_keep: if > 0, compute logits for the last that many positions only.
            targets: instead of ``labels``, already-shifted targets [B, T]: position t predicts
                ``targets[t]`` (what k2's token loader yields).

        Returns:
            :class:`CausalLMOutput`; its loss includes the sequence-wise balance loss, if any.
        """
        if labels is not None and targets is not None:
            raise ValueError("give labels or targets, not both")
        hidden = self.model(input_ids, attention_mask, position_ids, cache)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        if labels is not None:
            if labels.shape != hidden.shape[:2]:
                raise DataError(f"labels have shape {tuple(labels.shape)}; expected {tuple(hidden.shape[:2])}")
            targets = shift_labels(labels)
        aux_loss = self._collect_aux_loss()
        loss = None
        if targets is None:
            logits = self.lm_head(hidden)
        else:
            # The head and the loss in one step, which spares a logits-sized buffer per step.
            logits, loss = linear_cross_entropy(hidden, self.lm_head.weight, targets)
            if aux_loss is not None:
                loss = loss + aux_loss
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss)

    def _collect_aux_loss(self) -> torch.Tensor | None:
        if not self.training or self.config.seq_aux_loss_alpha <= 0:
            return None
        losses = []
        for moe in self.moe_layers():
            if moe.aux_loss is not None:
                losses.append(moe.aux_loss)
                moe.aux_loss = None
        return torch.stack(losses).sum() if losses else None

    # ------------------------------------------------------------------ introspection
    def moe_layers(self) -> Iterator[MoE]:
        """The MoE blocks, in layer order."""
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                yield layer.mlp

    def attention_layers(self) -> Iterator[MLA]:
        """The MLA blocks, in layer order."""
        for layer in self.model.layers:
            yield layer.self_attn

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active): all parameters, and those one token uses (K of E routed experts).

        Selection-bias buffers are not parameters. Works on the meta device.
        """
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for moe in self.moe_layers():
            experts = moe.experts
            per_expert = sum(p[0].numel() for p in (experts.gate_proj, experts.up_proj, experts.down_proj))
            inactive += (moe.num_experts - moe.top_k) * per_expert
        return total, total - inactive

    # ------------------------------------------------------------------ Hub layout
    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in the Hub's names, with per-expert tensors (views, no copies)."""
        from k2.model.hub_names import to_hf_state_dict

        return to_hf_state_dict(self)

    def load_hf_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Load a Hub-layout state dict in place; see :func:`k2.model.hub_names.load_hf_state_dict`."""
        from k2.model.hub_names import load_hf_state_dict

        return load_hf_state_dict(self, state_dict, strict=strict)

    @classmethod
    def from_hf_state_dict(
        cls,
        config: K2Config,
        state_dict: Mapping[str, torch.Tensor],
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> K2ForCausalLM:
        """Build a model from a Hub-layout state dict (missing or unexpected names raise).

        Args:
            config: the model's configuration.
            state_dict: Hub names -> tensors (per-expert, transformers' fused experts, or FP8
                with ``weight_scale_inv``).
            dtype: parameter dtype (default: torch's default dtype).
            device: where to build the model.
        """
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device)
        if dtype is not None:
            model = model.to(dtype)
        model.reset_buffers()
        model.load_hf_state_dict(state_dict, strict=True)
        return model

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, *args, **kwargs):  # noqa: ANN002, ANN003 - documented in k2.model.generate
        """Generate continuations with the KV cache; see :func:`k2.model.generate.generate`."""
        from k2.model.generate import generate

        return generate(self, *args, **kwargs)
