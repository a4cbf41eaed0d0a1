"""``k2 train --resume``: which checkpoint to continue from, and with which settings.

Kept out of the training loop on purpose: everything here runs before the run directory is
touched, so a resume that cannot go ahead fails with every file of the run as it was
(docs/training.md, "Resuming, interrupting").

**Which checkpoint.** A save renames its complete directory into place and only then moves
``latest`` (docs/checkpoints.md), so a save killed in between leaves a complete checkpoint newer
than the one ``latest`` names, or no ``latest`` at all after a run's first save. Resume
therefore does not trust ``latest`` alone: it takes the ``step-*`` checkpoints of the root,
newest first, and adopts the first that verifies (every byte against its manifest). A newer one
that fails verification is reported, and moved out of the root (to ``RUN/checkpoints-rejected/``,
byte for byte) once the resume has gone through, since training will save a new checkpoint of
that step in its place.

**Which settings.** A resumed run continues with the settings stored in its checkpoint; the
settings given on the command line or in ``--config`` override them. Those that change what the
run computes (:data:`TRAINING_SETTINGS`) must agree with the stored ones: a difference is an
error naming each one, unless ``--allow-changes`` turns the errors into warnings. The model
(``preset``) can never change.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k2.errors import CheckpointError, ConfigError
from k2.train.config import TrainConfig

CHECKPOINTS = "checkpoints"
REJECTED = "checkpoints-rejected"
"""Where, beside ``checkpoints/``, resume keeps newer checkpoints that failed verification."""

TRAINING_SETTINGS = (
    "preset", "seq_len", "batch_size", "grad_accum", "steps", "optimizer", "lr", "adamw_lr",
    "weight_decay", "warmup_steps", "decay_fraction", "min_lr_ratio", "grad_clip", "qk_clip_tau",
    "seed", "bf16",
)
"""Settings that change the model, the batches, the schedule or the update: a resume must keep
them (or say ``--allow-changes``). The rest (where things go, how often to log, evaluate and
save, the device, the samples) may change freely."""

FIXED_SETTINGS = ("preset",)
"""Settings no resume may change: the checkpoint holds that model's tensors."""

_STEP = re.compile(r"^step-(\d+)$")


@dataclass
class ResumePoint:
    """The checkpoint a resume continues from, and what was learned choosing it.

    Attributes:
        root: the checkpoint root, ``RUN/checkpoints``.
        path: the chosen checkpoint directory (it verified).
        step: its step (from its name).
        stored_config: the settings saved with it (None if it holds none).
        rejected: newer checkpoints that failed verification, with the reason.
        notes: what the choice involved, for the log (empty when ``latest`` named it).
    """

    root: Path
    path: Path
    step: int
    stored_config: dict[str, Any] | None
    rejected: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    latest: str | None = None


def has_checkpoint(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` holds a complete ``step-*`` checkpoint (verified or not) that
    :func:`find_resume_point` would consider, ``latest`` or no ``latest``."""
    from k2 import _native

    root = Path(run_dir) / CHECKPOINTS
    return root.is_dir() and any(_STEP.match(n) for n in _native.list_checkpoints(root))


def find_resume_point(run_dir: str | os.PathLike[str]) -> ResumePoint:
    """The newest complete checkpoint of ``run_dir`` that verifies.

    Raises:
        ConfigError: the run holds no checkpoint at all.
        CheckpointError: it holds some, but none verifies (each is named with its defect).
    """
    from k2 import _native
    from k2.checkpoint import CheckpointReader

    root = Path(run_dir) / CHECKPOINTS
    names = _native.list_checkpoints(root) if root.is_dir() else []
    steps = sorted(((int(m.group(1)), n) for n in names if (m := _STEP.match(n))), reverse=True)
    if not steps:
        raise ConfigError(f"--resume: {root} holds no checkpoint to resume from (run without "
                          "--resume to start a new run)")
    notes: list[str] = []
    try:
        latest = _native.read_latest(root)
    except CheckpointError as err:
        latest = None
        notes.append(f"`latest` is unreadable ({err})")
    rejected: list[tuple[Path, str]] = []
    for step, name in steps:
        path = root / name
        try:
            reader = CheckpointReader(path)
            reader.verify()
            stored = _stored_config(reader)
        except CheckpointError as err:
            rejected.append((path, str(err)))
            continue
        for bad, reason in rejected:
            notes.append(f"{bad.name} fails verification ({reason}); falling back to {name}")
        if not rejected and latest != name:
            if latest is None:
                notes.append(f"no `latest`; adopting {name} (a save was killed before it wrote "
                             "`latest`, or it was removed)")
            else:
                notes.append(f"adopting {name}: it is complete and verifies, but `latest` names "
                             f"{latest} (a save was killed before it moved `latest`)")
        return ResumePoint(root, path, step, stored, rejected, notes, latest)
    listing = "; ".join(f"{p.name}: {reason}" for p, reason in rejected)
    raise CheckpointError(f"--resume: no checkpoint in {root} verifies ({listing})")


def _stored_config(reader: Any) -> dict[str, Any] | None:
    from k2.checkpoint.state_tree import decode

    if not reader.has_file("train_state.json"):
        return None
    state = decode(reader.read_json("train_state.json"), lambda name: reader.tensor(name))
    user = state.get("user") if isinstance(state, dict) else None
    config = user.get("config") if isinstance(user, dict) else None
    return config if isinstance(config, dict) else None


def explicit_run_dir(file: str | os.PathLike[str] | None, overrides: dict[str, Any],
                     config_cls: type[TrainConfig] = TrainConfig) -> Path:
    """The run directory the command line (or else ``--config``, or else the default) names."""
    if overrides.get("run_dir") is not None:
        return Path(overrides["run_dir"])
    if file is not None:
        from_file = config_cls.from_toml(file).get("run_dir")
        if from_file is not None:
            return Path(str(from_file))
    return Path(config_cls.run_dir)


def command_config(args: Any, overrides: dict[str, Any], config_cls: type[TrainConfig] = TrainConfig
                   ) -> tuple[TrainConfig, ResumePoint | None]:
    """The settings a training command (``k2 train``, ``k2 sft``, ``k2 rl``) runs with, from its
    parsed ``args`` (``config``, ``resume``, ``allow_changes``) and flag ``overrides``: on
    ``--resume`` those of :func:`resume_config` and the checkpoint to continue from, else the
    defaults, then ``--config``, then the flags (and no checkpoint)."""
    if args.allow_changes and not args.resume:
        raise ConfigError("--allow-changes only applies with --resume")
    if args.resume:  # the checkpoint's settings, then --config, then the flags
        return resume_config(args.config, overrides, config_cls=config_cls)
    return config_cls.resolve(args.config, **overrides), None


def resume_config(file: str | os.PathLike[str] | None, overrides: dict[str, Any],
                  config_cls: type[TrainConfig] = TrainConfig) -> tuple[TrainConfig, ResumePoint]:
    """The settings of a resumed run: the checkpoint's, then ``file``'s, then ``overrides``
    (``config_cls``: the command's settings class, e.g. ``k2 sft``'s).

    Returns:
        The resolved settings and the checkpoint they continue from (not yet compared: see
        :func:`setting_changes`).
    """
    run_dir = explicit_run_dir(file, overrides, config_cls)
    point = find_resume_point(run_dir)
    known = config_cls.fields()
    base = {k: v for k, v in (point.stored_config or {}).items() if k in known}
    corpus = base.get("corpus") or []
    if not isinstance(corpus, list) or not all(Path(str(c)).exists() for c in corpus):
        # Only used to prepare missing data; the loader's fingerprint catches other data.
        base.pop("corpus", None)
    config = config_cls.resolve(file, base=base, **{**overrides, "run_dir": str(run_dir)})
    return config, point


def setting_changes(config: TrainConfig, stored: dict[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """``(name, stored value, new value)`` for each training setting that differs."""
    if stored is None:
        return []
    now = config.to_dict()
    return [(name, stored[name], now[name]) for name in TRAINING_SETTINGS
            if name in stored and stored[name] != now[name]]


def check_settings(config: TrainConfig, point: ResumePoint, allow_changes: bool,
                   log: Callable[[str], None]) -> None:
    """Refuse (or, with ``allow_changes``, report) settings that differ from the checkpoint's.

    Raises:
        ConfigError: naming every difference, stored and new value.
    """
    if point.stored_config is None:
        log(f"warning: {point.path} holds no settings; the resumed run's cannot be checked")
        return
    changes = setting_changes(config, point.stored_config)
    if not changes:
        return
    lines = [f"{name}: {old!r} in the checkpoint, {new!r} now" for name, old, new in changes]
    fixed = [name for name, _, _ in changes if name in FIXED_SETTINGS]
    if fixed:
        raise ConfigError(f"--resume from {point.path}: {', '.join(fixed)} cannot change (the "
                          f"checkpoint holds that model): {'; '.join(lines)}")
    if not allow_changes:
        raise ConfigError(
            f"--resume from {point.path}: training settings differ from the checkpoint's: "
            f"{'; '.join(lines)}. Drop them to continue as saved, or pass --allow-changes to "
            "continue with the new values")
    for line in lines:
        log(f"warning: --allow-changes: {line}")


def commit_resume(point: ResumePoint, run_dir: Path, log: Callable[[str], None]) -> None:
    """Once the checkpoint has loaded: keep rejected checkpoints out of the root (a new save
    of their step goes there) and point ``latest`` at the adopted checkpoint."""
    for path, _ in point.rejected:
        target = run_dir / REJECTED / path.name
        n = 1
        while target.exists():
            target = run_dir / REJECTED / f"{path.name}-{n}"
            n += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        log(f"{path.name} (fails verification) moved to {target}")
    if point.latest != point.path.name:
        _write_latest(point.root, point.path.name)


def _write_latest(root: Path, name: str) -> None:
    """Point ``root/latest`` at ``name`` the way a save does: a synced temporary file renamed
    over it, then the directory synced (rust/src/checkpoint/publish.rs)."""
    tmp = root / "latest.tmp"
    with tmp.open("w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def group_settings(optimizer: Any) -> list[dict[str, Any]]:
    """The hyper-parameters of each parameter group (everything but the parameters)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def restore_group_settings(optimizer: Any, settings: list[dict[str, Any]]) -> None:
    """Put back what :func:`group_settings` returned after ``load_state_dict`` replaced it with
    the checkpoint's: the run's settings decide the update (they equal the checkpoint's unless
    ``--allow-changes`` let them differ)."""
    for group, saved in zip(optimizer.param_groups, settings, strict=True):
        group.update(saved)


def add_run_flags(parser: Any, config_cls: type[TrainConfig], names: Any, help_texts: dict[str, str]) -> None:
    """The flags every training command (``k2 train``, ``k2 sft``, ``k2 rl``) takes: ``--config``,
    ``--resume``, ``--allow-changes``, ``--no-progress``, and one flag per setting in ``names``
    (a field of ``config_cls``; default None, so :func:`command_config` sees what was given)."""
    import argparse
    import dataclasses

    parser.add_argument("--config", metavar="FILE", help="a TOML file of settings")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its newest complete, verified "
                        "checkpoint, with the settings stored there (flags you give override them)")
    parser.add_argument("--allow-changes", action="store_true",
                        help="with --resume: continue even though training settings (lr, steps, "
                        "batch, ...) differ from the checkpoint's; each difference is printed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for name in names:
        f = fields[name]
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = help_texts[name] + (f" (default: {default!r})" if default not in ([], "") else "")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
        elif f.type in ("list[str]",):
            parser.add_argument(flag, dest=name, nargs="+", default=None, metavar="PATH", help=help_text)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, dest=name, type=kind, default=None, metavar=name.upper(),
                                help=help_text)
