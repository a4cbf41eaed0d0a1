"""Autoregressive generation with MLA's latent KV cache.

The prompt is prefilled in one naive-path forward that fills the cache; every later token is one
absorbed-path decode step over the cached latent ``c`` and rotary key ``k_pe``. A batch of prompts
of different lengths is left-padded: padding keys are masked out and positions count real tokens
only, so each row generates exactly what it would alone.

Decoding: greedy (``temperature=0``) or temperature sampling with nucleus (top-p) truncation;
a row stops at the first of its stop tokens. A row may carry a constraint (``constraints=``, e.g.
k2.agentic.constrain's schema-constrained tool calls, docs/constrained-decoding.md): before each
step its ``allowed_mask(vocab)`` removes the other tokens from the logits, after it ``advance(token)``
takes the token picked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from k2.errors import DataError
from k2.model.mla import KVCache

if TYPE_CHECKING:
    from k2.model.model import K2ForCausalLM


class TokenConstraint(Protocol):
    """A row's decoding constraint: the tokens it allows next, and the token that was picked."""

    def allowed_mask(self, vocab: int) -> torch.Tensor: ...

    def advance(self, token: int) -> None: ...


def apply_constraints(
    logits: torch.Tensor,
    constraints: Sequence[TokenConstraint | None],
    active: Sequence[bool] | None = None,
) -> torch.Tensor:
    """Logits [B, V] with each constrained (and ``active``) row's disallowed tokens set to -inf."""
    vocab = logits.shape[-1]
    rows, masks = [], []
    for row, constraint in enumerate(constraints):
        if constraint is not None and (active is None or active[row]):
            rows.append(row)
            masks.append(constraint.allowed_mask(vocab))
    if not rows:
        return logits
    if len(rows) == logits.shape[0]:
        allowed = torch.stack(masks)
    else:
        allowed = torch.ones(logits.shape, dtype=torch.bool)
        allowed[rows] = torch.stack(masks)
    return logits.masked_fill(~allowed.to(logits.device, non_blocking=True), float("-inf"))


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``input_ids`` [B, T] and ``attention_mask`` [B, T]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DataError("generate needs at least one prompt, and every prompt at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def next_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits [B, V]: argmax, or a sample. Returns [B] int64.

    Sampling divides the logits by ``temperature`` and keeps the smallest set of most likely
    tokens whose probability reaches ``top_p`` (always at least the most likely one).
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    model: K2ForCausalLM,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    constraints: Sequence[TokenConstraint | None] | None = None,
) -> torch.Tensor | list[list[int]]:
    """Continue prompts token by token.

    Args:
        model: the language model (run in eval mode for the call).
        input_ids: [B, T] left-padded ids (with ``attention_mask``), or a list of token lists of
            any lengths.
        attention_mask: [B, T], 0 for left padding; None means no padding.
        max_new_tokens: most tokens to add per prompt.
        temperature: 0 for greedy decoding, otherwise the sampling temperature.
        top_p: nucleus-sampling mass (1 keeps every token).
        stop_tokens: token id(s) that end a row (default: the config's ``eos_token_id``).
        pad_token_id: fills finished rows and left padding (default: config's, else 0).
        generator: random source for sampling.
        constraints: one per row (None for an unconstrained row): its ``allowed_mask(vocab)``
            restricts the row's next token, ``advance(token)`` is told the token picked.

    Returns:
        For a tensor input, [B, T + n] ids (prompt, then n <= max_new_tokens new tokens, finished
        rows padded). For a list input, each prompt's new tokens (up to and including its stop token).

    Raises:
        DataError: for right-padded input, or a prompt plus ``max_new_tokens`` longer than
            ``max_position_embeddings``.
    """
    config = model.config
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    if stop_tokens is None:
        stop_tokens = config.eos_token_id
    if stop_tokens is None:
        stops: list[int] = []
    else:
        stops = [stop_tokens] if isinstance(stop_tokens, int) else list(stop_tokens)

    as_lists = not isinstance(input_ids, torch.Tensor)
    device = next(model.parameters()).device
    if as_lists:
        input_ids, attention_mask = left_pad(input_ids, pad_token_id)
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if not bool(attention_mask[:, -1].all()):
        raise DataError("generate needs left-padded prompts: attention_mask[:, -1] must be all 1")
    batch, prompt_length = input_ids.shape
    if prompt_length + max_new_tokens > config.max_position_embeddings:
        raise DataError(
            f"prompt of {prompt_length} tokens plus max_new_tokens={max_new_tokens} is longer than "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    if constraints is not None and len(constraints) != batch:
        raise DataError(f"generate got {len(constraints)} constraints for {batch} prompts")

    was_training = model.training
    model.eval()
    try:
        dtype = next(model.parameters()).dtype
        cache = KVCache(config, batch, prompt_length + max_new_tokens, dtype, device)
        positions = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # real tokens only
        stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        new_tokens: list[torch.Tensor] = []
        step_ids, step_positions = input_ids, positions
        for _ in range(max_new_tokens):
            logits = model(
                step_ids, attention_mask, step_positions, cache=cache, logits_to_keep=1
            ).logits[:, -1]
            if constraints is not None:
                active = (~finished).tolist()
                logits = apply_constraints(logits, constraints, active)
            token = next_tokens(logits, temperature, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            new_tokens.append(token)
            if constraints is not None:
                for row, picked in enumerate(token.tolist()):
                    if active[row] and constraints[row] is not None:
                        constraints[row].advance(picked)
            finished |= torch.isin(token, stop_ids)
            if bool(finished.all()):
                break
            step_ids = token[:, None]
            step_positions = step_positions[:, -1:] + 1
            attention_mask = torch.cat((attention_mask, torch.ones_like(token)[:, None]), dim=1)
    finally:
        model.train(was_training)

    generated = torch.stack(new_tokens, dim=1) if new_tokens else input_ids[:, :0]
    if not as_lists:
        return torch.cat((input_ids, generated), dim=1)
    results = []
    for row in generated.tolist():
        for i, token in enumerate(row):
            if token in stops:
                row = row[: i + 1]
                break
        results.append(row)
    return results
