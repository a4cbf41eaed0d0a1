"""An agent policy sampled by the rollout engine, with schema-constrained tool calls on by
default (docs/constrained-decoding.md, docs/rl.md).

:class:`EnginePolicy` is a ``policy(messages, tools) -> turn text`` — what
:meth:`k2.rl.tasks.agentic.AgenticTask.episode` plays — that renders the conversation with K2's
chat template, samples the next assistant turn with a :class:`~k2.rl.rollout.RolloutEngine`
(each turn its own :class:`~k2.rl.rollout.Request`, stopping at ``<|im_end|>``) and keeps every
turn's :class:`~k2.rl.rollout.Completion` (tokens, log-probabilities, versions) for the trainer.
With tools declared, each request carries a
:class:`~k2.agentic.constrain.ToolCallConstraint`, so the calls it writes name declared tools
with schema-valid arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from k2.data.chat import render_chat
from k2.errors import RLError
from k2.rl.rollout import Completion, Request, RolloutEngine
from k2.rl.sampling import request_seed


class EnginePolicy:
    """Samples assistant turns with ``engine``.

    Args:
        engine: the rollout engine holding the policy model.
        tokenizer: the model's ``tokenizers.Tokenizer``.
        constrained: constrain tool calls to the declared tools and their schemas (default on).
        max_new_tokens: a turn's token budget (cut to what ``max_position_embeddings`` leaves).
        temperature, top_p: sampling settings of every turn.
        seed: turn ``k`` of this policy samples with ``request_seed(seed, k)``.
    """

    def __init__(self, engine: RolloutEngine, tokenizer: Any, *, constrained: bool = True,
                 max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.constrainer = None
        if constrained:
            from k2.agentic.constrain import ToolCallConstrainer

            self.constrainer = ToolCallConstrainer(tokenizer)
        self.stop_ids = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
        self.completions: list[Completion] = []

    def request(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None) -> Request:
        """The engine request of the next assistant turn."""
        ids = self.tokenizer.encode(render_chat(messages, tools, add_generation_prompt=True)).ids
        room = self.engine.model.config.max_position_embeddings - len(ids)
        if room < 1:
            raise RLError(f"turn {len(self.completions)}: the conversation is {len(ids)} tokens, no room left "
                          f"under max_position_embeddings={self.engine.model.config.max_position_embeddings}")
        constraint = self.constrainer.row(tools, ids) if self.constrainer is not None and tools else None
        return Request(ids, min(self.max_new_tokens, room), self.temperature, self.top_p, stop_ids=self.stop_ids,
                       seed=request_seed(self.seed, len(self.completions)), constraint=constraint)

    def __call__(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None) -> str:
        completion = self.engine.generate([self.request(messages, tools)])[0]
        self.completions.append(completion)
        return self.tokenizer.decode(completion.token_ids, skip_special_tokens=False)
