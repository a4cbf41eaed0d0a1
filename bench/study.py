"""What the training studies share (bench/optimizer_compare.py, bench/qk_clip_study.py).

- :func:`ensure_run`: one ``k2 train`` run in its own directory under the study's ``--out``,
  resumable: a finished run (``result.json`` present) is skipped, an interrupted one continues
  from its checkpoint, a run that died before its first checkpoint starts over.
- :class:`Finished`: a finished run's curves, read back from its ``metrics.jsonl``.
- :func:`tokens_to_reach`: where an evaluation curve first reaches a loss (interpolated).
- :func:`print_header`: the machine and versions line every benchmark prints first.

Runs go through :class:`k2.train.pretrain.Trainer` in this process, exactly as ``k2 train`` would run
them with the same settings (the run directory's ``config.json`` says which).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from k2.errors import ConfigError
from k2.train.config import TrainConfig
from k2.train.pretrain import Trainer
from k2.train.metrics import read_metrics
from k2.train.resume import has_checkpoint

RESULT = "result.json"
WHOLE_SPLIT = 1_000_000
"""An ``eval_batches`` beyond any split: every evaluation then reads the whole validation split
(the loop reads ``min(eval_batches, batches in the split)``), so all points of a curve are alike."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study.

    Attributes:
        name: its directory under the study's output directory.
        settings: :class:`TrainConfig` fields (the study's common settings plus this run's own).
    """

    name: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class Finished:
    """A finished run, read back from its directory.

    Attributes:
        name: the run's directory name.
        config: its resolved settings (``config.json``).
        final_val_loss: validation loss on the whole validation split at the last step.
        eval_steps, eval_losses: the validation curve (the last point is the whole split, the
            others ``eval_batches`` fixed batches: the whole split too with :data:`WHOLE_SPLIT`).
        train_steps, train_losses: training loss at each logged step.
        max_logit: per logged step, the largest attention logit of each layer.
        clipped_heads: per logged step, the heads QK-Clip rescaled in each layer.
        step_seconds: median wall-clock seconds of one optimizer step (evaluation and
            checkpoints excluded).
    """

    name: str
    config: dict[str, Any]
    final_val_loss: float
    eval_steps: list[int]
    eval_losses: list[float]
    train_steps: list[int]
    train_losses: list[float]
    max_logit: list[list[float]]
    clipped_heads: list[list[int]]
    step_seconds: float

    @property
    def tokens_per_step(self) -> int:
        c = self.config
        return c["seq_len"] * c["batch_size"] * c["grad_accum"]

    @classmethod
    def read(cls, run_dir: Path) -> Finished:
        """Read a run directory that holds ``config.json`` and ``metrics.jsonl``."""
        config = json.loads((run_dir / "config.json").read_text())
        records = read_metrics(run_dir / "metrics.jsonl")
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        tokens = config["seq_len"] * config["batch_size"] * config["grad_accum"]
        per_step = [tokens / _number(r["tokens_per_s"]) for r in train if _number(r["tokens_per_s"]) > 0]
        return cls(
            name=run_dir.name, config=config,
            final_val_loss=_number(evals[-1]["val_loss"]) if evals else math.nan,
            eval_steps=[r["step"] for r in evals], eval_losses=[_number(r["val_loss"]) for r in evals],
            train_steps=[r["step"] for r in train], train_losses=[_number(r["loss"]) for r in train],
            max_logit=[[_number(v) for v in r["max_logit"]] for r in train],
            clipped_heads=[list(r["clipped_heads"]) for r in train],
            step_seconds=statistics.median(per_step) if per_step else math.nan,
        )


def ensure_run(spec: RunSpec, out: Path, log: Callable[[str], None],
               keep_checkpoints: bool = False) -> Finished:
    """Train ``spec`` under ``out`` unless it already finished there; return its results.

    Args:
        spec: the run.
        out: the study's output directory (the run goes to ``out / spec.name``).
        log: receives one line when the run starts and one when it ends.
        keep_checkpoints: keep the run's checkpoints once it finished (they are removed by
            default: the study needs only the metrics).

    Returns:
        The finished run.

    Raises:
        KeyboardInterrupt: the run was interrupted (Ctrl-C); its checkpoint lets the next call
            continue it.
        ConfigError: ``out`` holds a finished run of that name trained with other settings.
    """
    run_dir = out / spec.name
    if (run_dir / RESULT).exists():
        _check_same_settings(spec, run_dir)
        log(f"{spec.name}: finished earlier, skipped")
        return Finished.read(run_dir)
    resume = has_checkpoint(run_dir)  # `latest` may be missing after a killed first save
    if run_dir.exists() and not resume:  # died before its first checkpoint: start over
        shutil.rmtree(run_dir)
    config = TrainConfig.resolve(**{**spec.settings, "run_dir": str(run_dir)})
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"{spec.name}: {'resuming' if resume else 'training'} ({config.steps} steps)")
    with (run_dir / "train.log").open("a", encoding="utf-8") as trace:
        result = Trainer(config, resume=resume, progress=False,
                         log=lambda line: print(line, file=trace, flush=True)).run()
    if result.interrupted:
        raise KeyboardInterrupt(f"{spec.name} interrupted at step {result.step}")
    finished = Finished.read(run_dir)
    (run_dir / RESULT).write_text(json.dumps({"final_val_loss": finished.final_val_loss,
                                              "step_seconds": finished.step_seconds}) + "\n")
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    log(f"{spec.name}: validation loss {finished.final_val_loss:.4f}, "
        f"{finished.step_seconds:.3f} s/step")
    return finished


def _check_same_settings(spec: RunSpec, run_dir: Path) -> None:
    """Raise :class:`ConfigError` if the finished run in ``run_dir`` was trained otherwise."""
    config = json.loads((run_dir / "config.json").read_text())
    wanted = TrainConfig.resolve(**{**spec.settings, "run_dir": str(run_dir)}).to_dict()
    differ = [f"{k} {config.get(k)!r} (now {v!r})" for k, v in wanted.items()
              if k != "run_dir" and config.get(k) != v]
    if differ:
        raise ConfigError(f"{run_dir} holds a finished run with other settings: {', '.join(differ)}; "
                          "give the study another --out directory")


def tokens_to_reach(run: Finished, target: float) -> float | None:
    """Training tokens after which ``run``'s validation curve first reaches ``target``.

    Linear interpolation between the two evaluations around the crossing (the first
    evaluation's tokens if it already reaches ``target``); None if the curve never gets there.
    """
    previous_tokens, previous_loss = None, None
    for step, loss in zip(run.eval_steps, run.eval_losses):
        tokens = step * run.tokens_per_step
        if loss <= target:
            if previous_loss is None or previous_loss == loss:
                return float(tokens)
            fraction = (previous_loss - target) / (previous_loss - loss)
            return previous_tokens + fraction * (tokens - previous_tokens)
        previous_tokens, previous_loss = tokens, loss
    return None


def loss_or_inf(run: Finished) -> float:
    """The final validation loss, or +inf if it is not finite (for picking the best rate)."""
    return run.final_val_loss if math.isfinite(run.final_val_loss) else math.inf


def print_header(title: str) -> None:
    """The first lines of a study's output: what it is, the machine, the versions."""
    print(f"# {title}")
    print(f"# machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"torch_threads={torch.get_num_threads()} cuda={torch.cuda.is_available()}")
    print(f"# versions: python {platform.python_version()}, torch {torch.__version__}")


def save_figure(fig, path: Path) -> Path:  # noqa: ANN001
    """Lay out, write (PNG, 110 dpi) and close a matplotlib figure; return its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON, atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _number(value: Any) -> float:
    """A metrics value as a float (the log writes NaN and Inf as strings)."""
    return float(value)
