"""The ``k2`` command line.

Each subcommand lives in its own module under ``k2.commands`` and exposes
``register(subparsers)``, which adds its parser and sets ``handler`` — a function that takes the
parsed arguments and returns an exit code. Heavy imports (torch, the model) happen inside the
handlers, so ``k2 --help`` is instant.

Exit codes: 0 success; 1 a k2 error (bad input, corrupt file — the message says which);
2 a usage error (argparse); 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from k2.errors import K2Error, RankLostError

# Order is the order `k2 --help` lists them in.
COMMAND_MODULES = (
    "version", "info", "train", "sample", "data", "ckpt", "plot", "env", "sandbox", "synth", "sft",
    "eval", "rl", "serve", "plan", "critic", "recipe",
)

DESCRIPTION = """\
k2 — an open implementation of the Kimi K2 training system: MLA + ultra-sparse MoE,
the MuonClip optimizer, a Rust data path, crash-safe checkpoints and a weight-broadcast
pipeline.

Run `k2 COMMAND --help` for what a command does and the advice that goes with its flags."""


def build_parser() -> argparse.ArgumentParser:
    """The full ``k2`` argument parser, with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="k2",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"k2.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``k2`` command with ``argv`` (default: ``sys.argv[1:]``); return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except K2Error as err:
        print(f"k2 {args.command}: error: {err}", file=sys.stderr)
        if isinstance(err, RankLostError):  # a broken process group can abort at teardown
            from k2.parallel.failure import exit_after_rank_lost

            exit_after_rank_lost(1)
        return 1
    except NotImplementedError as err:  # a part that is not built says so, without a traceback
        print(f"k2 {args.command}: not built yet: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"k2 {args.command}: interrupted", file=sys.stderr)
        return 130
