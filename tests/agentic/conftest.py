"""Fixtures for the k2.agentic tests: a small real tokenizer."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer (vocabulary 400) with K2's special tokens, trained on stdlib text."""
    from k2.data.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text() for n in ("textwrap.py", "shlex.py")]
    return train_tokenizer(texts, 400)
