"""The closed loop: on-policy samples of verifiable-reward prompts teach the critic
(docs/critic.md, "Closed loop").

Each RL step samples K replies to each verifiable prompt and the verifier scores them. Every two
replies of one prompt whose verifier scores differ make a :class:`Preference` — the better-scored
reply wins — and go into a bounded :class:`PairBuffer`. Every N RL steps :class:`CriticLearner`
takes a few optimizer steps of its own (AdamW, its own state) on batches drawn from the buffer,
with the critic's answer-token cross-entropy in both orders (:meth:`Critic.loss`).

Held-out prompts never become training pairs: :func:`preference_pairs` drops a prompt whose id
is in the evaluation set or whose problem belongs to the task's test split (checked through the
task's split key where the task exposes one, :func:`held_out`). The critic–verifier agreement is
measured on pairs of held-out prompts only (:func:`agreement`).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from k2.errors import CriticError
from k2.rl.critic.critic import Comparison, Critic
from k2.rl.critic.rubrics import Rubric
from k2.rl.tasks.base import Prompt, split_of


@dataclass(frozen=True)
class Preference:
    """Two replies to one prompt, ``winner`` scored higher than ``loser`` by the verifier."""

    prompt_id: str
    messages: list[dict[str, Any]]
    winner: str
    loser: str
    winner_score: float
    loser_score: float

    def comparison(self, rubrics: Sequence[Rubric]) -> Comparison:
        """The comparison with the winner first."""
        return Comparison(self.messages, rubrics, self.winner, self.loser, name=self.prompt_id)


def split_key(task: Any, prompt: Prompt) -> str | None:
    """The problem's split key, for the tasks whose key can be read off a prompt (arithmetic:
    the expression; countdown: the sorted numbers and the target); None for others."""
    name = getattr(task, "name", "")
    hidden = prompt.hidden
    if name == "arithmetic" and "expression" in hidden:
        return str(hidden["expression"])
    if name == "countdown" and "numbers" in hidden and "target" in hidden:
        return f"{sorted(hidden['numbers'])}->{hidden['target']}"
    return None


def held_out(task: Any, prompt: Prompt, held_out_ids: Collection[str] = ()) -> bool:
    """Whether ``prompt`` is held out: in ``held_out_ids``, or in ``task``'s test split."""
    if prompt.id in held_out_ids:
        return True
    key = split_key(task, prompt)
    return key is not None and split_of(task.name, key, task.test_fraction) == "test"


def preference_pairs(task: Any, prompts: Sequence[Prompt], texts: Sequence[str], scores: Sequence[float],
                     k: int, *, held_out_ids: Collection[str] = (), per_prompt: int = 0,
                     seed: int = 0, evaluation: bool = False) -> list[Preference]:
    """The preference pairs of one step's samples (prompt-major, ``k`` per prompt): every two
    samples of a prompt with different ``scores``, the higher one winning; at most ``per_prompt``
    of them per prompt (0: all), chosen by ``seed``; none from a held-out prompt — unless
    ``evaluation``, for the held-out pairs that measure agreement (never training data)."""
    if not len(prompts) == len(texts) == len(scores) or len(prompts) % k:
        raise CriticError(f"{len(prompts)} prompts, {len(texts)} texts and {len(scores)} scores do not "
                          f"make groups of {k}")
    rng = random.Random(seed)
    out: list[Preference] = []
    for g in range(0, len(prompts), k):
        prompt = prompts[g]
        if not evaluation and held_out(task, prompt, held_out_ids):
            continue
        found = []
        for i in range(g, g + k):
            for j in range(i + 1, g + k):
                if scores[i] == scores[j]:
                    continue
                w, l_ = (i, j) if scores[i] > scores[j] else (j, i)
                found.append(Preference(prompt.id, list(prompt.messages), texts[w], texts[l_],
                                        float(scores[w]), float(scores[l_])))
        if per_prompt and len(found) > per_prompt:
            found = rng.sample(found, per_prompt)
        out += found
    return out


class PairBuffer:
    """The newest ``capacity`` preference pairs (oldest dropped first)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise CriticError(f"the pair buffer needs a capacity of at least 1, got {capacity}")
        self.capacity = capacity
        self.pairs: list[Preference] = []
        self.seen = 0

    def add(self, pairs: Sequence[Preference]) -> None:
        self.pairs = (self.pairs + list(pairs))[-self.capacity:]
        self.seen += len(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, n: int, seed: int) -> list[Preference]:
        """``n`` pairs drawn without replacement (all when fewer), chosen by ``seed``."""
        if len(self.pairs) <= n:
            return list(self.pairs)
        return random.Random(seed).sample(self.pairs, n)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "seen": self.seen, "pairs": [asdict(p) for p in self.pairs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self.seen = int(state["seen"])
        self.pairs = [Preference(**p) for p in state["pairs"]]


@dataclass(frozen=True)
class Agreement:
    """The critic against the verifier on preference pairs."""

    pairs: int
    agreement: float  # share where P(winner better) > 0.5 (exactly 0.5 counts half)
    mean_p_winner: float
    position_bias_rate: float


def agreement(critic: Critic, pairs: Sequence[Preference], rubrics: Sequence[Rubric]) -> Agreement:
    """How often the critic prefers the reply the verifier scored higher (both orders averaged)."""
    if not pairs:
        return Agreement(0, float("nan"), float("nan"), float("nan"))
    judged = critic.judge([p.comparison(rubrics) for p in pairs])
    agree = sum(1.0 if j.p_first > 0.5 else 0.5 if j.p_first == 0.5 else 0.0 for j in judged)
    return Agreement(len(pairs), agree / len(pairs), sum(j.p_first for j in judged) / len(pairs),
                     sum(j.biased for j in judged) / len(pairs))


class CriticLearner:
    """The critic's training: its optimizer (AdamW, its own state) and its pair buffer.

    Args:
        critic: the critic to train (its model's parameters are the ones updated).
        rubrics: the rubrics its training prompts show.
        lr: AdamW's learning rate.
        batch: preference pairs per update step (each in both orders).
        capacity: the buffer's size.
        weight_decay: AdamW's weight decay.
        grad_clip: gradient-norm clip (0: none).
    """

    def __init__(self, critic: Critic, rubrics: Sequence[Rubric], *, lr: float = 1e-4, batch: int = 8,
                 capacity: int = 256, weight_decay: float = 0.0, grad_clip: float = 1.0) -> None:
        self.critic, self.rubrics = critic, list(rubrics)
        self.batch, self.grad_clip = batch, grad_clip
        self.optimizer = torch.optim.AdamW(critic.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.buffer = PairBuffer(capacity)
        self.updates = 0

    def update(self, steps: int, seed: int) -> dict[str, float]:
        """``steps`` optimizer steps on batches from the buffer (seeded by ``seed``); returns the
        mean loss and answer accuracy, or nothing when the buffer is empty."""
        if not self.buffer.pairs or steps < 1:
            return {}
        model = self.critic.model
        was_training = model.training
        model.train()
        losses, accs = [], []
        for s in range(steps):
            chosen = self.buffer.batch(self.batch, seed * 1_000_003 + s)
            loss, acc = self.critic.loss([p.comparison(self.rubrics) for p in chosen])
            loss.backward()
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            accs.append(acc)
            self.updates += 1
        model.train(was_training)
        return {"critic_loss": sum(losses) / len(losses), "critic_train_accuracy": sum(accs) / len(accs)}

    def state_dict(self) -> dict[str, Any]:
        """The critic's weights, its optimizer's state, the buffer and the update count."""
        return {"model": {k: v.detach().clone() for k, v in self.critic.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "buffer": self.buffer.state_dict(),
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"model", "optimizer", "buffer", "updates"} - set(state)
        if missing:
            raise CriticError(f"the checkpoint's critic state lacks {sorted(missing)}")
        self.critic.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.updates = int(state["updates"])
