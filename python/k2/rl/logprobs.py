"""Log-probabilities of given completions under the policy, by one full forward (docs/rl.md).

The trainer needs log π_θ(y|x) with gradients, and the rollout engine reports log π_old; both
are ``log_softmax(logits / T)`` at each completion token, with T the temperature the completion
was sampled at (1 for greedy ones) and no top-p truncation. The sequence log-probability is the
sum over the completion's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from k2.errors import RLError

if TYPE_CHECKING:
    from k2.model.model import K2ForCausalLM


def batch_logprobs(
    model: K2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    temperatures: float | Sequence[float],
) -> list[torch.Tensor]:
    """Per-token log-probabilities of each completion after its prompt (teacher forcing).

    The pairs run as one right-padded batch; gradients flow when enabled (train or eval mode is
    the caller's choice: a training-mode forward also records QK-Clip's max logits).

    Args:
        model: the policy.
        prompts: token ids, one list per pair (non-empty).
        completions: token ids, one list per pair (may be empty).
        temperatures: one temperature for all pairs or one per pair (0 counts as 1).

    Returns:
        One float32 tensor [len(completion)] per pair.

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
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        start = len(prompt) - 1
        rows += [row] * len(completion)
        cols += range(start, start + len(completion))
        targets += list(completion)
        t = float(temperatures[row])
        scale += [t if t > 0 else 1.0] * len(completion)
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)
    logits = model.lm_head(hidden[rows_t, cols_t]).float()  # [N, V]
    logits = logits / torch.tensor(scale, dtype=torch.float32, device=device)[:, None]
    target_t = torch.tensor(targets, dtype=torch.long, device=device)
    picked = torch.log_softmax(logits, dim=-1).gather(1, target_t[:, None]).squeeze(1)
    return list(picked.split([len(c) for c in completions]))


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
