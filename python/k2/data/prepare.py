"""``k2 data prepare``: corpus -> tokenizer -> token shards + manifest.

The output directory holds::

    tokenizer.json, tokenizer_config.json   the tokenizer and its chat template
    train-00000.k2tok, ...                  token shards (docs/token-shards.md)
    validation-00000.k2tok, ...
    manifest.json                           what is where, and how it was made

Every chunk of the corpus becomes one document in a shard, followed by the end-of-document
token. Tokenization runs in parallel inside ``tokenizers`` (Rust threads); shards are written by
k2's native writer. The same inputs and options give byte-identical outputs: nothing in them
depends on time, thread scheduling or the machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from k2 import _native
from k2.data.corpus import CHUNK_BYTES, Corpus, read_corpus, split_chunks
from k2.data.manifest import FORMAT, MANIFEST, SPLITS, ShardEntry, SplitEntry, TokenManifest
from k2.data.tokenizer import EOD_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, save_tokenizer, train_tokenizer
from k2.errors import ConfigError, K2IOError

SHARD_TOKENS = 1 << 28
"""A shard is closed once it holds at least this many tokens (512 MiB of u16)."""
ENCODE_BATCH = 256
"""Chunks tokenized per call into ``tokenizers`` (and per progress-bar update)."""


@dataclass(frozen=True)
class PrepareOptions:
    """What ``k2 data prepare`` does.

    Attributes:
        corpus: files and directories; empty for the Python standard library.
        out_dir: where the tokenizer, shards and manifest go.
        vocab_size: the tokenizer's target vocabulary (the ``tiny`` model preset's is 8192).
        val_fraction: share of chunks held out for validation.
        chunk_bytes: the largest chunk, in UTF-8 bytes.
    """

    corpus: Sequence[str | Path] = ()
    out_dir: Path = Path("data")
    vocab_size: int = 8192
    val_fraction: float = 0.02
    chunk_bytes: int = CHUNK_BYTES


def _write_split(
    split: str, chunks: list[str], tokenizer, out_dir: Path, vocab_size: int, progress
) -> SplitEntry:
    """Tokenize one split's chunks into shards; return its manifest entry.

    The chunks are encoded as raw text: a special token's spelling inside them (a Python file
    that prints ``"<|endoftext|>"``, a chat transcript) becomes ordinary tokens, never the
    special id, so the only end-of-document ids in a shard are the ones appended here.
    """
    eod = tokenizer.token_to_id(EOD_TOKEN)
    shards: list[ShardEntry] = []
    writer = None

    def close() -> None:
        summary = writer.finish()
        shards.append(
            ShardEntry(
                file=path.name,
                tokens=summary["tokens"],
                documents=summary["documents"],
                checksum=f"{summary['checksum']:016x}",
            )
        )

    shard_tokens = 0
    for start in range(0, len(chunks), ENCODE_BATCH):
        batch = chunks[start : start + ENCODE_BATCH]
        encodings = _encode_raw(tokenizer, batch)
        lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(batch))
        tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
        ends = np.cumsum(lengths)
        for e, end, n in zip(encodings, ends, lengths, strict=True):
            tokens[end - n : end - 1] = e.ids
            tokens[end - 1] = eod
        if writer is None or shard_tokens >= SHARD_TOKENS:
            if writer is not None:
                close()
            path = out_dir / f"{split}-{len(shards):05d}.k2tok"
            writer = _native.ShardWriter(path, vocab_size)
            shard_tokens = 0
        writer.add_documents(tokens, lengths)
        shard_tokens += len(tokens)
        progress(sum(len(c) for c in batch))
    close()
    return SplitEntry(
        shards=tuple(shards),
        tokens=sum(s.tokens for s in shards),
        documents=sum(s.documents for s in shards),
        chunks=len(chunks),
    )


def _encode_raw(tokenizer, texts: list[str]) -> list:
    """Encode ``texts`` with special tokens matched as plain text (``encode_special_tokens``),
    restoring the tokenizer's setting afterwards (it is not saved in ``tokenizer.json``)."""
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        return tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = previous


def prepare(
    options: PrepareOptions,
    log: Callable[[str], None] = lambda _: None,
    show_progress: bool = False,
) -> dict:
    """Build a prepared data directory.

    Args:
        options: what to read and where to write.
        log: receives one line per stage (corpus statistics, split sizes, results).
        show_progress: draw a progress bar while tokenizing.

    Returns:
        The manifest that was written to ``OUT_DIR/manifest.json``, as its JSON object
        (:func:`k2.data.manifest.read_manifest` reads it back typed).

    Raises:
        DataError: the corpus is missing, malformed or empty.
        ConfigError: an option is out of range.
        K2IOError: the output directory cannot be written.
    """
    if options.chunk_bytes < 1024:
        raise ConfigError(f"chunk_bytes must be at least 1024, got {options.chunk_bytes}")
    out_dir = Path(options.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise K2IOError(f"cannot create the output directory {out_dir}: {err.strerror}") from err

    started = time.perf_counter()
    corpus: Corpus = read_corpus(list(options.corpus) or None)
    log(
        f"corpus: {corpus.description}: {corpus.files} files, {len(corpus.documents)} documents, "
        f"{corpus.size_bytes / 1e6:.2f} MB, sha256 {corpus.digest[:16]}"
    )
    train, validation = split_chunks(corpus.documents, options.val_fraction, options.chunk_bytes)
    log(
        f"chunks: {len(train)} train, {len(validation)} validation "
        f"(<= {options.chunk_bytes} bytes each)"
    )

    tokenizer = train_tokenizer(train, options.vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    save_tokenizer(tokenizer, out_dir)
    log(
        f"tokenizer: byte-level BPE, {vocab_size} tokens ({len(SPECIAL_TOKENS)} special) "
        f"-> {out_dir / 'tokenizer.json'}"
    )

    from tqdm import tqdm

    for stale in sorted(out_dir.glob("*.k2tok")):  # shards of an earlier run are replaced
        if stale.name.split("-")[0] in SPLITS:
            stale.unlink()
    total_chars = sum(map(len, train)) + sum(map(len, validation))
    bar = tqdm(
        total=total_chars, unit="char", unit_scale=True, desc="tokenize", disable=not show_progress
    )
    splits = {}
    with bar:
        for name, chunks in zip(SPLITS, (train, validation), strict=True):
            splits[name] = _write_split(name, chunks, tokenizer, out_dir, vocab_size, bar.update)

    manifest = TokenManifest(
        vocab_size=vocab_size,
        requested_vocab_size=options.vocab_size,
        special_tokens={token: i for i, token in enumerate(SPECIAL_TOKENS)},
        eod_token_id=tokenizer.token_to_id(EOD_TOKEN),
        pad_token_id=tokenizer.token_to_id(PAD_TOKEN),
        corpus={
            "description": corpus.description,
            "files": corpus.files,
            "documents": len(corpus.documents),
            "bytes": corpus.size_bytes,
            "sha256": corpus.digest,
            "skipped": {reason: len(names) for reason, names in corpus.skipped.items()},
        },
        chunk_bytes=options.chunk_bytes,
        val_fraction=options.val_fraction,
        splits=splits,
        directory=out_dir,
    )
    manifest.write(out_dir)
    for name in SPLITS:
        s = splits[name]
        log(f"{name}: {s.tokens:,} tokens in {s.documents:,} documents, {len(s.shards)} shard(s)")
    log(f"done in {time.perf_counter() - started:.1f} s -> {out_dir / MANIFEST}")
    return manifest.to_dict()
