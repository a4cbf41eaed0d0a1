"""Token shards from Python: the documented layout, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xxhash

from k2 import _native
from k2.data import TokenLoader
from k2.errors import DataError, K2IOError

from conftest import read_shard_reference, write_shard


def test_the_native_writer_follows_the_documented_layout(tmp_path: Path) -> None:
    docs = [np.array([3, 1, 4]), np.array([1, 5, 9, 2, 6]), np.array([5])]
    path = tmp_path / "pi.k2tok"
    summary = write_shard(path, docs, vocab_size=10)
    tokens, index = read_shard_reference(path)
    np.testing.assert_array_equal(tokens, np.concatenate(docs))
    np.testing.assert_array_equal(index, [0, 3, 8, 9])
    raw = path.read_bytes()
    assert summary == {"tokens": 9, "documents": 3, "checksum": xxhash.xxh3_64_intdigest(raw[64:])}
    info = _native.inspect_shard(path)
    assert (info["version"], info["token_bytes"], info["vocab_size"]) == (1, 2, 10)


def test_the_writer_refuses_tokens_outside_the_vocabulary(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="token id 10 at position 1 of document 1"):
        write_shard(tmp_path / "oov.k2tok", [np.array([1]), np.array([2, 10])], vocab_size=10)
    assert not (tmp_path / "oov.k2tok").exists()


def corrupt(tmp_path: Path, edit) -> Path:
    path = tmp_path / "bad.k2tok"
    write_shard(path, [np.arange(100) % 50, np.arange(37) % 50], vocab_size=50)
    raw = bytearray(path.read_bytes())
    edit(raw)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda b: b.__setitem__(slice(0, 8), b"NOTK2TOK"), "wrong magic"),
        (lambda b: b.__setitem__(8, 3), "format version 3 is newer"),
        (lambda b: b.__delitem__(slice(-20, None)), "truncated"),
        (lambda b: b.__delitem__(slice(30, None)), "truncated"),
        (lambda b: b.__setitem__(100, b[100] ^ 0xFF), "checksum mismatch"),
    ],
    ids=["magic", "newer-version", "truncated", "truncated-header", "checksum"],
)
def test_a_bad_shard_is_refused_with_a_message_naming_it(tmp_path: Path, edit, reason) -> None:
    path = corrupt(tmp_path, edit)
    with pytest.raises(DataError, match=reason) as info:
        TokenLoader(path, 4, 2)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match=reason):
        _native.inspect_shard(path)


def test_a_missing_shard_is_an_io_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(K2IOError, match="nope.k2tok"):
        TokenLoader(tmp_path / "nope.k2tok", 4, 2)


def test_a_directory_without_a_manifest_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="k2 data prepare"):
        TokenLoader(tmp_path, 4, 2)


def test_a_manifest_of_another_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(DataError, match="not a version-1 k2-token-shards manifest"):
        TokenLoader(tmp_path, 4, 2)
