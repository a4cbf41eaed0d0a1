"""k2's data pipeline: corpus, tokenizer, token shards and the loader (docs/token-shards.md).

* :mod:`k2.data.corpus`    — the default corpus (the Python standard library) or the user's
  files; chunking and the train/validation split;
* :mod:`k2.data.tokenizer` — byte-level BPE with K2's reserved chat and tool-call tokens;
* :mod:`k2.data.chat`      — K2's chat template;
* :mod:`k2.data.prepare`   — ``k2 data prepare``: corpus -> tokenizer -> shards + manifest;
* :mod:`k2.data.manifest`  — the manifest's one typed reader, and the check of each shard
  against it;
* :mod:`k2.data.loader`    — :class:`TokenLoader`, the Rust-backed batch loader (with each
  batch's loss mask);
* :mod:`k2.data.sft`       — chat JSONL for ``k2 sft``: checks, tokens + assistant loss mask,
  whole-conversation packing (docs/sft.md).

The shard byte layout is documented in ``docs/token-shards.md``.
"""

from __future__ import annotations

from k2.data.chat import CHAT_TEMPLATE, render_chat
from k2.data.loader import Batch, TokenLoader, read_loss_mask, read_tokens
from k2.data.prepare import PrepareOptions, prepare
from k2.data.tokenizer import EOD_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, load_tokenizer

__all__ = [
    "Batch",
    "CHAT_TEMPLATE",
    "EOD_TOKEN",
    "PAD_TOKEN",
    "PrepareOptions",
    "SPECIAL_TOKENS",
    "TokenLoader",
    "load_tokenizer",
    "prepare",
    "read_loss_mask",
    "read_tokens",
    "render_chat",
]
