"""The corpus, the chunking and split, and `k2 data prepare` end to end."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from k2.cli import main
from k2.data import EOD_TOKEN, SPECIAL_TOKENS, PrepareOptions, TokenLoader, load_tokenizer, prepare
from k2.data.corpus import chunk_text, default_corpus_files, read_corpus, split_chunks
from k2.errors import ConfigError, DataError

from conftest import read_shard_reference

VOCAB = 400


def test_default_corpus_is_the_stdlib_without_packages_tests_or_build_files() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = default_corpus_files()
    relative = [p.relative_to(root).as_posix() for p in files]
    assert relative == sorted(relative)
    assert "json/__init__.py" in relative and "os.py" in relative
    for rel in relative:
        parts = rel.split("/")
        assert rel.endswith(".py")
        assert not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(
            parts[:-1]
        ), rel
        assert not parts[-1].startswith("_sysconfigdata_"), rel
    assert not any(rel.startswith("test/") for rel in relative)


def test_chunks_cut_at_line_boundaries_and_rejoin_to_the_text() -> None:
    text = "".join(f"line {i} ü\n" for i in range(500)) + "x" * 3000 + "é" * 1000
    chunks = chunk_text(text, max_bytes=1024)
    assert "".join(chunks) == text
    assert all(len(c.encode()) <= 1024 for c in chunks)
    first_long = next(i for i, c in enumerate(chunks) if c.startswith("x"))
    assert first_long > 0 and all(c.endswith("\n") for c in chunks[:first_long])
    assert "".join(chunks[first_long:]) == "x" * 3000 + "é" * 1000  # cut at character boundaries


def test_the_split_is_by_a_stable_hash_and_never_leaves_a_split_empty() -> None:
    docs = read_corpus([Path(__file__)]).documents
    train, val = split_chunks(docs, 0.3, chunk_bytes=1024)
    assert train and val and not set(train) & set(val)
    assert split_chunks(docs, 0.3, chunk_bytes=1024) == (train, val)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_chunks(docs, 0.9)


def test_unreadable_and_non_utf8_files_are_skipped_with_a_warning(
    small_corpus: Path, monkeypatch
) -> None:
    (small_corpus / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    locked = small_corpus / "locked.txt"
    locked.write_text("secret\n")
    # Permissions do not stop root, so the refusal is simulated for this one file.
    read_bytes = Path.read_bytes

    def refuse_locked(self: Path) -> bytes:
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse_locked)
    with pytest.warns(UserWarning) as record:
        corpus = read_corpus([small_corpus])
    messages = [str(w.message) for w in record]
    assert any("skipped 1 not UTF-8 corpus file(s)" in m and "latin1.txt" in m for m in messages)
    assert any("skipped 1 unreadable corpus file(s)" in m and "locked.txt" in m for m in messages)
    assert corpus.skipped["not UTF-8"] == [str(small_corpus / "latin1.txt")]
    assert not any("latin1" in d.name or "locked" in d.name for d in corpus.documents)


def test_an_empty_corpus_and_bad_jsonl_are_data_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(DataError, match="corpus is empty"):
        read_corpus([tmp_path / "empty"])
    with pytest.raises(DataError, match="does not exist"):
        read_corpus([tmp_path / "missing"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*'text'"):
        read_corpus([bad])
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_corpus([bad])


def test_prepare_writes_a_tokenizer_and_shards_that_decode_to_the_corpus(
    small_corpus, tmp_path
) -> None:
    out = tmp_path / "out"
    manifest = prepare(
        PrepareOptions(corpus=[small_corpus], out_dir=out, vocab_size=VOCAB, val_fraction=0.2)
    )
    tokenizer = load_tokenizer(out)
    assert tokenizer.get_vocab_size() == manifest["vocab_size"] <= VOCAB
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i
    eod = tokenizer.token_to_id(EOD_TOKEN)

    documents = read_corpus([small_corpus]).documents
    train, val = split_chunks(documents, 0.2)
    for split, chunks in (("train", train), ("validation", val)):
        entry = manifest["splits"][split]
        assert entry["documents"] == len(chunks)
        tokens, index = read_shard_reference(out / entry["shards"][0]["file"])
        decoded = []
        for start, end in zip(index[:-1], index[1:], strict=True):
            assert tokens[end - 1] == eod and eod not in tokens[start : end - 1]
            decoded.append(
                tokenizer.decode(tokens[start : end - 1].tolist(), skip_special_tokens=False)
            )
        assert decoded == chunks
    assert json.loads((out / "manifest.json").read_text()) == manifest

    loader = TokenLoader(out, seq_len=16, batch_size=2, split="validation")
    assert loader.token_count == manifest["splits"]["validation"]["tokens"]
    assert loader.vocab_size == manifest["vocab_size"]


def test_prepare_is_byte_for_byte_reproducible(small_corpus: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        prepare(
            PrepareOptions(
                corpus=[small_corpus], out_dir=tmp_path / name, vocab_size=VOCAB, val_fraction=0.2
            )
        )
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert {"manifest.json", "tokenizer.json", "tokenizer_config.json", "train-00000.k2tok"} <= set(
        files
    )
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_the_cli_prepares_data_and_reports_errors(small_corpus, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    code = main(
        [
            "data",
            "prepare",
            "--corpus",
            str(small_corpus),
            "--out",
            str(out),
            "--vocab-size",
            str(VOCAB),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "files" in printed and "sha256" in printed and "train:" in printed
    batch = TokenLoader(out, seq_len=16, batch_size=2).next_batch()
    assert batch.inputs.max() < VOCAB and np.all(batch.inputs[:, 1:] == batch.targets[:, :-1])

    (tmp_path / "nothing").mkdir()
    assert main(["data", "prepare", "--corpus", str(tmp_path / "nothing"), "--out", str(out)]) == 1
    assert "corpus is empty" in capsys.readouterr().err
