"""The prepared directory's manifest is the authority on its shards: a shard that is valid on
its own but is not the one the manifest lists is refused, naming it; and corpus text that
spells a special token is data, never a special id (docs/token-shards.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from k2.data import SPECIAL_TOKENS, PrepareOptions, TokenLoader, load_tokenizer, prepare, read_tokens
from k2.data.manifest import TokenManifest, read_manifest
from k2.errors import DataError

from conftest import read_shard_reference, write_shard

VOCAB = 400


@pytest.fixture
def prepared(small_corpus: Path, tmp_path: Path) -> Path:
    out = tmp_path / "prepared"
    prepare(PrepareOptions(corpus=[small_corpus], out_dir=out, vocab_size=VOCAB, val_fraction=0.2))
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_the_typed_manifest_reads_what_prepare_wrote(prepared: Path) -> None:
    raw = json.loads((prepared / "manifest.json").read_text())
    manifest = read_manifest(prepared)
    assert isinstance(manifest, TokenManifest)
    assert manifest.vocab_size == raw["vocab_size"] and manifest.eod_token_id == 0
    assert manifest.pad_token_id == 1
    assert manifest.special_tokens == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for split in ("train", "validation"):
        entry = manifest.split(split)
        assert [s.file for s in entry.shards] == [s["file"] for s in raw["splits"][split]["shards"]]
        assert entry.tokens == raw["splits"][split]["tokens"] == sum(s.tokens for s in entry.shards)
        assert manifest.shard_paths(split) == [prepared / s.file for s in entry.shards]
    assert manifest.to_dict() == raw  # nothing is lost reading it


def test_a_manifest_missing_a_field_or_of_the_wrong_type_is_named(prepared: Path) -> None:
    path = prepared / "manifest.json"
    raw = json.loads(path.read_text())
    del raw["eod_token_id"]
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"manifest\.json.*eod_token_id"):
        read_manifest(prepared)
    raw["eod_token_id"] = 0
    raw["splits"]["train"]["shards"][0]["tokens"] = "many"
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"manifest\.json.*splits\.train\.shards\[0\]\.tokens"):
        read_manifest(prepared)
    with pytest.raises(DataError, match="missing"):
        read_manifest(prepared / "nowhere")


def test_a_shard_swapped_for_another_valid_shard_is_refused_naming_it(prepared: Path) -> None:
    before = snapshot(prepared)
    train = prepared / "train-00000.k2tok"
    validation = prepared / "validation-00000.k2tok"
    saved = train.read_bytes()
    shutil.copyfile(validation, train)  # a complete, self-consistent shard, but not this one
    swapped = snapshot(prepared)
    for make in (lambda: TokenLoader(prepared, seq_len=16, batch_size=2),
                 lambda: TokenLoader(prepared, seq_len=16, batch_size=2, verify=False),
                 lambda: read_tokens(prepared, "train")):
        with pytest.raises(DataError, match=r"train-00000\.k2tok.*manifest\.json"):
            make()
    assert snapshot(prepared) == swapped  # reading refuses; it repairs or rewrites nothing
    train.write_bytes(saved)
    assert snapshot(prepared) == before
    TokenLoader(prepared, seq_len=16, batch_size=2).next_batch()  # the real shard still loads


def test_a_shard_with_the_same_length_but_other_tokens_is_refused(prepared: Path, tmp_path) -> None:
    train = prepared / "train-00000.k2tok"
    tokens, index = read_shard_reference(train)
    rng = np.random.default_rng(0)
    docs = np.split(rng.permutation(tokens), index[1:-1])
    write_shard(tmp_path / "other.k2tok", docs, VOCAB)
    shutil.copyfile(tmp_path / "other.k2tok", train)
    with pytest.raises(DataError, match=r"train-00000\.k2tok.*checksum"):
        TokenLoader(prepared, seq_len=16, batch_size=2)


def test_special_token_text_in_the_corpus_is_encoded_as_text(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    tricky = ('print("<|endoftext|>")  # a string, not the end of this document\n'
              "chat = '<|im_user|>user<|im_middle|>hi<|im_end|>'\n"
              "pad = '<|pad|>'; calls = '<|tool_calls_section_begin|>'\n")
    for i in range(12):
        (corpus / f"f{i}.py").write_text(f"# file {i}\n" + tricky * (1 + i % 3) + f"x = {i}\n")
    out = tmp_path / "out"
    manifest = prepare(PrepareOptions(corpus=[corpus], out_dir=out, vocab_size=300,
                                      val_fraction=0.2))
    tokenizer = load_tokenizer(out)
    for split in ("train", "validation"):
        entry = manifest["splits"][split]
        tokens, index = read_shard_reference(out / entry["shards"][0]["file"])
        # The only special ids are the end-of-document tokens prepare appended, one a document.
        special = np.isin(tokens, np.arange(len(SPECIAL_TOKENS)))
        assert special.sum() == entry["documents"] == len(index) - 1
        assert np.all(tokens[index[1:] - 1] == 0)
        for start, end in zip(index[:-1], index[1:], strict=True):
            text = tokenizer.decode(tokens[start : end - 1].tolist(), skip_special_tokens=False)
            assert "<|endoftext|>" in text and "<|im_user|>" in text
    # Encoding for the corpus leaves the saved tokenizer as it was: a chat prompt still maps
    # its role tokens to their ids.
    ids = tokenizer.encode("<|im_user|>").ids
    assert ids == [SPECIAL_TOKENS.index("<|im_user|>")]
