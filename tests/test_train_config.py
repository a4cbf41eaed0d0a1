"""`k2 train` settings: every bad value is refused before any work, with a message naming the
field (or the file), never a traceback and never a file written (docs/training.md, Settings)."""

from __future__ import annotations

import math

import pytest

from k2.cli import main
from k2.errors import ConfigError
from k2.train.config import TrainConfig

FLOAT_FIELDS = [name for name, f in TrainConfig.fields().items() if f.type == "float"]


def test_every_float_field_is_listed() -> None:
    # The parametrization below must cover each float setting, whatever is added later.
    assert {"lr", "adamw_lr", "weight_decay", "grad_clip", "qk_clip_tau", "decay_fraction",
            "min_lr_ratio"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_naming_the_field(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"^{name} must be a finite number, got {value}"):
        TrainConfig.resolve(None, **{name: value})


@pytest.mark.parametrize("flag, value, field", [
    ("--weight-decay", "nan", "weight_decay"),
    ("--weight-decay", "inf", "weight_decay"),
    ("--qk-clip-tau", "nan", "qk_clip_tau"),
    ("--grad-clip", "nan", "grad_clip"),
    ("--lr", "inf", "lr"),
])
def test_non_finite_flags_fail_before_any_work(flag, value, field, tmp_path, capsys) -> None:
    run, data = tmp_path / "run", tmp_path / "data"
    assert main(["train", "--run-dir", str(run), "--data-dir", str(data), flag, value]) == 1
    err = capsys.readouterr().err
    assert f"{field} must be a finite number" in err and "Traceback" not in err
    assert not run.exists() and not data.exists()


def test_non_finite_values_in_a_toml_file_are_refused(tmp_path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nweight_decay = nan\n")
    with pytest.raises(ConfigError, match="weight_decay must be a finite number"):
        TrainConfig.resolve(toml)


def test_top_level_keys_beside_a_train_table_are_an_error_naming_them(tmp_path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("steps = 5\nlr = 0.5\n\n[train]\nseq_len = 64\n")
    with pytest.raises(ConfigError, match=r"run\.toml.*lr, steps.*outside the \[train\] table"):
        TrainConfig.resolve(toml)
    toml.write_text("[train]\nseq_len = 64\n\n[model]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"run\.toml.*model.*outside the \[train\] table"):
        TrainConfig.resolve(toml)
    toml.write_text("train = 5\n")
    with pytest.raises(ConfigError, match=r"run\.toml.*`train` must be a table"):
        TrainConfig.resolve(toml)
    # Either layout alone still works.
    toml.write_text("[train]\nseq_len = 64\n")
    assert TrainConfig.resolve(toml).seq_len == 64
    toml.write_text("seq_len = 32\n")
    assert TrainConfig.resolve(toml).seq_len == 32


def test_a_config_that_is_not_utf8_or_is_a_directory_is_named(tmp_path, capsys) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("sample_prompt = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml is not UTF-8 text"):
        TrainConfig.resolve(latin1)
    with pytest.raises(ConfigError, match=rf"{tmp_path} is a directory, not a TOML file"):
        TrainConfig.resolve(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--config", str(latin1)]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**70)], "seed must be below 2**63"),
    (["--steps", str(2**64)], "steps must be below 2**63"),
    (["--device", "cuda:abc"], "device must be auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:-1"], "device must be auto, cpu, cuda or cuda:N"),
    (["--sample-prompt", ""], "sample_prompt is empty"),
    (["--allow-changes"], "--allow-changes only applies with --resume"),
])
def test_out_of_range_settings_fail_before_any_work(args, message, tmp_path, capsys) -> None:
    run, data = tmp_path / "run", tmp_path / "data"
    assert main(["train", "--run-dir", str(run), "--data-dir", str(data), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not run.exists() and not data.exists()


def test_an_empty_prompt_is_fine_when_no_samples_are_drawn() -> None:
    assert TrainConfig.resolve(None, sample_prompt="", num_samples=0).sample_prompt == ""
    assert TrainConfig.resolve(None, sample_prompt="", sample_tokens=0).sample_prompt == ""


@pytest.mark.gpu
def test_a_cuda_device_the_machine_lacks_is_named_before_any_work(tmp_path, capsys) -> None:
    import torch

    count = torch.cuda.device_count()
    run, data = tmp_path / "run", tmp_path / "data"
    assert main(["train", "--run-dir", str(run), "--data-dir", str(data),
                 "--device", f"cuda:{count}"]) == 1
    err = capsys.readouterr().err
    assert f"this machine has {count} CUDA device(s)" in err and "Traceback" not in err
    assert not run.exists() and not data.exists()
