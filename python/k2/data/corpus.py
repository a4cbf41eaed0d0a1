"""The text a tokenizer is trained on and a model is pretrained on.

With no corpus given, k2 uses the running Python's standard library: every ``.py`` file under
``sysconfig``'s ``stdlib`` directory, except installed packages (``site-packages``,
``dist-packages``), the test suites (``test/``, ``tests/``, ``idle_test/``) and the
``_sysconfigdata_*`` build files. It is real code, present on every machine, and the same
Python version gives the same corpus everywhere.

Users may instead name files and directories: ``.jsonl`` files hold one JSON object per line
with a ``text`` field (one document each); any other file is one UTF-8 text document; a directory
contributes its ``.txt``, ``.md``, ``.rst``, ``.py`` and ``.jsonl`` files, recursively.

Documents are deduplicated, cut into chunks at line boundaries (at most ``chunk_bytes`` of UTF-8
each, so no single large file dominates either split) and the chunks are split into train and
validation by a stable hash of their text.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from k2 import _native
from k2.errors import ConfigError, DataError

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
"""Directory names whose contents the default corpus leaves out."""

DIRECTORY_SUFFIXES = frozenset({".txt", ".md", ".rst", ".py", ".jsonl"})
"""File types a corpus directory contributes."""

CHUNK_BYTES = 16 * 1024
"""Default upper bound on a chunk's UTF-8 size."""

SPLIT_BUCKETS = 1_000_000
"""Resolution of the train/validation split: a chunk goes to validation when
``xxh3_64(chunk) % SPLIT_BUCKETS < val_fraction * SPLIT_BUCKETS``."""


@dataclass(frozen=True)
class Document:
    """One document: ``name`` says where it came from (a path relative to its source, plus
    ``:LINE`` for a JSONL record)."""

    name: str
    text: str


@dataclass
class Corpus:
    """Deduplicated documents, in a stable order, and what was left out.

    Attributes:
        description: where the corpus came from, for messages.
        documents: the documents, sorted by source and then name.
        files: how many files contributed (after deduplication).
        size_bytes: total UTF-8 size of the documents.
        digest: SHA-256 (hex) over every document's name and text, in order.
        skipped: reason -> files skipped for it (unreadable, not UTF-8, duplicate).
    """

    description: str
    documents: list[Document]
    files: int
    size_bytes: int
    digest: str
    skipped: dict[str, list[str]] = field(default_factory=dict)


def stdlib_root() -> Path:
    """The running Python's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """The files of the default corpus, sorted by their path under :func:`stdlib_root`."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(relative.parts[:-1]):
            continue
        if path.name.startswith("_sysconfigdata_") or not path.is_file():
            continue
        files.append(relative)
    return [root / p for p in sorted(files, key=lambda p: p.as_posix())]


def _files_under(source: Path) -> list[tuple[Path, str]]:
    """(file, display name) pairs for one user-given path, sorted."""
    if source.is_dir():
        found = [
            p
            for p in source.rglob("*")
            if p.suffix in DIRECTORY_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(source).parts)
        ]
        found.sort(key=lambda p: p.relative_to(source).as_posix())
        return [(p, f"{source.name}/{p.relative_to(source).as_posix()}") for p in found]
    if source.exists():
        return [(source, source.name)]
    raise DataError(f"corpus path {source} does not exist")


def _read_jsonl(path: Path, name: str, text: str) -> list[Document]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{number}: a JSONL record needs a string field 'text'")
        documents.append(Document(f"{name}:{number}", record["text"]))
    return documents


def read_corpus(sources: Sequence[str | Path] | None = None) -> Corpus:
    """Read a corpus: the default one when ``sources`` is empty or None.

    Unreadable and non-UTF-8 files are skipped with a warning that names them; files whose
    bytes equal an earlier file's are skipped silently (recorded in ``skipped``).

    Args:
        sources: files and directories, or None for the Python standard library.

    Returns:
        The corpus.

    Raises:
        DataError: a source does not exist, a JSONL line is malformed, or nothing readable
            is left.
    """
    if sources:
        description = ", ".join(str(s) for s in sources)
        files = [pair for s in sources for pair in _files_under(Path(s))]
    else:
        root = stdlib_root()
        description = f"the Python standard library at {root}"
        files = [(p, p.relative_to(root).as_posix()) for p in default_corpus_files()]

    skipped: dict[str, list[str]] = {}
    seen: set[bytes] = set()
    documents: list[Document] = []
    used_files = 0
    for path, name in files:
        try:
            raw = path.read_bytes()
        except OSError as err:
            skipped.setdefault("unreadable", []).append(f"{path} ({err.strerror})")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.setdefault("not UTF-8", []).append(str(path))
            continue
        content_hash = hashlib.sha256(raw).digest()
        if content_hash in seen:
            skipped.setdefault("duplicate", []).append(str(path))
            continue
        seen.add(content_hash)
        used_files += 1
        if path.suffix == ".jsonl":
            documents.extend(_read_jsonl(path, name, text))
        else:
            documents.append(Document(name, text))

    for reason in ("unreadable", "not UTF-8"):
        if reason in skipped:
            names = skipped[reason]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            warnings.warn(f"skipped {len(names)} {reason} corpus file(s): {shown}", stacklevel=2)

    documents = [d for d in documents if d.text]
    if not documents:
        raise DataError(f"the corpus is empty: no readable UTF-8 text in {description}")
    digest = hashlib.sha256()
    size = 0
    for doc in documents:
        data = doc.text.encode("utf-8")
        size += len(data)
        digest.update(doc.name.encode("utf-8") + b"\0" + data + b"\0")
    return Corpus(description, documents, used_files, size, digest.hexdigest(), skipped)


def chunk_text(text: str, max_bytes: int = CHUNK_BYTES) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_bytes`` UTF-8 bytes at line boundaries.

    A single line longer than ``max_bytes`` is cut at character boundaries. Joining the pieces
    gives back ``text``.
    """
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        data = line.encode("utf-8")
        if size + len(data) > max_bytes and current:
            chunks.append("".join(current))
            current, size = [], 0
        while len(data) > max_bytes:
            cut = max_bytes
            while data[cut] & 0xC0 == 0x80:  # do not split a multi-byte character
                cut -= 1
            chunks.append(data[:cut].decode("utf-8"))
            data = data[cut:]
        if data:
            current.append(data.decode("utf-8"))
            size += len(data)
    if current:
        chunks.append("".join(current))
    return chunks


def split_chunks(
    documents: Iterable[Document], val_fraction: float, chunk_bytes: int = CHUNK_BYTES
) -> tuple[list[str], list[str]]:
    """Chunk the documents, drop repeated chunks, and split train/validation by a stable hash.

    Args:
        documents: the corpus, in order.
        val_fraction: the share of chunks (by hash) that go to validation, in (0, 0.5].
        chunk_bytes: the largest chunk, in UTF-8 bytes.

    Returns:
        ``(train, validation)`` chunks, each in corpus order. Both are non-empty: if the hash
        sends no chunk to validation, the chunk with the smallest hash goes there (and if it
        sends them all, the one with the largest stays in train).

    Raises:
        ConfigError: ``val_fraction`` is out of range.
        DataError: the corpus has fewer than two distinct chunks.
    """
    if not 0 < val_fraction <= 0.5:
        raise ConfigError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    seen: set[str] = set()
    chunks: list[tuple[str, int]] = []
    for doc in documents:
        for chunk in chunk_text(doc.text, chunk_bytes):
            if chunk not in seen:
                seen.add(chunk)
                chunks.append((chunk, _native.xxh3_64(chunk.encode("utf-8"))))
    if len(chunks) < 2:
        raise DataError(
            f"the corpus has {len(chunks)} distinct chunk(s); a train and a validation split "
            "need at least two"
        )
    threshold = val_fraction * SPLIT_BUCKETS
    is_val = [h % SPLIT_BUCKETS < threshold for _, h in chunks]
    if not any(is_val):
        is_val[min(range(len(chunks)), key=lambda i: chunks[i][1])] = True
    if all(is_val):
        is_val[max(range(len(chunks)), key=lambda i: chunks[i][1])] = False
    train = [c for (c, _), v in zip(chunks, is_val, strict=True) if not v]
    validation = [c for (c, _), v in zip(chunks, is_val, strict=True) if v]
    return train, validation
