"""K2's tokenizer: byte-level BPE trained with Hugging Face ``tokenizers``.

The first ids are reserved, in this order, for the special tokens: the end-of-document token
(appended after every document in the token shards), the padding token, the chat-role tokens and
the tool-call tokens of docs/chat-format.md. Byte-level BPE means any UTF-8 text round-trips exactly. The
tokenizer is saved as ``tokenizer.json`` beside a ``tokenizer_config.json`` that carries the
chat template, so ``transformers.AutoTokenizer.from_pretrained(DIR)`` loads it as is.

Every digit is its own pre-token (docs/token-shards.md, "Tokenizer"): a number is spelled the same
way wherever it appears, which is what arithmetic and copying ids and amounts need.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from k2.data.chat import CHAT_TEMPLATE
from k2.errors import ConfigError, DataError

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_TOKENS = ("<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>")
TOOL_CALL_TOKENS = (
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
)
SPECIAL_TOKENS = (EOD_TOKEN, PAD_TOKEN, *CHAT_TOKENS, *TOOL_CALL_TOKENS)
"""Every reserved token; token ``SPECIAL_TOKENS[i]`` has id ``i``."""

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""The 256 byte symbols plus the special tokens."""


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer.

    Args:
        texts: the training text, one document or chunk per item.
        vocab_size: the target vocabulary size, special tokens included (the result is
            smaller if the text has fewer distinct merges).

    Returns:
        A ``tokenizers.Tokenizer``.

    Raises:
        ConfigError: ``vocab_size`` is below :data:`MIN_VOCAB_SIZE`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, f"{token} must have id {i}"
    return tokenizer


def tokenizer_config() -> dict:
    """The ``tokenizer_config.json`` that goes beside ``tokenizer.json``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOD_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    text = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(text, encoding="utf-8")


def load_tokenizer(path: str | Path):
    """Load ``tokenizer.json`` from a prepared data directory (or the file itself).

    Raises:
        DataError: the file is missing or not a tokenizer.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for unreadable files
        raise DataError(f"cannot load the tokenizer {path}: {err}") from err
