"""Log-probabilities of given completions under the policy, by one full forward (docs/rl.md).

The trainer needs log π_θ(y|x) with gradients, and the rollout engine reports log π_old; both
are ``log_softmax(logits / T)`` at each completion token, with T the temperature the completion
was sampled at (1 for greedy ones) and no top-p truncation. The sequence log-probability is the
sum over the completion's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from k2.errors import RLError

if TYPE_CHECKING:
    from k2.model.model import K2ForCausalLM


def batch_logprobs(
    model: K2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    temperatures: float | Sequence[float],
    keep: Sequence[Sequence[bool]] | None = None,
) -> list[torch.Tensor]:
    """Per-token log-probabilities of each completion after its prompt (teacher forcing).

    The pairs run as one right-padded batch; gradients flow when enabled (train or eval mode is
    the caller's choice: a training-mode forward also records QK-Clip's max logits).

    Args:
        model: the policy.
        prompts: token ids, one list per pair (non-empty).
        completions: token ids, one list per pair (may be empty).
        temperatures: one temperature for all pairs or one per pair (0 counts as 1).
        keep: per pair, one flag per completion token: only the flagged tokens' log-probabilities
            are computed and returned (a whole episode in one row, its observations unflagged:
            :func:`episode_rows`). None keeps every token.

    Returns:
        One float32 tensor per pair: [len(completion)], or [flags set] with ``keep``.

    Raises:
        RLError: for mismatched lengths or an empty prompt (naming the pair).
    """
    if len(prompts) != len(completions):
        raise RLError(f"{len(prompts)} prompts but {len(completions)} completions")
    if isinstance(temperatures, (int, float)):
        temperatures = [float(temperatures)] * len(prompts)
    if len(temperatures) != len(prompts):
        raise RLError(f"{len(prompts)} prompts but {len(temperatures)} temperatures")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise RLError(f"pair {index}: prompt_ids is empty")
    if keep is None:
        keep = [[True] * len(c) for c in completions]
    if len(keep) != len(prompts):
        raise RLError(f"{len(prompts)} prompts but {len(keep)} keep masks")
    for index, (flags, completion) in enumerate(zip(keep, completions)):
        if len(flags) != len(completion):
            raise RLError(f"pair {index}: keep has {len(flags)} flags for {len(completion)} completion tokens")
    if not prompts:
        return []
    device = next(model.parameters()).device
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids[row, : lengths[row]] = torch.as_tensor([*prompt, *completion], dtype=torch.long)
        mask[row, : lengths[row]] = 1
    ids, mask = ids.to(device), mask.to(device)
    attention_mask = None if bool(mask.all()) else mask
    hidden = model.model(ids, attention_mask)  # [B, T, hidden]
    # Position t predicts token t + 1: the completion's tokens are predicted from
    # positions len(prompt) - 1 .. len(prompt) + len(completion) - 2.
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    scale: list[float] = []
    counts: list[int] = []
    for row, (prompt, completion, flags) in enumerate(zip(prompts, completions, keep)):
        start = len(prompt) - 1
        kept = [i for i, flag in enumerate(flags) if flag]
        counts.append(len(kept))
        rows += [row] * len(kept)
        cols += [start + i for i in kept]
        targets += [completion[i] for i in kept]
        t = float(temperatures[row])
        scale += [t if t > 0 else 1.0] * len(kept)
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)
    logits = model.lm_head(hidden[rows_t, cols_t]).float()  # [N, V]
    logits = logits / torch.tensor(scale, dtype=torch.float32, device=device)[:, None]
    target_t = torch.tensor(targets, dtype=torch.long, device=device)
    picked = torch.log_softmax(logits, dim=-1).gather(1, target_t[:, None]).squeeze(1)
    return list(picked.split(counts))


def episode_rows(segments: Sequence[tuple[Sequence[int], Any]]) -> list[tuple[list[int], list[int], list[bool]]]:
    """A multi-turn sample's turns ``(context ids, completion)`` as few rows as teacher forcing
    needs: ``(prompt, tokens, keep)`` for :func:`batch_logprobs`. When each turn's context is
    the previous context, that turn's tokens and the observation after it — as
    :func:`k2.rl.episodes.play_episodes` builds them — the whole episode is one row (the first
    context as prompt; the turns and observations as tokens, only the turns kept), which gives
    the same log-probabilities as one row per turn from a forward of the final context alone.
    A turn whose context does not continue the one before starts a row of its own."""
    rows: list[tuple[list[int], list[int], list[bool]]] = []
    end: list[int] = []  # the current row's prompt + tokens, for the continuation check
    for ids, completion in segments:
        ids, tokens = list(ids), list(completion.token_ids)
        if rows and len(ids) >= len(end) and ids[: len(end)] == end:
            _, row_tokens, row_keep = rows[-1]
            observation = ids[len(end):]
            row_tokens += observation + tokens
            row_keep += [False] * len(observation) + [True] * len(tokens)
        else:
            rows.append((ids, list(tokens), [True] * len(tokens)))
        end = ids + tokens
    return rows


def sequence_logprobs(
    model: K2ForCausalLM,
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    temperature: float,
) -> torch.Tensor:
    """Per-token log-probabilities [len(completion_ids)] of one completion after its prompt;
    ``.sum()`` is the sequence log-probability log π(y|x). See :func:`batch_logprobs`."""
    return batch_logprobs(model, [prompt_ids], [completion_ids], [temperature])[0]


def pad_logprobs(
    logprobs: Sequence[torch.Tensor | Sequence[float]], value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-token log-probabilities (tensors or lists) into [B, T] and a 0/1 float mask
    [B, T]: the token-level layout :func:`k2.rl.objective.grpo_loss` takes."""
    rows = [x if isinstance(x, torch.Tensor) else torch.tensor(list(x), dtype=torch.float32) for x in logprobs]
    width = max((len(x) for x in rows), default=0)
    if not rows:
        return torch.zeros(0, 0), torch.zeros(0, 0)
    padded = torch.stack([torch.nn.functional.pad(x, (0, width - len(x)), value=value) for x in rows])
    mask = torch.zeros(len(rows), width, dtype=padded.dtype, device=padded.device)
    for row, x in enumerate(rows):
        mask[row, : len(x)] = 1
    return padded, mask
