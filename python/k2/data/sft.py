"""SFT data: OpenAI-format chat JSONL -> checked conversations -> tokens + loss mask -> shards.

Each line of a chat JSONL file is one conversation ``{"messages": [...], "tools": [...], ...}``
(OpenAI's chat layout; extra keys such as a domain or a grade are ignored). A conversation is
checked (:func:`check_conversation`), rendered with K2's chat template and tokenized with a
loss mask that is 1 exactly on what the assistant writes: its text, its tool-call section and
its closing ``<|im_end|>`` (:func:`encode_conversation`). System, user and tool messages and
every message header (``<|im_assistant|>assistant<|im_middle|>`` included) get 0.

Lines that cannot be trained on are skipped and counted by reason, with the first few line
numbers kept for the report: not JSON, unknown roles, dangling ``tool_call_id``s, tool-call
arguments that are not a JSON object, conversations longer than the sequence length (SFT samples
hold whole conversations), and a few more (:data:`REASONS`). If no line of the input survives,
:func:`prepare_sft` refuses it, naming the file, the first bad line and why.

The kept conversations are packed whole into blocks of exactly ``seq_len`` tokens (best fit,
padding with ``<|pad|>`` under a zero mask), so each block is one loader sample and no
conversation is ever cut between two samples. The layout of the prepared directory and why the
packing lines up with :class:`k2.data.TokenLoader`'s samples are in docs/sft.md; the shard
format with its loss-mask section is in docs/token-shards.md.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from k2.data.chat import render_chat
from k2.data.tokenizer import EOD_TOKEN, PAD_TOKEN, SPECIAL_TOKENS
from k2.errors import DataError, K2IOError

ROLES = ("system", "user", "assistant", "tool")
REASONS = {
    "invalid_json": "not a JSON object",
    "no_messages": "no `messages` list, or an empty one",
    "unknown_role": "a message with an unknown role",
    "bad_content": "a message whose content is not text",
    "bad_tool_call": "a malformed tool call (no function name)",
    "invalid_arguments": "tool-call arguments that are not a JSON object",
    "dangling_tool_call_id": "a tool result whose tool_call_id names no earlier call",
    "bad_tools": "malformed tool declarations",
    "reserved_token": "text that spells a reserved token",
    "no_assistant": "no assistant message to train on",
    "too_long": "longer than the sequence length",
}
"""Why a line is skipped: reason -> description."""
FIRST_LINES = 5
"""Line numbers kept per skip reason for the report."""
SFT_KIND = "sft-chat"


class ConversationError(ValueError):
    """Why one conversation cannot be used: ``reason`` (a key of :data:`REASONS`) and details."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{REASONS[reason]}: {detail}")
        self.reason = reason
        self.detail = detail


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise ConversationError("bad_content", f"{where}: a content part is not a typed object")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise ConversationError("bad_content", f"{where}: a text part has no string text")
                parts.append(part["text"])
        return "".join(parts)
    raise ConversationError("bad_content", f"{where}: content is {type(content).__name__}")


def _no_reserved(text: str, where: str) -> None:
    for token in SPECIAL_TOKENS:
        if token in text:
            raise ConversationError("reserved_token", f"{where} contains {token}")


def check_conversation(record: Any) -> tuple[list[dict], list[dict] | None]:
    """Check one parsed JSONL record; return its ``(messages, tools)``.

    Raises:
        ConversationError: the first problem found, with its reason.
    """
    if not isinstance(record, dict):
        raise ConversationError("invalid_json", f"a {type(record).__name__}, not an object")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ConversationError("no_messages", "`messages` is missing, empty or not a list")
    tools = record.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance((t.get("function") or t).get("name"), str) for t in tools
        ):
            raise ConversationError("bad_tools", "`tools` must be a list of function specs with names")
        _no_reserved(json.dumps(tools, ensure_ascii=False), "`tools`")
    call_ids: set[str] = set()
    counter = 0
    assistant = False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ConversationError("unknown_role", f"{where} is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise ConversationError("unknown_role", f"{where} has role {role!r}")
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise ConversationError("bad_content", f"{where}.name is not a string")
            _no_reserved(name, f"{where}.name")
        _no_reserved(_text(message.get("content"), where), f"{where}.content")
        if role == "assistant":
            assistant = True
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ConversationError("bad_tool_call", f"{where}.tool_calls is not a list")
            for j, call in enumerate(calls):
                cwhere = f"{where}.tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, dict) else None
                fn = fn if isinstance(fn, dict) else call if isinstance(call, dict) else None
                if fn is None or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise ConversationError("bad_tool_call", f"{cwhere} has no function name")
                _no_reserved(fn["name"], f"{cwhere}.function.name")
                arguments = fn.get("arguments")
                if isinstance(arguments, str):
                    try:
                        parsed = json.loads(arguments)
                    except ValueError as err:
                        raise ConversationError("invalid_arguments", f"{cwhere}: {err}") from None
                    _no_reserved(arguments, f"{cwhere}.function.arguments")
                else:
                    parsed = arguments
                    _no_reserved(json.dumps(arguments, ensure_ascii=False), f"{cwhere}.function.arguments")
                if not isinstance(parsed, dict):
                    raise ConversationError("invalid_arguments",
                                            f"{cwhere}: arguments are {type(parsed).__name__}, not an object")
                if isinstance(call.get("id"), str):
                    call_ids.add(call["id"])
                call_ids.add(f"functions.{fn['name']}:{counter}")
                counter += 1
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in call_ids:
                raise ConversationError("dangling_tool_call_id",
                                        f"{where}.tool_call_id {call_id!r} names no earlier tool call")
    if not assistant:
        raise ConversationError("no_assistant", "no message has role assistant")
    return messages, tools


def assistant_segments(text: str) -> list[tuple[str, bool]]:
    """Cut a rendered conversation into ``(text, trained)`` pieces: trained pieces run from just
    after an assistant header's ``<|im_middle|>`` through that message's ``<|im_end|>``.

    Unambiguous because checked conversations never spell a reserved token in their text.
    Every cut falls next to a reserved token, which the tokenizer always splits off, so the
    pieces tokenize to exactly the tokens of the whole text.
    """
    head, middle, end = "<|im_assistant|>", "<|im_middle|>", "<|im_end|>"
    pieces: list[tuple[str, bool]] = []
    at = 0
    while True:
        start = text.find(head, at)
        if start < 0:
            break
        body = text.index(middle, start) + len(middle)
        stop = text.index(end, body) + len(end)
        pieces += [(text[at:body], False), (text[body:stop], True)]
        at = stop
    pieces.append((text[at:], False))
    return [(t, trained) for t, trained in pieces if t]


def encode_conversation(tokenizer, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and loss mask of one (checked) conversation, ending with ``<|endoftext|>`` (mask 0).

    Returns:
        ``(ids uint32, mask uint8)`` of equal length.
    """
    pieces = assistant_segments(render_chat(messages, tools))
    encodings = tokenizer.encode_batch_fast([t for t, _ in pieces], add_special_tokens=False)
    ids = [i for e in encodings for i in e.ids] + [tokenizer.token_to_id(EOD_TOKEN)]
    mask = [int(trained) for e, (_, trained) in zip(encodings, pieces, strict=True)
            for _ in e.ids] + [0]
    return np.asarray(ids, np.uint32), np.asarray(mask, np.uint8)


@dataclass
class SkipReport:
    """Lines skipped per reason, with their first few line numbers (``file:line``)."""

    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, list[str]] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        lines = self.first.setdefault(reason, [])
        if len(lines) < FIRST_LINES:
            lines.append(where)
        self.details.setdefault(reason, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        """One human-readable line per reason."""
        return [f"skipped {n} conversation(s): {REASONS[r]} (first: {', '.join(self.first[r])}; "
                f"e.g. {self.details[r]})" for r, n in sorted(self.counts.items())]


@dataclass
class Conversation:
    """One kept conversation: where it came from, its tokens and loss mask."""

    source: str
    ids: np.ndarray
    mask: np.ndarray


def chat_files(paths: Iterable[str | Path]) -> list[Path]:
    """The JSONL files named: files as given, directories' ``*.jsonl`` (recursively), sorted.

    Raises:
        DataError: a path does not exist, or a directory holds no ``.jsonl`` file.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(x for x in p.rglob("*.jsonl") if x.is_file())
            if not found:
                raise DataError(f"{p} holds no .jsonl chat file")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"SFT data {p} does not exist")
    if not files:
        raise DataError("no SFT data given (--data FILE.jsonl or DIR)")
    return files


def read_conversations(files: Sequence[Path], tokenizer, seq_len: int,
                       log: Callable[[str], None] = lambda _: None
                       ) -> tuple[list[Conversation], SkipReport, str]:
    """Check, render and encode every line of ``files``.

    Returns:
        The kept conversations in file order, the skip report and the SHA-256 of the inputs.

    Raises:
        DataError: a file cannot be read, or no line of any file can be trained on (naming the
            first bad line and why).
    """
    kept: list[Conversation] = []
    report = SkipReport()
    digest = hashlib.sha256()
    first_bad: tuple[str, str] | None = None
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise K2IOError(f"cannot read SFT data {path}: {err.strerror}") from err
        digest.update(str(len(raw)).encode() + b"\0" + raw)
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise ConversationError("invalid_json", str(err)) from None
                messages, tools = check_conversation(record)
                ids, mask = encode_conversation(tokenizer, messages, tools)
                if len(ids) > seq_len:
                    raise ConversationError("too_long", f"{len(ids)} tokens > seq_len {seq_len}")
            except ConversationError as err:
                report.add(err.reason, where, err.detail)
                first_bad = first_bad or (where, str(err))
                continue
            kept.append(Conversation(where, ids, mask))
    for line in report.lines():
        log(line)
    if not kept:
        where, why = first_bad or (str(files[0]), "no conversations")
        raise DataError(f"no usable conversation in {', '.join(map(str, files))}: {where}: {why}"
                        + (f" ({report.total} line(s) skipped)" if report.total else ""))
    return kept, report, digest.hexdigest()


def pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Best-fit packing: indices of conversations per block of ``seq_len`` tokens, each block's
    conversations in input order. Deterministic; every length must be at most ``seq_len``."""
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, block), sorted
    for i, n in enumerate(lengths):
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = seq_len, len(blocks)
            blocks.append([])
        blocks[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return blocks


def _write_split(name: str, conversations: list[Conversation], seq_len: int, tokenizer,
                 out_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Pack ``conversations`` into one shard of ``seq_len``-token blocks, plus one final pad token
    so the last block is a whole sample; return the shard's manifest fields."""
    from k2 import _native

    pad = tokenizer.token_to_id(PAD_TOKEN)
    blocks = pack([len(c.ids) for c in conversations], seq_len)
    tokens, masks, lengths = [], [], []
    for block in blocks:
        used = 0
        for i in block:
            tokens.append(conversations[i].ids)
            masks.append(conversations[i].mask)
            lengths.append(len(conversations[i].ids))
            used += len(conversations[i].ids)
        if used < seq_len:  # the rest of the block: one padding document, never trained on
            tokens.append(np.full(seq_len - used, pad, np.uint32))
            masks.append(np.zeros(seq_len - used, np.uint8))
            lengths.append(seq_len - used)
    tokens.append(np.full(1, pad, np.uint32))
    masks.append(np.zeros(1, np.uint8))
    lengths.append(1)
    path = out_dir / f"{name}-00000.k2tok"
    writer = _native.ShardWriter(path, vocab_size, loss_mask=True)
    writer.add_documents(np.concatenate(tokens), np.asarray(lengths, np.int64), np.concatenate(masks))
    summary = writer.finish()
    trained = int(sum(int(c.mask.sum()) for c in conversations))
    return {"file": path.name, "tokens": summary["tokens"], "documents": summary["documents"],
            "checksum": f"{summary['checksum']:016x}", "blocks": len(blocks),
            "conversations": len(conversations), "trained_tokens": trained,
            "conversation_tokens": int(sum(len(c.ids) for c in conversations))}


@dataclass(frozen=True)
class SFTPrepared:
    """What :func:`prepare_sft` made (or found already made)."""

    out_dir: Path
    manifest: Any
    skipped: SkipReport
    reused: bool


def _is_validation(conversation: Conversation, val_fraction: float) -> bool:
    """Held out by a hash of the conversation's tokens: stable whatever the file order."""
    h = int.from_bytes(hashlib.blake2b(conversation.ids.tobytes(), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


def prepare_sft(data: Sequence[str | Path], out_dir: str | Path, tokenizer_dir: str | Path,
                seq_len: int, val_fraction: float = 0.05,
                log: Callable[[str], None] = lambda _: None) -> SFTPrepared:
    """Prepare chat JSONL for ``k2 sft``: shards with loss masks, the tokenizer and a manifest.

    A directory already prepared from the same inputs, tokenizer and ``seq_len`` is reused as is.

    Args:
        data: JSONL files or directories of them.
        out_dir: the prepared directory to write.
        tokenizer_dir: holds ``tokenizer.json`` and ``tokenizer_config.json`` (the model's).
        seq_len: tokens per sample; longer conversations are skipped.
        val_fraction: share of conversations held out for validation.

    Raises:
        DataError: the inputs or the tokenizer are missing, or nothing can be trained on.
    """
    from k2.data.manifest import MANIFEST, ShardEntry, SplitEntry, TokenManifest, read_manifest
    from k2.data.tokenizer import load_tokenizer

    out_dir = Path(out_dir)
    files = chat_files(data)
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab_size = tokenizer.get_vocab_size()
    tok_digest = hashlib.sha256(Path(tokenizer_dir, "tokenizer.json").read_bytes()).hexdigest()
    sources = hashlib.sha256()
    for f in files:
        sources.update(str(f.stat().st_size).encode() + b"\0" + f.read_bytes())
    key = {"kind": SFT_KIND, "seq_len": seq_len, "val_fraction": val_fraction,
           "inputs_sha256": sources.hexdigest(), "tokenizer_sha256": tok_digest}
    if (out_dir / MANIFEST).is_file():
        try:
            old = read_manifest(out_dir)
        except DataError:
            old = None
        if old is not None and all(old.corpus.get("sft", {}).get(k) == v for k, v in key.items()):
            old_skips = SkipReport(**{k: old.corpus["sft"].get(k, {}) for k in ("counts", "first", "details")})
            log(f"SFT data: reusing {out_dir} (prepared from the same inputs)")
            return SFTPrepared(out_dir, old, old_skips, reused=True)

    kept, report, _ = read_conversations(files, tokenizer, seq_len, log)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise K2IOError(f"cannot create {out_dir}: {err.strerror}") from err
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if Path(tokenizer_dir, name).is_file() and Path(tokenizer_dir).resolve() != out_dir.resolve():
            shutil.copyfile(Path(tokenizer_dir, name), out_dir / name)
    val = [c for c in kept if _is_validation(c, val_fraction)]
    train = [c for c in kept if not _is_validation(c, val_fraction)]
    if not train:  # a tiny input: train on everything rather than on nothing
        train, val = kept, []
    splits, stats = {}, {}
    for name, part in (("train", train), ("validation", val)):
        if not part:
            splits[name] = SplitEntry((), 0, 0, 0)
            continue
        s = _write_split(name, part, seq_len, tokenizer, out_dir, vocab_size)
        stats[name] = {k: s[k] for k in ("blocks", "conversations", "trained_tokens", "conversation_tokens")}
        splits[name] = SplitEntry((ShardEntry(s["file"], s["tokens"], s["documents"], s["checksum"]),),
                                  s["tokens"], s["documents"], s["conversations"])
    manifest = TokenManifest(
        vocab_size=vocab_size, requested_vocab_size=vocab_size,
        special_tokens={t: i for i, t in enumerate(SPECIAL_TOKENS)},
        eod_token_id=tokenizer.token_to_id(EOD_TOKEN), pad_token_id=tokenizer.token_to_id(PAD_TOKEN),
        corpus={"description": f"chat JSONL: {', '.join(map(str, files))}", "files": len(files),
                "documents": len(kept), "bytes": sum(f.stat().st_size for f in files),
                "sha256": key["inputs_sha256"], "skipped": dict(report.counts),
                "sft": {**key, "splits": stats, "counts": report.counts, "first": report.first,
                        "details": report.details}},
        chunk_bytes=0, val_fraction=val_fraction, splits=splits, directory=out_dir)
    manifest.write(out_dir)
    for name, s in stats.items():
        log(f"SFT {name}: {s['conversations']} conversations in {s['blocks']} blocks of {seq_len} "
            f"tokens ({s['trained_tokens']:,} assistant tokens trained, "
            f"{s['conversation_tokens'] / max(s['blocks'] * seq_len, 1):.0%} of the block space used)")
    return SFTPrepared(out_dir, manifest, report, reused=False)
