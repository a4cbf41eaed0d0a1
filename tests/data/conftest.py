"""Fixtures for the data-pipeline tests: small shards and corpora written in tmp dirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from k2 import _native


def write_shard(path: Path, docs: list[np.ndarray], vocab_size: int) -> dict:
    """Write ``docs`` (arrays of token ids) as one shard with k2's native writer."""
    writer = _native.ShardWriter(path, vocab_size)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    tokens = np.concatenate(docs).astype(np.uint32) if docs else np.zeros(0, np.uint32)
    writer.add_documents(tokens, lengths)
    return writer.finish()


def read_shard_reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An independent reader that follows docs/token-shards.md: returns (tokens, doc index)."""
    raw = path.read_bytes()
    assert raw[:8] == b"K2TOKENS"
    version, token_bytes, vocab_size, _ = np.frombuffer(raw[8:24], dtype="<u4")
    token_count, doc_count, _checksum = np.frombuffer(raw[24:48], dtype="<u8")
    assert version == 1
    dtype = {2: "<u2", 4: "<u4"}[int(token_bytes)]
    tokens = np.frombuffer(raw, dtype=dtype, count=int(token_count), offset=64)
    index_at = -(-(64 + int(token_count) * int(token_bytes)) // 8) * 8
    index = np.frombuffer(raw, dtype="<u8", count=int(doc_count) + 1, offset=index_at)
    assert index_at + 8 * (int(doc_count) + 1) == len(raw)
    return tokens.astype(np.int64), index.astype(np.int64)


@pytest.fixture
def counting_shards(tmp_path: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Two u32 shards whose token ids are their stream positions (0, 1, 2, ...), so every
    window says where it came from. Document lengths vary; 1 + 97*8 tokens in all.

    Returns:
        (shard paths, the stream as int64, document start offsets in the stream)
    """
    stream_len = 97 * 8 + 1
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, stream_len), size=30, replace=False))
    docs = np.split(np.arange(stream_len), cuts)
    paths = [tmp_path / "a.k2tok", tmp_path / "b.k2tok"]
    write_shard(paths[0], docs[:12], vocab_size=100_000)
    write_shard(paths[1], docs[12:], vocab_size=100_000)
    starts = np.concatenate([[0], cuts])
    return paths, np.arange(stream_len, dtype=np.int64), starts


SAMPLE_TEXT = """\
def fibonacci(n):
    \"\"\"Return the n-th Fibonacci number.\"\"\"
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()
"""


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """A directory of a few dozen small text, code and JSONL files (some Unicode)."""
    root = tmp_path / "corpus"
    (root / "code").mkdir(parents=True)
    for i in range(30):
        body = SAMPLE_TEXT.replace("fibonacci", f"fib_{i}").replace("Stack", f"Stack{i}")
        (root / "code" / f"mod_{i:02d}.py").write_text(body * (1 + i % 3), encoding="utf-8")
    (root / "notes.txt").write_text("Grüße aus Köln — naïve café. 東京\n" * 40, encoding="utf-8")
    records = [
        f'{{"text": "record {i}: the quick brown fox jumps over {i} lazy dogs"}}' for i in range(20)
    ]
    (root / "records.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    return root
