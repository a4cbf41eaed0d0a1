"""``k2 version``: the versions of k2, its native module, torch and Python."""

from __future__ import annotations

import argparse
import json
import platform


def versions() -> dict[str, str]:
    """The versions that matter when reporting a result or a bug."""
    import numpy
    import torch

    from k2 import __version__, _native

    return {
        "k2": __version__,
        "k2._native": _native.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",
        "cuda_available": str(torch.cuda.is_available()),
    }


def run(args: argparse.Namespace) -> int:
    info = versions()
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for name, value in info.items():
            print(f"{name:<{width}}  {value}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "version",
        help="print the versions of k2, its native module, torch and Python",
        description="Print the versions of k2, its Rust extension, torch, numpy and Python. "
        "Paste this into any bug report or result you share.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.set_defaults(handler=run)
