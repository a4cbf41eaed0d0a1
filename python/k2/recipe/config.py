"""The recipe's settings: one TOML file with a table per stage (docs/recipe.md).

``[train]``, ``[sft]`` and ``[rl]`` take the settings of ``k2 train``, ``k2 sft`` and ``k2 rl``
(the fields of their config classes, named as the flags with underscores), ``[synth]`` the
options of ``k2 synth``, and ``[eval]`` the recipe's own evaluation settings. The paths that chain
one stage to the next (run directories, ``--init``, ``--data``, ``--out``) belong to the recipe:
setting one is an error, as is an unknown table or key. Every value is checked before any stage
runs, by the stage's own checks where it has them.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k2.errors import ConfigError

STAGES = ("train", "synth", "sft", "rl")
"""The stages, in the order they run; each reads the previous one's output."""
MODEL_STAGES = ("train", "sft", "rl")
"""The stages that leave a model to evaluate."""

RECIPE_OWNED = {
    "train": ("run_dir",),
    "synth": ("out", "overwrite", "quiet"),
    "sft": ("run_dir", "init", "data"),
    "rl": ("run_dir", "init"),
}
"""Settings the recipe sets itself, to chain the stages: not allowed in the file."""

DEFAULT_CONFIG = Path(__file__).with_name("default.toml")
QUICK_CONFIG = Path(__file__).with_name("quick.toml")


@dataclass
class EvalSettings:
    """The evaluation run after every stage (docs/recipe.md, "Evaluation")."""

    val_batches: int = 0            # validation batches of the pretraining data (0: the whole split)
    agentic_limit: int = 16         # held-out k2 synth records for k2 eval agentic
    agentic_constraints: str = "on"  # on | off | both: schema-constrained decoding
    agentic_batch: int = 8
    call_tokens: int = 128
    turn_tokens: int = 256
    episode_tokens: int = 1024
    agentic_episodes: bool = True   # play whole episodes (task success), not only next calls
    arithmetic_prompts: int = 64    # held-out arithmetic prompts (greedy)
    arithmetic_level: int = 0       # 0: the [rl] task_level when the RL task is arithmetic, else the task's default
    report_episodes: int = 3        # agent episodes rendered in the report

    def validate(self, source: str) -> None:
        for name in ("agentic_limit", "agentic_batch", "arithmetic_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{source}: [eval] {name} must be at least 1, got {getattr(self, name)}")
        for name in ("call_tokens", "turn_tokens", "episode_tokens"):
            if getattr(self, name) < 8:
                raise ConfigError(f"{source}: [eval] {name} must be at least 8, got {getattr(self, name)}")
        for name in ("val_batches", "arithmetic_level", "report_episodes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{source}: [eval] {name} must be >= 0, got {getattr(self, name)}")
        if self.agentic_constraints not in ("on", "off", "both"):
            raise ConfigError(f"{source}: [eval] agentic_constraints must be on, off or both, got "
                              f"{self.agentic_constraints!r}")


@dataclass
class RecipeConfig:
    """The parsed file: each stage's settings as given (TOML values), and the evaluation's."""

    source: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def stage(self, name: str) -> dict[str, Any]:
        return dict(self.stages.get(name, {}))


def load(path: str | Path) -> RecipeConfig:
    """Read and check a recipe file.

    Raises:
        ConfigError: the file cannot be read or parsed, names an unknown table or key, sets a
            recipe-owned path, or gives a value its stage refuses — naming the file, table and key.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe file {path} is a directory, not a TOML file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe file {path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"recipe file {path} cannot be read: {err.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"recipe file {path} is not valid TOML: {err}") from None
    tables = (*STAGES, "eval")
    for key, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(f"recipe file {path}: top-level key {key!r} sits outside any table; "
                              f"settings go under one of [{'], ['.join(tables)}]")
        if key not in tables:
            raise ConfigError(f"recipe file {path}: unknown stage or table [{key}]; known: "
                              f"{', '.join(tables)}")
    config = RecipeConfig(source=path, stages={name: dict(data.get(name, {})) for name in STAGES})
    for name in STAGES:
        known = known_keys(name)
        for key in config.stages[name]:
            if key in RECIPE_OWNED[name]:
                raise ConfigError(f"recipe file {path}: [{name}] {key} is set by the recipe (it chains "
                                  "the stages: each reads the previous one's output under --out); "
                                  "remove it")
            if key not in known:
                raise ConfigError(f"recipe file {path}: unknown key {key!r} in [{name}]; known keys: "
                                  f"{', '.join(sorted(known))}")
    config.eval = _eval_settings(path, data.get("eval", {}))
    return config


def known_keys(stage: str) -> set[str]:
    """The settings a stage's table may hold (the recipe-owned ones included)."""
    if stage == "train":
        from k2.train.config import TrainConfig

        return set(TrainConfig.fields())
    if stage == "sft":
        from k2.train.sft import SFT_FLAGS

        return set(SFT_FLAGS)
    if stage == "rl":
        from k2.rl.config import RL_FLAGS

        return set(RL_FLAGS)
    if stage == "synth":
        return set(synth_options())
    raise ConfigError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")


def synth_options() -> dict[str, Any]:
    """``k2 synth``'s options: destination name -> its argparse action (the command's own parser,
    so the recipe accepts exactly what ``k2 synth`` does)."""
    import argparse

    from k2.commands import synth

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    synth.register(sub)
    command = sub.choices["synth"]
    return {a.dest: a for a in command._actions if a.dest != "help"}


def _eval_settings(path: Path, table: dict[str, Any]) -> EvalSettings:
    fields = {f.name: f for f in dataclasses.fields(EvalSettings)}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"recipe file {path}: unknown key {key!r} in [eval]; known keys: "
                              f"{', '.join(fields)}")
        want = type(getattr(EvalSettings(), key))
        if want is bool and not isinstance(value, bool) or want is int and (
                isinstance(value, bool) or not isinstance(value, int)) or want is str and not isinstance(value, str):
            raise ConfigError(f"recipe file {path}: [eval] {key} must be a {want.__name__}, got {value!r}")
    settings = EvalSettings(**table)
    settings.validate(f"recipe file {path}")
    return settings
