"""The ``k2 serve`` command: registered, names its extra when missing, and says what is not built."""

from __future__ import annotations

import sys

import pytest

from k2.cli import build_parser, main
from k2.errors import MissingDependencyError


def test_serve_is_a_command():
    args = build_parser().parse_args(["serve", "run", "--port", "0", "--max-batch", "3"])
    assert args.command == "serve" and args.max_batch == 3 and args.host == "127.0.0.1"


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    from k2.commands.serve import run

    with pytest.raises(MissingDependencyError, match=r"k2-train\[serve\]"):
        run(build_parser().parse_args(["serve", "run"]))


def test_subscribe_is_not_built_yet():
    with pytest.raises(NotImplementedError, match="WeightSubscriber"):
        main(["serve", "some-run", "--subscribe", "policy"])
