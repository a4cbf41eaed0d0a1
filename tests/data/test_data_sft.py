"""SFT data: the loss mask covers exactly the assistant's tokens (checked against a conversation
rendered by hand from the template in docs/chat-format.md), bad lines are skipped and counted,
conversations are packed whole into loader samples, and the mask travels through the shards
and ``TokenLoader`` (docs/sft.md, docs/token-shards.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from k2 import _native
from k2.data import SPECIAL_TOKENS, TokenLoader, load_tokenizer
from k2.data.loader import read_loss_mask, read_tokens
from k2.data.manifest import read_manifest
from k2.data.sft import (REASONS, assistant_segments, encode_conversation, pack, prepare_sft,
                         read_conversations)
from k2.data.tokenizer import save_tokenizer, train_tokenizer
from k2.errors import DataError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sft"
GOOD, BAD = FIXTURES / "chat_good.jsonl", FIXTURES / "chat_bad.jsonl"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE with K2's reserved tokens, trained on the fixtures' text."""
    out = tmp_path_factory.mktemp("tok")
    text = [GOOD.read_text(encoding="utf-8"), BAD.read_text(encoding="utf-8")] * 4
    save_tokenizer(train_tokenizer(text, 400), out)
    return out


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path):
    return load_tokenizer(tokenizer_dir)


def special(name: str) -> int:
    return SPECIAL_TOKENS.index(name)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}}}}]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "assistant", "content": "It is 18 C."},
]


def hand_rendered(tok) -> tuple[list[int], list[int]]:
    """MESSAGES written out piece by piece from the template, each piece with its mask: special
    tokens by id, text pieces tokenized alone (every cut is next to a special token)."""
    tools_json = json.dumps(TOOLS, ensure_ascii=False)
    pieces: list[tuple[str, int]] = [
        # the tool declarations: a system-side message named tool_declare
        ("<|im_system|>", 0), ("tool_declare", 0), ("<|im_middle|>", 0), (tools_json, 0),
        ("<|im_end|>", 0),
        ("<|im_system|>", 0), ("system", 0), ("<|im_middle|>", 0), ("Be brief.", 0), ("<|im_end|>", 0),
        ("<|im_user|>", 0), ("user", 0), ("<|im_middle|>", 0), ("Weather in Paris?", 0),
        ("<|im_end|>", 0),
        # the assistant's header is not trained; its text, tool calls and <|im_end|> are
        ("<|im_assistant|>", 0), ("assistant", 0), ("<|im_middle|>", 0),
        ("Checking.", 1), ("<|tool_calls_section_begin|>", 1), ("<|tool_call_begin|>", 1),
        ("functions.get_weather:0", 1), ("<|tool_call_argument_begin|>", 1),
        ('{"city": "Paris"}', 1), ("<|tool_call_end|>", 1), ("<|tool_calls_section_end|>", 1),
        ("<|im_end|>", 1),
        # the tool result: system side, named tool, its call id mapped to functions.NAME:N
        ("<|im_system|>", 0), ("tool", 0), ("<|im_middle|>", 0),
        ("## Return of functions.get_weather:0\n18 C", 0), ("<|im_end|>", 0),
        ("<|im_assistant|>", 0), ("assistant", 0), ("<|im_middle|>", 0),
        ("It is 18 C.", 1), ("<|im_end|>", 1),
        ("<|endoftext|>", 0),
    ]
    ids: list[int] = []
    mask: list[int] = []
    for text, m in pieces:
        piece = [special(text)] if text in SPECIAL_TOKENS else tok.encode(text, add_special_tokens=False).ids
        ids += piece
        mask += [m] * len(piece)
    return ids, mask


def test_the_mask_covers_exactly_the_assistant_spans(tok) -> None:
    ids, mask = encode_conversation(tok, MESSAGES, TOOLS)
    want_ids, want_mask = hand_rendered(tok)
    assert ids.tolist() == want_ids
    assert mask.tolist() == want_mask
    # The trained tokens decode to exactly what the assistant wrote, calls and <|im_end|> included.
    trained = tok.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m], skip_special_tokens=False)
    assert trained == ('Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
                       '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
                       '<|tool_calls_section_end|><|im_end|>It is 18 C.<|im_end|>')


def test_cutting_at_the_assistant_spans_tokenizes_like_the_whole_text(tok) -> None:
    from k2.data import render_chat

    for line in GOOD.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        text = render_chat(record["messages"], record.get("tools"))
        pieces = assistant_segments(text)
        assert "".join(t for t, _ in pieces) == text
        ids, _ = encode_conversation(tok, record["messages"], record.get("tools"))
        assert ids[:-1].tolist() == tok.encode(text, add_special_tokens=False).ids


def test_bad_lines_are_skipped_counted_and_named(tok) -> None:
    lines: list[str] = []
    kept, report, _ = read_conversations([GOOD, BAD], tok, seq_len=160, log=lines.append)
    bad = str(BAD)
    assert report.counts == {"invalid_json": 1, "unknown_role": 2, "dangling_tool_call_id": 1,
                             "invalid_arguments": 1, "no_assistant": 1, "reserved_token": 1,
                             "too_long": report.counts["too_long"]}
    assert report.first["unknown_role"] == [f"{bad}:3", f"{bad}:7"]
    assert report.first["dangling_tool_call_id"] == [f"{bad}:4"]
    assert report.first["invalid_arguments"] == [f"{bad}:5"]
    assert report.first["invalid_json"] == [f"{bad}:2"]
    assert f"{bad}:6" in report.first["too_long"]  # the long story
    assert len(kept) + report.total == 18
    assert all(len(c.ids) <= 160 for c in kept)
    assert any(REASONS["unknown_role"] in line and f"{bad}:3" in line for line in lines)


def test_over_long_conversations_are_dropped_and_counted(tok) -> None:
    lengths = [len(encode_conversation(tok, json.loads(line)["messages"],
                                       json.loads(line).get("tools"))[0])
               for line in GOOD.read_text(encoding="utf-8").splitlines()]
    limit = sorted(lengths)[3]
    kept, report, _ = read_conversations([GOOD], tok, seq_len=limit)
    assert report.counts == {"too_long": sum(n > limit for n in lengths)}
    assert len(kept) == sum(n <= limit for n in lengths)
    assert len(report.first["too_long"]) == min(5, report.counts["too_long"])


def test_nothing_valid_is_refused_naming_the_file_and_line(tok, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "x"}]}\n'
                    '{"messages": [{"role": "wizard", "content": "y"}, {"role": "assistant", "content": "z"}]}\n')
    with pytest.raises(DataError, match=rf"{path}:1: no assistant message") as err:
        read_conversations([path], tok, seq_len=512)
    assert "2 line(s) skipped" in str(err.value)


def test_packing_is_best_fit_and_whole() -> None:
    # Each conversation goes to the open block with the least room that still fits it.
    assert pack([6, 5, 4, 3, 2, 9, 1], 10) == [[0, 2], [1, 3, 4], [5, 6]]
    assert pack([10, 10], 10) == [[0], [1]]


def test_prepared_samples_hold_whole_conversations_and_their_mask(tok, tokenizer_dir: Path,
                                                                  tmp_path: Path) -> None:
    seq_len = 256
    out = tmp_path / "sft"
    prepared = prepare_sft([GOOD, BAD], out, tokenizer_dir, seq_len, val_fraction=0.0)
    assert not prepared.reused
    manifest = read_manifest(out)
    assert manifest.corpus["sft"]["seq_len"] == seq_len
    assert manifest.corpus["skipped"]["unknown_role"] == 2
    tokens, mask = read_tokens(out), read_loss_mask(out)
    assert len(tokens) == len(mask) and len(tokens) % seq_len == 1
    kept, _, _ = read_conversations([GOOD, BAD], tok, seq_len)
    # Every conversation's tokens and mask sit, whole, inside one block.
    blocks = [(tokens[i:i + seq_len], mask[i:i + seq_len]) for i in range(0, len(tokens) - 1, seq_len)]
    for c in kept:
        hits = [b for b, (t, m) in enumerate(blocks)
                for s in range(seq_len - len(c.ids) + 1)
                if t[s] == c.ids[0] and np.array_equal(t[s:s + len(c.ids)], c.ids)
                and np.array_equal(m[s:s + len(c.ids)], c.mask)]
        assert hits, c.source
    assert int(mask.sum()) == sum(int(c.mask.sum()) for c in kept)
    # Through the loader: one sample per block, the mask aligned with the targets, and no
    # sample's masked targets depend on another block.
    loader = TokenLoader(out, seq_len, 1, seed=0, threads=1)
    assert loader.has_loss_mask and loader.num_samples == len(blocks)
    seen = 0
    for _ in range(len(loader)):
        batch = loader.next_batch()
        (x,), (y,), (m,) = batch.inputs, batch.targets, batch.loss_mask
        start = next(i for i, (t, _) in enumerate(blocks) if np.array_equal(t, x))
        np.testing.assert_array_equal(m, mask[start * seq_len + 1:(start + 1) * seq_len + 1])
        np.testing.assert_array_equal(y, tokens[start * seq_len + 1:(start + 1) * seq_len + 1])
        assert m[-1] == 0  # the next block's first token is never a target
        seen += int(m.sum())
    assert seen == int(mask.sum())
    # Prepared once: the same inputs reuse the directory.
    assert prepare_sft([GOOD, BAD], out, tokenizer_dir, seq_len, val_fraction=0.0).reused


def test_old_shards_load_with_an_all_ones_mask(tmp_path: Path) -> None:
    path = tmp_path / "old.k2tok"
    writer = _native.ShardWriter(path, 300)
    writer.add_documents(np.arange(40, dtype=np.uint32), np.array([15, 25], np.int64))
    writer.finish()
    raw = path.read_bytes()
    assert int.from_bytes(raw[8:12], "little") == 1 and raw[20:24] == b"\0\0\0\0"  # version 1
    assert _native.inspect_shard(str(path))["loss_mask"] is False
    batch = TokenLoader([path], 8, 2, threads=1).next_batch()
    assert batch.loss_mask.dtype == np.int64 and (batch.loss_mask == 1).all()
    assert (read_loss_mask([path]) == 1).all()


def reference_mask(path: Path) -> np.ndarray:
    """The loss mask read by hand from the version-2 layout in docs/token-shards.md."""
    raw = path.read_bytes()
    version, token_bytes, _vocab, flags = np.frombuffer(raw[8:24], "<u4")
    tokens, docs, _ = np.frombuffer(raw[24:48], "<u8")
    assert version == 2 and flags & 1
    index_at = -(-(64 + int(tokens) * int(token_bytes)) // 8) * 8
    mask_at = index_at + 8 * (int(docs) + 1)
    assert len(raw) == mask_at + -(-int(tokens) // 8) * 8
    return np.frombuffer(raw, np.uint8, count=int(tokens), offset=mask_at)


def test_a_corrupt_mask_section_is_refused(tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    prepare_sft([GOOD], out, tokenizer_dir, 256, val_fraction=0.0)
    shard = out / "train-00000.k2tok"
    np.testing.assert_array_equal(reference_mask(shard), read_loss_mask(out))
    raw = bytearray(shard.read_bytes())
    mask_at = len(raw) - -(-read_manifest(out).splits["train"].tokens // 8) * 8
    raw[mask_at + 10] ^= 1  # one mask bit: the structure still holds, the checksum does not
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train-00000\.k2tok.*checksum mismatch"):
        TokenLoader(out, 256, 1)
    with pytest.raises(DataError, match="checksum mismatch"):
        read_loss_mask(out)


def test_a_mask_byte_other_than_0_or_1_is_refused_without_verification(tokenizer_dir: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "sft"
    prepare_sft([GOOD], out, tokenizer_dir, 256, val_fraction=0.0)
    shard = out / "train-00000.k2tok"
    raw = bytearray(shard.read_bytes())
    tokens = read_manifest(out).splits["train"].tokens
    raw[len(raw) - -(-tokens // 8) * 8 + 3] = 2
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="loss-mask byte 2 of token 3"):
        TokenLoader([shard], 256, 1, verify=False)


def test_a_directory_of_jsonl_and_missing_data(tokenizer_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "in"
    data.mkdir()
    shutil.copy(GOOD, data / "a.jsonl")
    prepared = prepare_sft([data], tmp_path / "out", tokenizer_dir, 1024, val_fraction=0.0)
    assert prepared.manifest.corpus["documents"] == 8
    with pytest.raises(DataError, match="does not exist"):
        prepare_sft([tmp_path / "nope.jsonl"], tmp_path / "o2", tokenizer_dir, 256)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl"):
        prepare_sft([tmp_path / "empty"], tmp_path / "o3", tokenizer_dir, 256)
