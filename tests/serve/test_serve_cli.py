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


def test_serve_loads_a_run_and_hands_the_app_to_uvicorn(tmp_path, tiny, monkeypatch, capsys):
    import uvicorn

    from k2 import checkpoint
    from k2.data.tokenizer import save_tokenizer

    model, tokenizer = tiny
    root = tmp_path / "myrun"
    root.mkdir()
    save_tokenizer(tokenizer, root)
    checkpoint.save(root / "checkpoints", model, tokenizer_dir=root, step=0)
    seen = {}

    def fake_run(app, host, port, log_level):
        seen.update(app=app, host=host, port=port)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", str(root / "checkpoints"), "--port", "9123", "--max-batch", "2"]) == 0
    assert seen["port"] == 9123 and seen["host"] == "127.0.0.1"
    assert "as model 'myrun'" in capsys.readouterr().out
    paths = {route.path for route in seen["app"].routes}
    assert {"/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= paths
