"""The pairwise critic: a k2 model that reads two replies and answers "A" or "B"
(docs/critic.md, "The critic").

:class:`Critic` scores a :class:`Comparison` (a conversation, its rubrics and two replies) from
the next-token distribution after the critic prompt (:mod:`k2.rl.critic.prompt`): with ℓ_A, ℓ_B
the logits of the tokens ``A`` and ``B``, P(A) = σ(ℓ_A − ℓ_B) (the two answers renormalized).
Every comparison is run in both orders — first reply as A, then first reply as B — in the same
batched forward, and

    P(first better) = ½ · (P(A | first shown as A) + P(B | first shown as B)),

so a critic that always prefers one position scores every pair 0.5 rather than favouring
whichever reply happened to come first. A comparison is *position-biased* when the critic picks
the same letter in both orders (its verdict followed the position, not the reply);
:attr:`Judgement.biased` records it.

No generation: one forward per sequence (right-padded micro-batches of ``batch_size``, the
language-model head applied to the last position only). The critic's training loss
(:meth:`Critic.loss`) is the cross-entropy of the right answer token at that position, both
orders, over the two answer tokens (default) or the whole vocabulary (the loss ``k2 sft`` puts
on the answer turn).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from k2.errors import CriticError
from k2.rl.critic.prompt import ANSWERS, CUT_MARK, critic_messages, reply_of
from k2.rl.critic.rubrics import Rubric


@dataclass(frozen=True)
class Comparison:
    """Two replies to one conversation, judged by ``rubrics``; ``name`` identifies it in errors."""

    messages: Sequence[Mapping[str, Any]]
    rubrics: Sequence[Rubric]
    first: str
    second: str
    name: str = ""


@dataclass(frozen=True)
class Judgement:
    """The critic's verdict on a :class:`Comparison`.

    Attributes:
        p_first: P(first better), averaged over the two orders.
        p_a_first_as_a: P(A) with the first reply shown as A.
        p_a_first_as_b: P(A) with the first reply shown as B (the critic then prefers the
            second reply with this probability).
    """

    p_first: float
    p_a_first_as_a: float
    p_a_first_as_b: float

    @property
    def biased(self) -> bool:
        """The critic picked the same letter in both orders."""
        return (self.p_a_first_as_a > 0.5) == (self.p_a_first_as_b > 0.5)


class Critic:
    """A k2 causal LM used as a pairwise judge.

    Args:
        model: the critic model (the policy itself, a copy of it, or a separate checkpoint).
        tokenizer: its tokenizer (``tokenizers.Tokenizer``) with K2's chat tokens.
        batch_size: sequences per forward.
        max_reply_tokens: each reply is cut to this many tokens before it is shown (0: no cut).

    Raises:
        CriticError: the tokenizer does not encode ``A``/``B`` after the assistant header as one
            token each.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 16,  # noqa: ANN001
                 max_reply_tokens: int = 0) -> None:
        if batch_size < 1:
            raise CriticError(f"critic batch_size must be at least 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_reply_tokens = batch_size, max_reply_tokens
        self.context = int(getattr(getattr(model, "config", None), "max_position_embeddings", 1 << 30))
        self.answer_ids = self._answer_ids()
        self.seconds = 0.0
        self.sequences = 0

    def _answer_ids(self) -> tuple[int, int]:
        from k2.data.chat import render_chat

        probe = render_chat([{"role": "user", "content": "x"}], add_generation_prompt=True)
        base = self.tokenizer.encode(probe, add_special_tokens=False).ids
        out = []
        for letter in ANSWERS:
            ids = self.tokenizer.encode(probe + letter, add_special_tokens=False).ids
            if len(ids) != len(base) + 1 or ids[: len(base)] != base:
                raise CriticError(f"the tokenizer does not encode the answer {letter!r} as one token "
                                  "after the assistant header; the critic needs it to")
            out.append(ids[-1])
        if out[0] == out[1]:
            raise CriticError("the tokenizer gives A and B the same id")
        return out[0], out[1]

    # ------------------------------------------------------------------ encoding
    def show(self, text: str) -> str:
        """A reply as the critic sees it (:func:`reply_of`, cut to ``max_reply_tokens``)."""
        reply = reply_of(text)
        if self.max_reply_tokens > 0:
            ids = self.tokenizer.encode(reply, add_special_tokens=False).ids
            if len(ids) > self.max_reply_tokens:
                reply = self.tokenizer.decode(ids[: self.max_reply_tokens]) + CUT_MARK
        return reply

    def encode(self, c: Comparison, first_as_a: bool) -> list[int]:
        """Token ids of the critic prompt for ``c`` in one order, answer turn open."""
        from k2.data.chat import render_chat

        first, second = self.show(c.first), self.show(c.second)
        a, b = (first, second) if first_as_a else (second, first)
        text = render_chat(critic_messages(c.messages, c.rubrics, a, b), add_generation_prompt=True)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        if len(ids) > self.context:
            raise CriticError(f"comparison {c.name or '?'}: the critic prompt has {len(ids)} tokens, "
                              f"more than the critic's context of {self.context}; lower the reply "
                              "limit (--critic-max-reply-tokens) or use fewer rubrics")
        return ids

    def encode_both(self, comparisons: Sequence[Comparison]) -> list[list[int]]:
        """Both orders of every comparison: ``[c0 first-as-A, c0 first-as-B, c1 ..., ...]``."""
        return [self.encode(c, order) for c in comparisons for order in (True, False)]

    # ------------------------------------------------------------------ forward
    def _last_hidden(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """The final hidden state at each sequence's last position, one right-padded batch."""
        device = next(self.model.parameters()).device
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[row, : len(s)] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.model.model(ids, None if bool(mask.all()) else mask)
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        return hidden[torch.arange(len(seqs), device=device), last]

    def answer_logits(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits [N, 2] of ``A`` and ``B`` after each sequence (no gradients)."""
        import time

        started = time.perf_counter()
        out = torch.zeros(len(seqs), 2)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for at in range(0, len(order), self.batch_size):
                    rows = order[at: at + self.batch_size]
                    hidden = self._last_hidden([seqs[i] for i in rows])
                    logits = self.model.lm_head(hidden).float()[:, list(self.answer_ids)]
                    out[torch.tensor(rows)] = logits.cpu()
        finally:
            self.model.train(was_training)
        self.seconds += time.perf_counter() - started
        self.sequences += len(seqs)
        return out

    def judge(self, comparisons: Sequence[Comparison]) -> list[Judgement]:
        """Judge every comparison in both orders (one batched pass over all of them)."""
        if not comparisons:
            return []
        logits = self.answer_logits(self.encode_both(comparisons))
        p_a = torch.sigmoid(logits[:, 0] - logits[:, 1]).double().view(-1, 2)
        return [Judgement(0.5 * (float(ab) + 1.0 - float(ba)), float(ab), float(ba)) for ab, ba in p_a]

    # ------------------------------------------------------------------ training
    def loss(self, comparisons: Sequence[Comparison], over: str = "pair") -> tuple[torch.Tensor, float]:
        """Cross-entropy of the right answer token (the first reply is the better one: ``A`` when
        it is shown first, ``B`` when shown second), mean over both orders of every comparison;
        with gradients. ``over="pair"`` (the default) normalizes over the two answer tokens only —
        the distribution the judgement reads, so a critic that always says one letter sits at
        log 2 and only telling the replies apart lowers it; ``over="vocab"`` normalizes over the
        whole vocabulary, the loss ``k2 sft`` puts on the answer turn. Also returns the share of
        sequences where the right letter had the higher logit of the two."""
        if over not in ("pair", "vocab"):
            raise CriticError(f"critic loss over {over!r}: choose pair or vocab")
        seqs = self.encode_both(comparisons)
        device = next(self.model.parameters()).device
        logits = self.model.lm_head(self._last_hidden(seqs)).float()
        pair = logits[:, list(self.answer_ids)]
        right = torch.tensor([0, 1] * len(comparisons), device=device)
        if over == "pair":
            loss = torch.nn.functional.cross_entropy(pair, right)
        else:
            targets = torch.tensor([self.answer_ids[0], self.answer_ids[1]] * len(comparisons), device=device)
            loss = torch.nn.functional.cross_entropy(logits, targets)
        accuracy = float((pair.detach().argmax(-1) == right).float().mean())
        return loss, accuracy
