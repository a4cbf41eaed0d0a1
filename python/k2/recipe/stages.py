"""The recipe's stages: what each one runs, where its output goes, and when it counts as done
(docs/recipe.md, "Stages, markers and resuming").

A stage runs its ``k2`` command in this process, through the command's own parser and handler
(``k2.cli.build_parser``), exactly as ``k2 train ...`` on the command line would; the recipe only
builds the command line. It is finished when its **marker**, ``OUT/stages/NAME.done.json``, exists:
written (to a temporary file, fsynced, renamed) only after the command returned 0. A stage
without a marker is run again: through ``--resume`` when its run directory holds a checkpoint
(``k2 train``, ``k2 sft``, ``k2 rl``), otherwise from a clean directory.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2.errors import ConfigError, RecipeError
from k2.recipe.config import STAGES, RecipeConfig, synth_options

CONFIG_CLASSES = {"train": ("k2.train.config", "TrainConfig"), "sft": ("k2.train.sft", "SFTConfig"),
                  "rl": ("k2.rl.config", "RLConfig")}


@dataclass
class Stage:
    """One stage, ready to run."""

    name: str
    directory: Path           # its output: a run directory, or k2 synth's --out
    settings: dict[str, Any]  # every setting it runs with (the recipe's wiring included)
    argv: list[str]           # the k2 command line, without --resume

    @property
    def resumable(self) -> bool:
        return self.name != "synth"

    def command(self, resume: bool = False) -> str:
        return shlex.join(["k2", *self.argv, *(["--resume"] if resume else [])])


def plan(config: RecipeConfig, out: Path) -> list[Stage]:
    """Every stage of the recipe with its settings, checked by the stage's own rules before
    anything runs.

    Raises:
        ConfigError: a value a stage refuses, naming the recipe file, the table and the key.
    """
    out = Path(out)
    train = config.stage("train")
    train.setdefault("data_dir", str(out / "data"))
    train["run_dir"] = str(out / "train")
    sft = config.stage("sft")
    sft.update(run_dir=str(out / "sft"), init=str(out / "train"), data=[str(out / "synth" / "train.jsonl")])
    synth = config.stage("synth")
    synth.setdefault("tokenizer", train["data_dir"])  # conversations must fit the SFT context
    if synth.get("tokenizer") and "max_tokens" not in synth:
        synth["max_tokens"] = int(sft.get("seq_len", _default("sft", "seq_len")))
    synth.update(out=str(out / "synth"), overwrite=True, quiet=True)
    rl = config.stage("rl")
    rl.update(run_dir=str(out / "rl"), init=str(out / "sft"))
    if float(rl.get("ptx_weight", 0) or 0) > 0 and not rl.get("ptx_data"):
        rl["ptx_data"] = str(out / "sft" / "data")  # the SFT stage's shards: keep its tool use
    settings = {"train": train, "synth": synth, "sft": sft, "rl": rl}
    for name in ("train", "sft", "rl"):
        _check_training(config, name, settings[name], str(out / "sft" / "data"))
    _check_synth(config, synth)
    progress = [] if sys.stderr.isatty() else ["--no-progress"]
    stages = []
    for name in STAGES:
        values = settings[name]
        argv = [name, *(progress if name != "synth" else []), *_flags(name, values)]
        stages.append(Stage(name, Path(values["out" if name == "synth" else "run_dir"]), values, argv))
    return stages


def _default(stage: str, name: str) -> Any:
    import dataclasses
    import importlib

    module, cls = CONFIG_CLASSES[stage]
    fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    return fields[name].default


def _check_training(config: RecipeConfig, name: str, values: dict[str, Any], sft_shards: str) -> None:
    """The stage's own checks (its config class's ``validate``) on the file's values
    (``sft_shards``: where the SFT stage writes its token shards, RL's default PTX data)."""
    import importlib

    module, cls = CONFIG_CLASSES[name]
    config_cls = getattr(importlib.import_module(module), cls)
    trial = dict(values)
    if name == "sft":  # the data exist only once k2 synth has run: check the rest now
        trial["data"] = [str(config.source)]
    if name == "rl" and trial.get("ptx_data") == sft_shards and not Path(sft_shards, "manifest.json").is_file():
        trial["ptx_weight"] = 0  # the SFT stage's shards do not exist yet: checked when RL starts
    try:
        config_cls.resolve(None, **trial)
    except ConfigError as err:
        raise ConfigError(f"recipe file {config.source}: [{name}] {err}") from None


def _check_synth(config: RecipeConfig, values: dict[str, Any]) -> None:
    """Types and choices of ``k2 synth``'s options (its range checks run when the stage starts)."""
    import argparse

    actions = synth_options()
    for key, value in values.items():
        action = actions[key]
        where = f"recipe file {config.source}: [synth] {key}"
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, got {value!r}")
            continue
        kind = action.type or str
        ok = (isinstance(value, str) if kind is str else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{where} must be a {kind.__name__}, got {value!r}")
        if action.choices and value not in action.choices:
            raise ConfigError(f"{where} must be one of {', '.join(action.choices)}, got {value!r}")


def _flags(stage: str, values: dict[str, Any]) -> list[str]:
    """``values`` as the command's flags (``--name=value``, so no value reads as a flag)."""
    import argparse

    synth = synth_options() if stage == "synth" else {}
    argv: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if stage == "synth":
                if not isinstance(synth[key], argparse._StoreTrueAction):
                    raise ConfigError(f"[synth] {key} is not a true/false option")
                argv += [flag] if value else []
            else:
                argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            argv += [flag, *(str(v) for v in value)] if value else []
        elif isinstance(value, float):
            argv.append(f"{flag}={value!r}")
        else:
            argv.append(f"{flag}={value}")
    return argv


# ---------------------------------------------------------------------------- markers
def marker_path(out: Path, name: str) -> Path:
    return Path(out) / "stages" / f"{name}.done.json"


def read_marker(out: Path, name: str) -> dict[str, Any] | None:
    path = marker_path(out, name)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"stage marker {path} is unreadable ({err}); delete it to run the stage again") from None


def write_json_atomic(path: Path, value: Any) -> None:
    """``path`` holds ``value`` whole or not at all: a synced temporary file renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(settings, sort_keys=True))


def check_marker(stage: Stage, marker: dict[str, Any], out: Path) -> None:
    """A finished stage may be skipped only if it ran with the settings asked for now."""
    before, now = marker.get("settings", {}), _jsonable(stage.settings)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        diffs = "; ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in changed)
        raise ConfigError(f"stage {stage.name} finished in {out} with other settings ({diffs}); "
                          f"delete {stage.directory} and {marker_path(out, stage.name)} to run it "
                          "again with the new ones, or give another --out")


class StageInterrupted(Exception):
    """A stage stopped on Ctrl-C after saving what it could (exit status 130)."""


def run_stage(stage: Stage, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Run ``stage`` to completion (resuming it when it can) and write its marker.

    Returns the marker. Raises :class:`StageInterrupted` on Ctrl-C, :class:`RecipeError` when the
    command exits with an error status; a stage's own exceptions pass through unchanged.
    """
    from k2.cli import build_parser
    from k2.train.resume import has_checkpoint

    resume = False
    if stage.directory.exists():
        if stage.resumable and has_checkpoint(stage.directory):
            resume = True
            log(f"recipe: {stage.name}: resuming the interrupted run in {stage.directory}")
        else:
            log(f"recipe: {stage.name}: {stage.directory} holds an unfinished run with nothing to "
                "resume from; starting it again")
            shutil.rmtree(stage.directory)
    command = stage.command(resume)
    log(f"recipe: {stage.name}: {command}")
    partial = Path(out) / "stages" / f"{stage.name}.attempts.json"
    attempts = json.loads(partial.read_text()) if partial.is_file() else []
    started = time.time()
    code: int | None = None
    try:
        args = build_parser().parse_args([*stage.argv, *(["--resume"] if resume else [])])
        code = int(args.handler(args) or 0)
    finally:
        attempts.append({"started": started, "seconds": round(time.time() - started, 3), "resumed": resume,
                         "exit": code})
        write_json_atomic(partial, attempts)
    if code == 130:
        raise StageInterrupted(stage.name)
    if code != 0:
        raise RecipeError(f"stage {stage.name} exited with status {code} ({command})")
    marker = {"stage": stage.name, "id": uuid.uuid4().hex,  # what evaluations of its output cite
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "seconds": round(sum(a["seconds"] for a in attempts), 3),
              "last_attempt_seconds": attempts[-1]["seconds"], "attempts": len(attempts),
              "command": stage.command(), "settings": _jsonable(stage.settings)}
    write_json_atomic(marker_path(out, stage.name), marker)
    partial.unlink()
    return marker


def forget_after(stages: list[Stage], index: int, out: Path, log: Callable[[str], None]) -> None:
    """Stage ``index`` is about to run again: every later stage read its old output, so their
    markers, evaluations and outputs go."""
    for later in stages[index + 1:]:
        paths = [marker_path(out, later.name), Path(out) / "eval" / f"{later.name}.json",
                 Path(out) / "stages" / f"{later.name}.attempts.json", later.directory]
        if any(p.exists() for p in paths):
            log(f"recipe: {later.name}: its input ({stages[index].name}) runs again, so its output goes")
        for p in paths:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
