"""``k2 recipe``'s settings file: unknown tables and keys, recipe-owned paths and bad values are
clear errors naming the file and the key, before any stage runs (docs/recipe.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2.cli import main
from k2.errors import ConfigError
from k2.recipe import DEFAULT_CONFIG, QUICK_CONFIG, load
from k2.recipe.stages import plan


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("[pretrain]\nsteps = 3\n", "unknown stage or table [pretrain]"),
    ("steps = 3\n", "top-level key 'steps' sits outside any table"),
    ("[sft]\nstep = 3\n", "unknown key 'step' in [sft]"),
    ("[train]\nwarm_start_steps = 3\n", "unknown key 'warm_start_steps' in [train]"),
    ("[synth]\nbogus = 1\n", "unknown key 'bogus' in [synth]"),
    ("[eval]\nagentic_limt = 4\n", "unknown key 'agentic_limt' in [eval]"),
    ("[sft]\ninit = \"runs/x\"\n", "[sft] init is set by the recipe"),
    ("[rl]\nrun_dir = \"runs/x\"\n", "[rl] run_dir is set by the recipe"),
    ("[synth]\nout = \"x\"\n", "[synth] out is set by the recipe"),
    ("[train]\nlr = -1.0\n", "[train] lr must be a positive number, got -1.0"),
    ("[train]\npreset = \"huge\"\n", "[train] unknown preset 'huge'"),
    ("[rl]\nobjective = \"ppo\"\n", "[rl] unknown objective 'ppo'"),
    ("[sft]\nsteps = \"many\"\n", "[sft] steps must be of type int, got 'many'"),
    ("[synth]\nn = \"lots\"\n", "[synth] n must be a int, got 'lots'"),
    ("[synth]\nuser = \"human\"\n", "[synth] user must be one of programmatic, openai"),
    ("[synth]\nno_failures = 1\n", "[synth] no_failures must be true or false"),
    ("[eval]\nagentic_limit = 0\n", "[eval] agentic_limit must be at least 1"),
    ("[eval]\nagentic_constraints = \"maybe\"\n", "[eval] agentic_constraints must be on, off or both"),
    ("[eval]\nagentic_episodes = 1\n", "[eval] agentic_episodes must be a bool"),
    ("[train\n", "is not valid TOML"),
])
def test_bad_settings_name_the_file_and_key(tmp_path: Path, capsys, text: str, message: str) -> None:
    path = write(tmp_path, text)
    out = tmp_path / "out"
    assert main(["recipe", "--config", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert str(path) in err
    assert not out.exists()  # nothing was started


def test_missing_file_and_quick_with_config(tmp_path: Path, capsys) -> None:
    assert main(["recipe", "--config", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")]) == 1
    assert f"recipe file {tmp_path / 'none.toml'} does not exist" in capsys.readouterr().err
    path = write(tmp_path, "")
    assert main(["recipe", "--quick", "--config", str(path), "--out", str(tmp_path / "o")]) == 1
    assert "--quick" in capsys.readouterr().err


@pytest.mark.parametrize("path", [DEFAULT_CONFIG, QUICK_CONFIG])
def test_shipped_settings_are_valid_and_chain_the_stages(path: Path, tmp_path: Path) -> None:
    stages = {s.name: s for s in plan(load(path), tmp_path / "out")}
    assert list(stages) == ["train", "synth", "sft", "rl"]
    out = tmp_path / "out"
    assert stages["train"].settings["run_dir"] == str(out / "train")
    assert stages["synth"].settings["tokenizer"] == stages["train"].settings["data_dir"]
    assert stages["synth"].settings["max_tokens"] == stages["sft"].settings["seq_len"]
    assert stages["sft"].settings["init"] == str(out / "train")
    assert stages["sft"].settings["data"] == [str(out / "synth" / "train.jsonl")]
    assert stages["rl"].settings["init"] == str(out / "sft")
    assert "--resume" not in stages["rl"].argv and "--resume" in stages["rl"].command(resume=True)


def test_stage_command_lines_parse_back_to_the_settings(tmp_path: Path) -> None:
    """The argv the recipe builds gives the stage's command exactly the file's values."""
    from k2.cli import build_parser

    path = write(tmp_path, '[train]\nlr = 0.00123\nbf16 = false\nsample_prompt = "-x = 1\\n"\n'
                           '[synth]\nn = 7\nno_failures = true\nmix = "single=1"\n[sft]\nsteps = 50\n')
    stages = {s.name: s for s in plan(load(path), tmp_path / "out")}
    train = build_parser().parse_args(stages["train"].argv)
    assert train.lr == 0.00123 and train.bf16 is False and train.sample_prompt == "-x = 1\n"
    synth = build_parser().parse_args(stages["synth"].argv)
    assert synth.n == 7 and synth.no_failures is True and synth.mix == "single=1" and synth.overwrite
    sft = build_parser().parse_args(stages["sft"].argv)
    assert sft.steps == 50 and sft.data == [str(tmp_path / "out" / "synth" / "train.jsonl")]


def test_rl_ptx_defaults_to_the_sft_stage_shards(tmp_path: Path) -> None:
    """With ptx_weight > 0 and no ptx_data, RL's PTX batches come from the SFT stage's shards
    (which do not exist when the recipe is planned); a ptx_data that is missing still fails."""
    from k2.cli import build_parser

    path = write(tmp_path, "[rl]\nptx_weight = 0.5\nptx_seq_len = 1024\nptx_batch_size = 2\n")
    stages = {s.name: s for s in plan(load(path), tmp_path / "out")}
    rl = build_parser().parse_args(stages["rl"].argv)
    assert rl.ptx_data == str(tmp_path / "out" / "sft" / "data") == stages["sft"].settings["run_dir"] + "/data"
    assert (rl.ptx_weight, rl.ptx_seq_len, rl.ptx_batch_size) == (0.5, 1024, 2)
    bad = write(tmp_path, f"[rl]\nptx_weight = 0.5\nptx_data = '{tmp_path / 'nowhere'}'\n")
    with pytest.raises(ConfigError, match=r"recipe file .*\[rl\] ptx_data .*nowhere: no manifest.json"):
        plan(load(bad), tmp_path / "out")


def test_load_returns_each_table(tmp_path: Path) -> None:
    config = load(write(tmp_path, "[rl]\nsteps = 2\n[eval]\nagentic_limit = 3\n"))
    assert config.stage("rl") == {"steps": 2} and config.stage("train") == {}
    assert config.eval.agentic_limit == 3
    with pytest.raises(ConfigError, match="recipe file"):
        load(tmp_path)
