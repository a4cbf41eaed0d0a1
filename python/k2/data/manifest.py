"""``manifest.json`` of a prepared data directory, as typed objects: the one reader of it.

``k2 data prepare`` builds a :class:`TokenManifest` and writes :meth:`TokenManifest.to_dict`;
everything else (the loader, the training loop, the baselines) reads it with
:func:`read_manifest`, which checks every field's presence and type and names the one at fault.

The manifest is also the authority on the shards: each listed shard's header must carry the
token count, document count and checksum the manifest recorded (:meth:`ShardEntry.check`), so a
shard replaced by another one (valid on its own, say from another split or another run) is
refused, naming it. The header layout is in docs/token-shards.md.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from k2.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "k2-token-shards"
VERSION = 1
SPLITS = ("train", "validation")
SHARD_MAGIC = b"K2TOKENS"
_HEADER = struct.Struct("<8sIIII QQQ")  # magic, version, token_bytes, vocab_size, flags, T, D, checksum


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it: file name (relative to the directory), tokens,
    documents and the XXH3-64 checksum of its body as 16 hex digits."""

    file: str
    tokens: int
    documents: int
    checksum: str

    def check(self, path: Path, manifest_path: Path) -> None:
        """Refuse ``path`` if its header disagrees with this entry.

        Only the 64-byte header is read: the loader verifies the body against the header's
        checksum, so header == manifest makes the body the one the manifest recorded. A file
        too short or without the magic is left to the shard reader, which names the defect.

        Raises:
            DataError: naming the shard, the manifest and the field that differs.
        """
        try:
            with path.open("rb") as f:
                head = f.read(_HEADER.size)
        except OSError:
            return  # missing or unreadable: the shard reader reports it, naming the file
        if len(head) < _HEADER.size or head[:8] != SHARD_MAGIC:
            return
        _, _, _, _, _, tokens, documents, checksum = _HEADER.unpack(head)
        found = {"tokens": tokens, "documents": documents, "checksum": f"{checksum:016x}"}
        expected = {"tokens": self.tokens, "documents": self.documents, "checksum": self.checksum.lower()}
        wrong = [f"{k} {found[k]} (manifest: {expected[k]})" for k in found if found[k] != expected[k]]
        if wrong:
            raise DataError(
                f"shard {path} is not the one {manifest_path} lists: {', '.join(wrong)}; it was "
                "replaced or rewritten after `k2 data prepare` (prepare the directory again)"
            )


@dataclass(frozen=True)
class SplitEntry:
    """One split: its shards in stream order and their totals."""

    shards: tuple[ShardEntry, ...]
    tokens: int
    documents: int
    chunks: int


@dataclass(frozen=True)
class TokenManifest:
    """Everything ``manifest.json`` records (docs/token-shards.md lists the fields).

    Attributes:
        directory: the prepared directory it was read from (not written to the file).
    """

    vocab_size: int
    requested_vocab_size: int
    special_tokens: dict[str, int]
    eod_token_id: int
    pad_token_id: int
    corpus: dict[str, Any]
    chunk_bytes: int
    val_fraction: float
    splits: dict[str, SplitEntry]
    tokenizer: str = "tokenizer.json"
    format: str = FORMAT
    version: int = VERSION
    directory: Path | None = field(default=None, compare=False)

    def split(self, name: str) -> SplitEntry:
        """The entry of split ``name``.

        Raises:
            DataError: the manifest has no such split.
        """
        try:
            return self.splits[name]
        except KeyError:
            raise DataError(f"{self._path()} lists no split {name!r} (it has "
                            f"{', '.join(self.splits) or 'none'})") from None

    def shard_paths(self, split: str) -> list[Path]:
        """The shard files of ``split``, in stream order."""
        base = self.directory or Path(".")
        return [base / s.file for s in self.split(split).shards]

    def check_shards(self, split: str) -> None:
        """Refuse any shard of ``split`` whose header disagrees with the manifest."""
        for shard, path in zip(self.split(split).shards, self.shard_paths(split), strict=True):
            shard.check(path, self._path())

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``manifest.json`` holds (key order as ``k2 data prepare`` writes it)."""
        return {
            "format": self.format,
            "version": self.version,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
            "requested_vocab_size": self.requested_vocab_size,
            "special_tokens": dict(self.special_tokens),
            "eod_token_id": self.eod_token_id,
            "pad_token_id": self.pad_token_id,
            "corpus": self.corpus,
            "chunk_bytes": self.chunk_bytes,
            "val_fraction": self.val_fraction,
            "splits": {
                name: {
                    "shards": [asdict(s) for s in entry.shards],
                    "tokens": entry.tokens,
                    "documents": entry.documents,
                    "chunks": entry.chunks,
                }
                for name, entry in self.splits.items()
            },
        }

    def write(self, directory: Path) -> None:
        """Write ``directory/manifest.json`` atomically (a partial file, then a rename)."""
        partial = directory / (MANIFEST + ".partial")
        partial.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
        partial.replace(directory / MANIFEST)

    def _path(self) -> Path:
        return (self.directory or Path(".")) / MANIFEST


def read_manifest(directory: str | PathLike[str]) -> TokenManifest:
    """Read and check ``directory/manifest.json``.

    Raises:
        DataError: the file is missing, not JSON, of another format or version, or a field is
            missing or of the wrong type (named as a path such as ``splits.train.shards[0].tokens``).
    """
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{directory} is not a prepared data directory: {path} is missing "
                        "(run `k2 data prepare`)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path} cannot be read as JSON: {err}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("version") != VERSION:
        got = raw if not isinstance(raw, dict) else (raw.get("format"), raw.get("version"))
        raise DataError(f"{path} is not a version-{VERSION} {FORMAT} manifest (format, version: {got!r})")
    r = _Fields(raw, path)
    splits = {}
    for name, entry in r.get("splits", dict).items():
        s = r.sub(entry, f"splits.{name}")
        shards = tuple(
            ShardEntry(file=sh.get("file", str), tokens=sh.get("tokens", int),
                       documents=sh.get("documents", int), checksum=sh.get("checksum", str))
            for sh in (s.sub(x, f"splits.{name}.shards[{i}]")
                       for i, x in enumerate(s.get("shards", list)))
        )
        splits[name] = SplitEntry(shards, s.get("tokens", int), s.get("documents", int),
                                  s.get("chunks", int))
    return TokenManifest(
        vocab_size=r.get("vocab_size", int),
        requested_vocab_size=r.get("requested_vocab_size", int),
        special_tokens=r.get("special_tokens", dict),
        eod_token_id=r.get("eod_token_id", int),
        pad_token_id=r.get("pad_token_id", int),
        corpus=r.get("corpus", dict),
        chunk_bytes=r.get("chunk_bytes", int),
        val_fraction=r.get("val_fraction", float),
        splits=splits,
        tokenizer=r.get("tokenizer", str),
        directory=directory,
    )


class _Fields:
    """Typed access to one JSON object of the manifest, naming fields by their path."""

    def __init__(self, obj: Any, path: Path, prefix: str = "") -> None:
        self.path, self.prefix = path, prefix
        if not isinstance(obj, dict):
            raise DataError(f"{path}: {prefix or 'the manifest'} must be an object, got {obj!r}")
        self.obj = obj

    def get(self, key: str, kind: type) -> Any:
        name = f"{self.prefix}.{key}" if self.prefix else key
        if key not in self.obj:
            raise DataError(f"{self.path}: field {name} is missing")
        value = self.obj[key]
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float \
            else isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise DataError(f"{self.path}: field {name} must be {kind.__name__}, got {value!r}")
        return value

    def sub(self, obj: Any, prefix: str) -> _Fields:
        return _Fields(obj, self.path, prefix)
