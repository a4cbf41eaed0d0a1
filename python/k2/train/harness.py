"""The run harness every training command shares: ``k2 train`` today, ``k2 sft`` and ``k2 rl``
next.

A training command is a :class:`Job` (what one optimizer step does, how to evaluate, what extra
state a checkpoint must carry) run by a :class:`Harness`, which owns everything else:

* the run directory: a fresh ``runs/NAME`` becomes ``runs/NAME-1``, ``-2``, ... rather than
  touching an earlier run; ``--resume`` continues the named one; every rank agrees on it;
* the records beside the run: ``config.json`` and ``environment.json`` (versions, git commit,
  machine), written only once the settings have been checked;
* ``metrics.jsonl`` (:class:`k2.train.metrics.MetricsLog`) and the PNG plots drawn from it;
* the cadence: a metrics line every ``log_every`` steps, an evaluation every ``eval_every``,
  a checkpoint every ``save_every`` and at the end, through :mod:`k2.checkpoint` (crash-safe,
  ``keep_last`` kept);
* exact resume: model, optimizer, the job's state (loader positions) and RNG states come back
  from the newest complete checkpoint that verifies (:mod:`k2.train.resume` chooses it, looking
  past a ``latest`` that a killed save left behind), and metrics past it are dropped, so a
  resumed CPU run is bit-identical to an uninterrupted one; nothing in the run directory is
  written until that checkpoint has loaded;
* Ctrl-C: the current step finishes, every rank agrees to stop at the same step, a checkpoint is
  saved and the run ends as interrupted (a second Ctrl-C aborts at once);
* a progress bar on rank 0.

The design is in ``docs/training.md``.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist

from k2.parallel.agree import any_rank
from k2.parallel.failure import raise_if_rank_lost
from k2.parallel.fsdp import is_sharded, load_checkpoint, save_checkpoint
from k2.parallel.setup import Dist
from k2.train.metrics import MetricsLog, read_metrics
from k2.train.resume import (CHECKPOINTS, ResumePoint, commit_resume, find_resume_point,
                             group_settings, restore_group_settings)


@dataclass(frozen=True)
class Cadence:
    """How often the harness logs, evaluates and saves, and for how long it runs.

    Attributes:
        steps: optimizer steps in the whole run.
        log_every: a metrics line every this many steps (and at the last one).
        eval_every: an evaluation every this many steps (and at the last one).
        save_every: a checkpoint every this many steps (and at the last one, and on Ctrl-C).
        keep_last: checkpoints kept on disk.
    """

    steps: int
    log_every: int
    eval_every: int
    save_every: int
    keep_last: int


class Job(Protocol):
    """What a training command plugs into the harness."""

    model: torch.nn.Module
    """The bare model (checkpoints and evaluation use it; the step may call a wrapper)."""
    optimizer: torch.optim.Optimizer

    def train_step(self, step: int, log: bool) -> dict[str, Any] | None:
        """Run optimizer step number ``step`` (0-based). When ``log``, return the metrics line's
        fields (collectives allowed: every rank calls with the same ``log``), else None."""

    def evaluate(self, step: int, final: bool) -> dict[str, float]:
        """Evaluate after ``step`` steps (``final``: the run's last evaluation) and say so; return
        the fields of the metrics line of kind ``eval``."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint's training state must carry besides the step and the config (e.g.
        loader positions); keys ``step`` and ``config`` are the harness's."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint's training state (holding :meth:`state_dict`'s keys)."""

    def progress(self, fields: dict[str, Any]) -> dict[str, str]:
        """The progress bar's postfix for a metrics line's fields."""


@dataclass
class LoopResult:
    """Where the loop ended."""

    step: int
    interrupted: bool
    last_eval: dict[str, float] | None


def fresh_run_dir(path: Path) -> Path:
    """``path`` if it holds no run yet, else the first free ``path-1``, ``path-2``, ..."""
    def used(p: Path) -> bool:
        return (p / "metrics.jsonl").exists() or (p / CHECKPOINTS).exists()

    if not used(path):
        return path
    n = 1
    while used(path.with_name(f"{path.name}-{n}")):
        n += 1
    return path.with_name(f"{path.name}-{n}")


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded beside every run."""
    from k2 import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "k2": __version__, "git_commit": commit, "torch": torch.__version__,
        "numpy": np.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)
        if torch.cuda.is_available() else None,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


class Harness:
    """One run's directory, records, metrics, checkpoints, Ctrl-C and progress.

    Args:
        run_dir: the run directory asked for (a fresh run may get ``run_dir-N`` instead).
        d: this process's rank, world size and device.
        resume: continue the run in ``run_dir`` from its newest complete, verified checkpoint.
        resume_point: that checkpoint, when the caller has chosen it already
            (:func:`k2.train.resume.find_resume_point`).
        log: receives human-readable progress lines (printed on rank 0 only).
        progress: draw a progress bar (rank 0 only).

    Raises:
        CheckpointError: ``resume`` and no checkpoint of ``run_dir`` verifies.
    """

    def __init__(self, run_dir: Path, d: Dist, *, resume: bool = False,
                 resume_point: ResumePoint | None = None,
                 log: Callable[[str], None] = print, progress: bool = True) -> None:
        self.d = d
        self.resume = resume
        self._log = log
        self.progress = progress and d.main
        self.resume_point: ResumePoint | None = None
        self._records: dict[str, Any] | None = None
        run_dir = Path(run_dir)
        if resume:
            self.resume_point = resume_point or find_resume_point(run_dir)
            for note in self.resume_point.notes:
                self.log(note)
        else:
            run_dir = fresh_run_dir(run_dir)
            if d.world > 1:  # every rank must agree on the directory rank 0 chose
                chosen = [str(run_dir)]
                dist.broadcast_object_list(chosen, src=0)
                run_dir = Path(chosen[0])
        self.run_dir = run_dir
        self.checkpoints = run_dir / CHECKPOINTS
        self.metrics: MetricsLog | None = None
        self.interrupted = False
        self.per_rank_checkpoints = False
        """Every rank saves and loads its own rows (k2.parallel.sharded_checkpoint); the command
        turns it on for sharded runs."""

    def log(self, text: str) -> None:
        """Print a progress line (rank 0 only)."""
        if self.d.main:
            self._log(text)

    def barrier(self) -> None:
        """Wait for every rank (a no-op alone)."""
        if self.d.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------ records and metrics
    def write_records(self, config: dict[str, Any]) -> None:
        """Write ``config.json`` and ``environment.json`` (rank 0) once the settings are known
        to be good; a resume writes them only after its checkpoint has loaded (:meth:`restore`),
        so a failed resume leaves the run's records as they were."""
        self._records = config
        if self.d.main and not self.resume:
            self._write_records()
        self.log(f"run directory: {self.run_dir}")

    def _write_records(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(self._records, indent=2) + "\n")
        (self.run_dir / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")

    def open_metrics(self) -> MetricsLog | None:
        """The run's metrics log (rank 0; None elsewhere)."""
        if self.d.main and self.metrics is None:
            self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        return self.metrics

    # ------------------------------------------------------------------ checkpoints
    def restore(self, job: Job) -> int:
        """Load the resume checkpoint into ``job`` (model, optimizer tensors, its state, RNG
        states); only then repair ``latest``, write the records and drop metrics past the
        checkpoint. Returns the step to continue from (0 for a fresh run).

        The optimizer's hyper-parameters (learning rates, weight decay, ...) stay the ones the
        job was built with, not the checkpoint's: the settings check of :mod:`k2.train.resume`
        has already decided they may differ (``--allow-changes``) or that they agree."""
        if not self.resume:
            return 0
        from k2 import checkpoint

        point = self.resume_point
        assert point is not None
        settings = group_settings(job.optimizer)  # the configuration's, not the checkpoint's
        if self.per_rank_checkpoints:  # each rank reads only its rows (docs/checkpoints.md)
            from k2.parallel.sharded_checkpoint import load_sharded

            result = load_sharded(point.path, job.model, job.optimizer, verify=False)
        elif is_sharded(job.model):  # FSDP2: whole tensors from the files, each rank keeps its rows
            result = load_checkpoint(point.path, job.model, job.optimizer, verify=False)
        else:
            result = checkpoint.load(point.path, job.model, job.optimizer, verify=False)  # verified
        restore_group_settings(job.optimizer, settings)
        state = result.train_state
        start = int(state["step"])
        job.load_state_dict(state)
        if self.d.main:  # everything checked and loaded: only now touch the run directory
            commit_resume(point, self.run_dir, self.log)
            if self._records is not None:
                self._write_records()
            _truncate_metrics(self.run_dir / "metrics.jsonl", start)
        self.log(f"resumed from {result.path} at step {start}")
        return start

    def save(self, job: Job, step: int, *, keep_last: int, config: dict[str, Any],
             tokenizer_dir: str | Path | None = None) -> None:
        """A checkpoint of ``job`` after ``step`` steps (rank 0 writes, or every rank its rows with
        :attr:`per_rank_checkpoints`; every rank waits)."""
        from k2 import checkpoint

        state = {"step": step, **job.state_dict(), "config": config}
        if self.per_rank_checkpoints:  # every rank writes its rows; one manifest, one commit
            save_checkpoint(self.checkpoints, job.model, job.optimizer, state, keep_last=keep_last,
                            tokenizer_dir=tokenizer_dir, per_rank=True)
        elif is_sharded(job.model):  # FSDP2: every rank gathers, rank 0 writes whole tensors
            save_checkpoint(self.checkpoints, job.model, job.optimizer, state, keep_last=keep_last,
                            tokenizer_dir=tokenizer_dir)
        elif self.d.main:
            checkpoint.save(self.checkpoints, job.model, job.optimizer, state, keep_last=keep_last,
                            tokenizer_dir=tokenizer_dir)
        self.barrier()

    # ------------------------------------------------------------------ the loop
    def loop(self, job: Job, cadence: Cadence, start: int, *,
             save: Callable[[int], None]) -> LoopResult:
        """Run ``job`` from step ``start`` to ``cadence.steps`` with the harness's cadence.

        Args:
            job: the training command's step, evaluation and state.
            cadence: steps, and how often to log, evaluate and save.
            start: the first step (from :meth:`restore`).
            save: writes a checkpoint after the given step (usually :meth:`save` bound to the
                command's settings).
        """
        metrics = self.open_metrics()
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        bar = _progress_bar(cadence.steps, start) if self.progress else None
        last_eval: dict[str, float] | None = None
        step = start
        t_start = time.perf_counter()
        try:
            while step < cadence.steps:
                last = step + 1 == cadence.steps
                log_now = (step + 1) % cadence.log_every == 0 or last
                fields = job.train_step(step, log_now)
                step += 1
                if fields is not None:
                    if metrics is not None:
                        metrics.write(step, "train", **fields, wall_s=time.perf_counter() - t_start)
                    if bar is not None:
                        bar.set_postfix(job.progress(fields))
                if bar is not None:
                    bar.update(1)
                if step % cadence.eval_every == 0 or last:
                    last_eval = job.evaluate(step, final=last)
                    if metrics is not None:
                        metrics.write(step, "eval", **last_eval)
                stop = any_rank(self.interrupted)
                if step % cadence.save_every == 0 or last or stop:
                    save(step)
                if stop:
                    self.interrupted = True
                    self.log(f"interrupted: saved step {step}; continue with --resume --run-dir "
                             f"{self.run_dir}")
                    break
        except Exception as err:  # a rank gone mid-step: name it on every survivor
            raise_if_rank_lost(err, f"step {step + 1}")
            raise
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
                self.metrics = None
        return LoopResult(step, self.interrupted, last_eval)

    def finish(self) -> None:
        """Draw the run's plots (rank 0) and wait for every rank."""
        if self.d.main:
            from k2.train.plots import plot_run

            plot_run(self.run_dir)
        self.barrier()

    def _on_sigint(self, signum, frame) -> None:  # noqa: ANN001
        if self.interrupted:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.interrupted = True
        self.log("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort)")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (they are about to be recomputed), atomically."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _progress_bar(total: int, initial: int):  # noqa: ANN202
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)
