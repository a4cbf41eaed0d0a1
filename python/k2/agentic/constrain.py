"""Schema-constrained tool calls at generation time (docs/constrained-decoding.md).

Each generated row carries a :class:`ToolCallConstraint`, a small state machine over K2's
tool-call tokens (docs/chat-format.md). The sampler asks it for the allowed tokens before each
step (:meth:`~ToolCallConstraint.allowed_mask`) and tells it the token it picked
(:meth:`~ToolCallConstraint.advance`):

* **free** (ordinary text): any token except the call-structure tokens that only make sense
  inside a section (``<|tool_calls_section_end|>``, ``<|tool_call_begin|>``,
  ``<|tool_call_argument_begin|>``, ``<|tool_call_end|>``); ``<|tool_calls_section_begin|>``
  only when tools are declared;
* **between calls**: ``<|tool_call_begin|>``, or ``<|tool_calls_section_end|>`` after at least
  one call;
* **in a call** (after ``<|tool_call_begin|>``): an llguidance matcher for
  ``functions.NAME:COUNTER<|tool_call_argument_begin|>JSON<|tool_call_end|>``, NAME one of the
  declared tools, COUNTER the dialog's next call number, JSON compact (``", "`` and ``": "``
  separators, as the chat template writes arguments) and valid against that tool's schema;
* **after the section**: only ``<|im_end|>``.

The grammar engine is ``llguidance`` (the ``constrain`` extra), driven by k2's own tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from k2.agentic.calls import ARG_BEGIN, CALL_BEGIN, CALL_END, IM_END, SECTION_BEGIN, SECTION_END
from k2.errors import AgenticError
from k2.optional import require

FREE, BETWEEN, IN_CALL, AFTER = "free", "between", "in_call", "after"
JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "json_allow_general_unicode_escapes": True,  # json.dumps writes non-ASCII as \uXXXX
}
"""How argument JSON is written: compact, with the separators of ``json.dumps``' defaults."""
MAX_TOOL_SETS = 512
"""Tool sets whose compiled grammars a :class:`ToolCallConstrainer` keeps."""


def _llguidance():
    return require("llguidance", extra="constrain", purpose="schema-constrained tool calls")


def _tool_schema(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    fn = spec.get("function", spec)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise AgenticError(f"tool declaration {spec!r} has no function name")
    params = fn.get("parameters") or {"type": "object"}
    if not isinstance(params, Mapping):
        raise AgenticError(f"tool {fn['name']}: parameters must be a JSON Schema object")
    return fn["name"], dict(params)


class ToolCallGrammar:
    """The compiled call grammar of one tool set: one llguidance matcher per call counter,
    built on first use and copied for each call."""

    def __init__(self, tools: Sequence[Mapping[str, Any]], ll_tokenizer: Any) -> None:
        self.tools = [_tool_schema(spec) for spec in tools]
        names = [name for name, _ in self.tools]
        if len(set(names)) != len(names):
            raise AgenticError(f"tool names must be unique, got {names}")
        self._tokenizer = ll_tokenizer
        self._matchers: dict[int, Any] = {}

    def lark(self, counter: int) -> str:
        """The Lark grammar of one call (the text after ``<|tool_call_begin|>``)."""
        lines = ["start: " + " | ".join(f"call_{i}" for i in range(len(self.tools)))]
        for i, (name, schema) in enumerate(self.tools):
            header = json.dumps(f"functions.{name}:{counter}")
            schema = {**schema, "x-guidance": JSON_OPTIONS}
            lines.append(f"call_{i}: {header} {ARG_BEGIN} args_{i} {CALL_END}")
            lines.append(f"args_{i}: %json {json.dumps(schema)}")
        return "\n".join(lines) + "\n"

    def matcher(self, counter: int) -> Any:
        """A fresh matcher for the call numbered ``counter``.

        Raises:
            AgenticError: a tool's schema cannot be compiled (names the tools and llguidance's reason).
        """
        base = self._matchers.get(counter)
        if base is None:
            llg = _llguidance()
            grammar = llg.LLMatcher.grammar_from_lark(self.lark(counter))
            base = llg.LLMatcher(self._tokenizer, grammar, log_level=0)
            if base.is_error():
                names = ", ".join(name for name, _ in self.tools)
                raise AgenticError(f"cannot compile the call grammar of tools {names}: {base.get_error()}")
            self._matchers[counter] = base
        return base.deep_copy()


class ToolCallConstrainer:
    """Builds per-row constraints for one tokenizer; caches the grammar of each tool set.

    Args:
        tokenizer: k2's ``tokenizers.Tokenizer`` (its special tokens must be K2's).
    """

    def __init__(self, tokenizer: Any) -> None:
        llg = _llguidance()
        self.ll_tokenizer = llg.LLTokenizer(tokenizer.to_str())
        self.vocab_size = self.ll_tokenizer.vocab_size
        ids = {}
        for token in (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END, IM_END):
            ids[token] = tokenizer.token_to_id(token)
            if ids[token] is None:
                raise AgenticError(f"the tokenizer has no {token} token: it is not K2's")
        self.section_begin, self.section_end = ids[SECTION_BEGIN], ids[SECTION_END]
        self.call_begin, self.arg_begin = ids[CALL_BEGIN], ids[ARG_BEGIN]
        self.call_end, self.im_end = ids[CALL_END], ids[IM_END]
        self._grammars: dict[str, ToolCallGrammar] = {}
        self._fixed: dict[tuple[str, int], torch.Tensor] = {}
        self._bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)  # bit i of a byte

    def grammar(self, tools: Sequence[Mapping[str, Any]]) -> ToolCallGrammar:
        """The (cached) call grammar of a tool set; the least recently used of more than
        :data:`MAX_TOOL_SETS` tool sets are dropped."""
        key = json.dumps(list(tools), sort_keys=True)
        grammar = self._grammars.pop(key, None)
        if grammar is None:
            grammar = ToolCallGrammar(tools, self.ll_tokenizer)
            if len(self._grammars) >= MAX_TOOL_SETS:
                del self._grammars[next(iter(self._grammars))]
        self._grammars[key] = grammar  # most recently used last
        return grammar

    def row(self, tools: Sequence[Mapping[str, Any]] | None, prompt_ids: Sequence[int] = ()) -> ToolCallConstraint:
        """The constraint of one row whose prompt is ``prompt_ids`` (the state and the next call
        counter are read from it, so a prompt may end inside a tool-calls section)."""
        grammar = self.grammar(tools) if tools else None
        return ToolCallConstraint(self, grammar, prompt_ids)

    # --- masks -----------------------------------------------------------------------------
    def fixed_mask(self, name: str, vocab: int, allowed: Sequence[int] = (), banned: Sequence[int] = ()) -> torch.Tensor:
        """A cached mask: only ``allowed`` (when given), else everything but ``banned``."""
        key = (name, vocab)
        mask = self._fixed.get(key)
        if mask is None:
            if allowed:
                mask = torch.zeros(vocab, dtype=torch.bool)
                mask[list(allowed)] = True
            else:
                mask = torch.ones(vocab, dtype=torch.bool)
                mask[list(banned)] = False
            self._fixed[key] = mask
        return mask

    def unpack(self, bitmask: bytes, vocab: int) -> torch.Tensor:
        """llguidance's bitmask (bit ``t`` of the little-endian words = token ``t``) as a bool
        mask of ``vocab`` entries (ids past the tokenizer's vocabulary are never allowed)."""
        packed = torch.frombuffer(bytearray(bitmask), dtype=torch.uint8)
        bits = packed.unsqueeze(1).bitwise_and(self._bits).ne(0).flatten()
        n = min(vocab, self.vocab_size)
        if n == vocab:
            return bits[:vocab]
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[:n] = bits[:n]
        return mask


class ToolCallConstraint:
    """One row's constraint state (see the module docstring); made by :meth:`ToolCallConstrainer.row`."""

    def __init__(self, owner: ToolCallConstrainer, grammar: ToolCallGrammar | None, prompt_ids: Sequence[int]) -> None:
        self._owner = owner
        self._grammar = grammar
        self._matcher: Any = None
        self.state = FREE
        self.first_in_section = False
        self.calls = 0  # calls completed during generation
        ids = [int(t) for t in prompt_ids]
        o = owner
        self.counter = sum(1 for t in ids if t == o.call_begin)
        structural = {o.section_begin, o.section_end, o.call_begin, o.arg_begin, o.call_end, o.im_end}
        last = max((i for i, t in enumerate(ids) if t in structural), default=-1)
        token = ids[last] if last >= 0 else None
        if token == o.section_begin:
            self._need_tools("a prompt that opens a tool-calls section")
            self.state, self.first_in_section = BETWEEN, True
        elif token == o.call_end:
            self._need_tools("a prompt inside a tool-calls section")
            self.state = BETWEEN
        elif token == o.section_end:
            self.state = AFTER
        elif token in (o.call_begin, o.arg_begin):
            self._need_tools("a prompt that ends inside a tool call")
            start = max(i for i, t in enumerate(ids) if t == o.call_begin)
            self.counter -= 1
            self._open_call()
            for t in ids[start + 1 :]:
                if not self._matcher.consume_token(t):
                    raise AgenticError(
                        "the prompt ends inside a tool call that does not fit the declared tools: "
                        + self._matcher.get_error()
                    )

    def _need_tools(self, what: str) -> None:
        if self._grammar is None:
            raise AgenticError(f"{what} needs declared tools to constrain the calls")

    def _open_call(self) -> None:
        assert self._grammar is not None
        self._matcher = self._grammar.matcher(self.counter)
        self.counter += 1
        self.state = IN_CALL

    def allowed_mask(self, vocab: int) -> torch.Tensor:
        """The tokens allowed next, as a bool tensor of ``vocab`` entries."""
        o = self._owner
        if self.state == FREE:
            banned = [o.section_end, o.call_begin, o.arg_begin, o.call_end]
            if self._grammar is None:
                return o.fixed_mask("free-no-tools", vocab, banned=banned + [o.section_begin])
            return o.fixed_mask("free", vocab, banned=banned)
        if self.state == BETWEEN:
            if self.first_in_section:
                return o.fixed_mask("first-call", vocab, allowed=[o.call_begin])
            return o.fixed_mask("between", vocab, allowed=[o.call_begin, o.section_end])
        if self.state == AFTER:
            return o.fixed_mask("after", vocab, allowed=[o.im_end])
        return o.unpack(self._matcher.compute_bitmask(), vocab)

    def advance(self, token: int) -> None:
        """Take the token that was sampled for this row.

        Raises:
            AgenticError: the token is not one :meth:`allowed_mask` allowed in a tool-call state.
        """
        o = self._owner
        token = int(token)
        if self.state == FREE:
            if token == o.section_begin and self._grammar is not None:
                self.state, self.first_in_section = BETWEEN, True
            return
        if self.state == BETWEEN:
            if token == o.call_begin:
                self.first_in_section = False
                self._open_call()
            elif token == o.section_end and not self.first_in_section:
                self.state = AFTER
            else:
                raise AgenticError(f"token {token} is not allowed between tool calls")
            return
        if self.state == AFTER:
            if token != o.im_end:
                raise AgenticError(f"token {token} is not allowed after a tool-calls section (only <|im_end|>)")
            self.state = FREE
            return
        if not self._matcher.consume_token(token):
            raise AgenticError(f"token {token} breaks the tool call's grammar: {self._matcher.get_error()}")
        if token == o.call_end and self._matcher.is_accepting():
            self._matcher = None
            self.calls += 1
            self.state = BETWEEN
