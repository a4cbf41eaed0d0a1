"""``k2 data``: prepare the token data that training reads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run_prepare(args: argparse.Namespace) -> int:
    from k2.data.prepare import PrepareOptions, prepare

    options = PrepareOptions(
        corpus=args.corpus or (),
        out_dir=args.out,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        chunk_bytes=args.chunk_kib * 1024,
    )
    prepare(options, log=print, show_progress=not args.quiet and sys.stderr.isatty())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="prepare token data: corpus -> tokenizer -> token shards",
        description="Work with k2's token data. See docs/token-shards.md for the shard format.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = actions.add_parser(
        "prepare",
        help="train a tokenizer and write train/validation token shards",
        description="Read a corpus, train a byte-level BPE tokenizer (with K2's chat and "
        "tool-call special tokens and chat template), tokenize, and write token shards plus "
        "manifest.json. With no --corpus, the corpus is this Python's standard library (about "
        "a minute on two cores). The same inputs give byte-identical outputs.",
    )
    prepare.add_argument(
        "--corpus",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="files or directories (.txt, .md, .rst, .py, and .jsonl with a 'text' field); "
        "default: the Python standard library",
    )
    prepare.add_argument(
        "--out", type=Path, default=Path("data"), help="output directory (default: data)"
    )
    prepare.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        help="tokenizer vocabulary size; match the model's vocab_size "
        "(default 8192, the tiny preset's)",
    )
    prepare.add_argument(
        "--val-fraction",
        type=float,
        default=0.02,
        help="share of chunks held out for validation, chosen by a stable hash (default 0.02)",
    )
    prepare.add_argument(
        "--chunk-kib",
        type=int,
        default=16,
        help="documents are cut at line boundaries into chunks of at most this many KiB "
        "(default 16); smaller chunks spread large files more evenly over the splits",
    )
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.set_defaults(handler=run_prepare)
