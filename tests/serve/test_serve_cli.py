"""The ``k2 serve`` command: registered, names its extra when missing, loads a run, and follows a
weight broadcast with ``--subscribe``."""

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


def _save_run(tmp_path, model, tokenizer):
    from k2 import checkpoint
    from k2.data.tokenizer import save_tokenizer

    root = tmp_path / "myrun"
    root.mkdir()
    save_tokenizer(tokenizer, root)
    checkpoint.save(root / "checkpoints", model, tokenizer_dir=root, step=0)
    return root


def test_subscribe_follows_the_broadcast(tmp_path, tiny, monkeypatch, capsys):
    import copy
    import os

    import torch
    import uvicorn

    from k2.broadcast import WeightPublisher
    from model_helpers import randomize

    model, tokenizer = tiny
    root = _save_run(tmp_path, model, tokenizer)
    trainer = randomize(copy.deepcopy(model), 3, scale=0.15)
    name = f"k2-serve-cli-{os.getpid()}"
    seen = {}

    def fake_run(app, host, port, log_level):
        service = app.state.service
        seen["joined"] = [w.worker for w in publisher.workers()]
        seen["published"] = publisher.publish()  # applied by the idle scheduler before it returns
        seen["version"] = service.weight_version
        seen["equal"] = all(torch.equal(t, trainer.state_dict()[k]) for k, t in service.model.state_dict().items())

    monkeypatch.setattr(uvicorn, "run", fake_run)
    with WeightPublisher(trainer, name=name, timeout=30.0) as publisher:
        argv = ["serve", str(root / "checkpoints"), "--subscribe", name, "--worker-name", "srv", "--port", "9124"]
        assert main(argv) == 0
        assert [w.worker for w in publisher.workers() if w.state != "evicted" and w.alive] in ([], ["srv"])
    assert seen == {"joined": ["srv"], "published": 1, "version": 1, "equal": True}
    assert f"following weight broadcast {name!r}" in capsys.readouterr().out


def test_subscribe_to_a_broadcast_of_another_model_names_the_differences(tmp_path, tiny, capsys):
    import os

    from k2.broadcast import WeightPublisher
    from k2.model import K2ForCausalLM
    from model_helpers import small_config

    model, tokenizer = tiny
    root = _save_run(tmp_path, model, tokenizer)
    other = K2ForCausalLM(small_config(vocab_size=model.config.vocab_size + 8, max_position_embeddings=512,
                                       rope_scaling=None))
    name = f"k2-serve-cli-bad-{os.getpid()}"
    with WeightPublisher(other, name=name, timeout=5.0):
        assert main(["serve", str(root / "checkpoints"), "--subscribe", name]) == 1
    err = capsys.readouterr().err
    assert "k2 serve: error:" in err and "embed_tokens" in err and "shape" in err
