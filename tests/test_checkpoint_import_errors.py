"""`k2 ckpt import-hf` refuses what is not a Hub checkpoint with weights, naming the file at
fault, and a refused import creates nothing and changes nothing (docs/checkpoints.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from k2 import checkpoint
from k2.cli import main
from k2.model import K2ForCausalLM

from model_helpers import small_config
from test_checkpoint_hub import FP8_CONFIG, write_hub


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def refused(src: Path, out: Path, capsys, *fragments: str) -> None:
    """Run the import, expect exit status 1 with a message holding ``fragments``, and check
    that it left ``src`` as it was and created nothing beside ``out``."""
    before = snapshot(src) if src.is_dir() else None
    siblings = sorted(p.name for p in out.parent.iterdir())
    capsys.readouterr()
    assert main(["ckpt", "import-hf", str(src), str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == siblings  # no .k2-tmp-* left either
    if before is not None:
        assert snapshot(src) == before


def test_a_config_without_weights_is_refused(tmp_path, capsys) -> None:
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(FP8_CONFIG))
    refused(hub, tmp_path / "k2", capsys, str(hub), "no .safetensors")


@pytest.fixture
def k2_checkpoint(tmp_path: Path) -> Path:
    """A k2 training checkpoint root: model, optimizer and training state (`latest` names it)."""
    model = K2ForCausalLM(small_config())
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    root = tmp_path / "run" / "checkpoints"
    checkpoint.save(root, model, optimizer, {"step": 1}, durable=False)
    return root


def test_a_k2_checkpoint_is_refused_not_imported(k2_checkpoint, tmp_path, capsys) -> None:
    step = k2_checkpoint / "step-00000001"
    for src in (step, k2_checkpoint):
        refused(src, tmp_path / "k2", capsys, "is a k2 checkpoint", "k2.checkpoint.load")


@pytest.mark.parametrize("config_text, fragment", [
    (None, "config.json does not exist"),
    ("{not json", "config.json is not valid JSON"),
    ("[1, 2]", "config.json must hold a JSON object"),
    (json.dumps({"model_type": "deepseek_v3"}), "config.json lacks num_hidden_layers"),
    (json.dumps({"model_type": "deepseek_v3", "num_hidden_layers": "two"}),
     "num_hidden_layers must be a non-negative integer"),
    (b"\xff\xfe garbage", "config.json is not valid JSON"),
])
def test_a_missing_or_garbage_config_is_named(config_text, fragment, tmp_path, capsys) -> None:
    hub = tmp_path / "hub"
    write_hub(hub, {"model.embed_tokens.weight": torch.zeros(4, 2)}, FP8_CONFIG, shards=1)
    if config_text is None:
        (hub / "config.json").unlink()
    elif isinstance(config_text, bytes):
        (hub / "config.json").write_bytes(config_text)
    else:
        (hub / "config.json").write_text(config_text)
    refused(hub, tmp_path / "k2", capsys, fragment)


def test_a_missing_source_or_an_existing_output_is_named(tmp_path, capsys) -> None:
    refused(tmp_path / "nowhere", tmp_path / "k2", capsys, "nowhere does not exist")
    hub = tmp_path / "hub"
    write_hub(hub, {"model.embed_tokens.weight": torch.zeros(4, 2)}, FP8_CONFIG, shards=1)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["ckpt", "import-hf", str(hub), str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert snapshot(out) == {"mine.txt": b"keep me"}
