"""The pretraining loop behind ``k2 train``.

One run, start to finish:

1. resolve the run directory (a fresh ``runs/tiny`` becomes ``runs/tiny-1``, ``-2``, ... rather
   than touching an earlier run) and write ``config.json`` and ``environment.json``;
2. prepare the data if ``data_dir`` holds none (rank 0; the others wait);
3. fit the unigram and Kneser–Ney bigram baselines on the training tokens (the bar to beat);
4. build the model from its preset (the same seed gives the same weights on every rank), wrap it
   in DDP under ``torchrun``, and optimize it with MuonClip (or, for comparison, AdamW; see
   ``optimizers.py``) on a WSD schedule;
5. every step: ``grad_accum`` micro-batches of packed documents (positions restart at each
   document, so attention never crosses one), gradient clipping, one optimizer step (QK-Clip and
   the router-bias update included); every ``log_every`` steps a metrics line; every
   ``eval_every`` steps a validation pass; every ``save_every`` steps a checkpoint;
6. at the end (or on Ctrl-C): a checkpoint, the final validation loss against the baselines,
   a few sampled continuations of a code prompt, and PNG plots.

``--resume`` restores model, optimizer, loader position and RNG states from the newest complete,
verified checkpoint (``resume.py`` chooses it and checks the settings first, before anything is
written), so on a CPU the resumed run's losses and final weights are bit-identical to an
uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from k2.errors import ConfigError
from k2.train.baseline import BaselineReport, fit_baselines
from k2.train.config import TrainConfig
from k2.train.metrics import MetricsLog, read_metrics
from k2.train.resume import (CHECKPOINTS, ResumePoint, check_settings, commit_resume,
                             find_resume_point, group_settings, restore_group_settings)
from k2.train.schedule import WSDSchedule

if TYPE_CHECKING:
    from k2.data.manifest import TokenManifest


@dataclass
class RunResult:
    """What a finished (or interrupted) run reached."""

    run_dir: Path
    step: int
    val_loss: float | None
    baseline: BaselineReport | None
    interrupted: bool
    samples: list[str]


# ---------------------------------------------------------------------------- set-up helpers

@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the ``torchrun`` process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for, but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} was asked for, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank, world, dev)


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


def ensure_data(config: TrainConfig, d: Dist, log: Callable[[str], None]) -> TokenManifest:
    """The manifest of ``config.data_dir``, preparing the data there first if it has none."""
    from k2.data import PrepareOptions, prepare
    from k2.data.manifest import MANIFEST, read_manifest

    if not (Path(config.data_dir) / MANIFEST).exists() and d.main:
        log(f"preparing data in {config.data_dir} (first run only)")
        prepare(PrepareOptions(corpus=tuple(config.corpus), out_dir=Path(config.data_dir),
                               vocab_size=config.vocab_size), log=log, show_progress=False)
    if d.world > 1:
        dist.barrier()
    return read_manifest(config.data_dir)


def sample_positions(positions: torch.Tensor) -> torch.Tensor:
    """Position ids that count from each sample's first token.

    The loader gives each token's position within its document, so a sample cut from the middle
    of a long document starts at a large position. RoPE only sees position differences, so
    shifting the sample's first (partial) document to start at 0 changes nothing but keeps every
    position below the model's maximum; later documents in the sample already start at 0.

    Args:
        positions: [B, T] positions within documents (0 at every document start).

    Returns:
        [B, T] positions, 0 at the sample start and at every document start.
    """
    first_document = torch.cumsum(positions == 0, dim=1) == 0  # before the first restart
    return torch.where(first_document, positions - positions[:, :1], positions)


# ---------------------------------------------------------------------------- the run

class Trainer:
    """One pretraining run. Build it, then call :meth:`run`.

    Args:
        config: the resolved configuration.
        resume: continue from the newest checkpoint in ``config.run_dir``.
        log: receives human-readable progress lines (rank 0 only).
        progress: draw a progress bar.
    """

    def __init__(self, config: TrainConfig, resume: bool = False,
                 log: Callable[[str], None] = print, progress: bool = True, *,
                 resume_point: ResumePoint | None = None, allow_changes: bool = False) -> None:
        from k2.model import K2Config

        self.config = config
        self.resume = resume
        self.d = init_distributed(config.device)
        self._log = log
        self.progress = progress and self.d.main
        self.model_config = K2Config.from_preset(config.preset)
        if config.seq_len > self.model_config.max_position_embeddings:
            raise ConfigError(
                f"seq_len {config.seq_len} is longer than the {config.preset} model allows "
                f"(max_position_embeddings = {self.model_config.max_position_embeddings})")
        run_dir = Path(config.run_dir)
        self.resume_point = None
        if resume:
            # Which checkpoint, and whether the settings may continue from it: decided before
            # anything in the run directory is written (resume.py).
            self.resume_point = resume_point or find_resume_point(run_dir)
            for note in self.resume_point.notes:
                self.log(note)
            check_settings(config, self.resume_point, allow_changes, self.log)
            if self.d.world > 1:  # rank 0 may move rejected checkpoints once every rank chose
                dist.barrier()
        else:
            run_dir = fresh_run_dir(run_dir)
            if self.d.world > 1:  # every rank must agree on the directory rank 0 chose
                chosen = [str(run_dir)]
                dist.broadcast_object_list(chosen, src=0)
                run_dir = Path(chosen[0])
        self.run_dir = run_dir
        self.interrupted = False

    def log(self, text: str) -> None:
        if self.d.main:
            self._log(text)

    # ------------------------------------------------------------------ main entry
    def run(self) -> RunResult:
        from torch.nn.parallel import DistributedDataParallel

        from k2 import checkpoint
        from k2.data import TokenLoader
        from k2.model import K2ForCausalLM
        from k2.train.optimizers import build_optimizer, logit_watch

        cfg, d = self.config, self.d
        if d.main and not self.resume:  # a resume writes them once its checkpoint has loaded
            self._write_run_files()
        self.log(f"run directory: {self.run_dir}")
        manifest = ensure_data(cfg, d, self.log)
        if manifest.vocab_size > self.model_config.vocab_size:
            raise ConfigError(f"the data's vocabulary ({manifest.vocab_size}) is larger than the "
                              f"{cfg.preset} model's ({self.model_config.vocab_size}); prepare "
                              f"it with --vocab-size {self.model_config.vocab_size}")

        torch.manual_seed(cfg.seed)
        model = K2ForCausalLM(self.model_config).to(d.device)
        total, active = model.parameter_counts()
        self.log(f"model: {cfg.preset}, {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active)")
        wrapped = DistributedDataParallel(model) if d.world > 1 else model
        optimizer = build_optimizer(cfg, wrapped)
        watch = logit_watch(optimizer, model)  # None when MuonClip reports the max logits itself
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        schedule = WSDSchedule(peak=1.0, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                               decay_fraction=cfg.decay_fraction, floor=cfg.min_lr_ratio)
        loader = TokenLoader(cfg.data_dir, cfg.seq_len, cfg.batch_size, seed=cfg.seed,
                             rank=d.rank, world_size=d.world)

        ckpt_root = self.run_dir / CHECKPOINTS
        start = 0
        if self.resume:
            point = self.resume_point
            settings = group_settings(optimizer)  # the configuration's, not the checkpoint's
            result = checkpoint.load(point.path, model, optimizer, verify=False)  # verified
            restore_group_settings(optimizer, settings)
            state = result.train_state
            start = int(state["step"])
            loader.load_state_dict(state["loader"])
            if d.main:  # everything checked and loaded: only now touch the run directory
                commit_resume(point, self.run_dir, self.log)
                self._write_run_files()
                _truncate_metrics(self.run_dir / "metrics.jsonl", start)
            self.log(f"resumed from {result.path} at step {start}")

        baseline = self._baselines(manifest) if d.main else None
        metrics = MetricsLog(self.run_dir / "metrics.jsonl") if d.main else None
        if metrics is not None and baseline is not None and start == 0:
            metrics.write(0, "baseline", unigram_nats=baseline.unigram_nats,
                          bigram_nats=baseline.bigram_nats)

        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if d.device.type == "cuda" and cfg.bf16 else nullcontext())
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        bar = _progress_bar(cfg.steps, start) if self.progress else None
        val_loss = None
        step = start
        t_last, tokens_since = time.perf_counter(), 0
        t_start = time.perf_counter()
        try:
            while step < cfg.steps:
                factor = schedule(step)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
                model.train()
                loss_sum = torch.zeros((), device=d.device)
                for micro in range(cfg.grad_accum):
                    batch = loader.next_batch()
                    ids, targets, positions = (torch.from_numpy(a).to(d.device, non_blocking=True)
                                               for a in (batch.inputs, batch.targets, batch.positions))
                    positions = sample_positions(positions)
                    sync = (wrapped.no_sync() if d.world > 1 and micro < cfg.grad_accum - 1
                            else nullcontext())
                    with sync, autocast:
                        # The model's loss: the fused head + cross-entropy, plus any balance loss.
                        loss = wrapped(input_ids=ids, position_ids=positions, targets=targets).loss
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach()
                    tokens_since += ids.numel() * d.world
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                report = optimizer.last_report
                layers = watch.pop() if watch is not None else report.layers

                if step % cfg.log_every == 0 or step == cfg.steps:
                    train_loss = self._mean_over_ranks(loss_sum / cfg.grad_accum)
                    now = time.perf_counter()
                    tps = tokens_since / max(now - t_last, 1e-9)
                    t_last, tokens_since = now, 0
                    if metrics is not None:
                        metrics.write(step, "train", loss=train_loss, lr=base_lrs[0] * factor,
                                      grad_norm=float(grad_norm),
                                      max_logit=[c.max_logit for c in layers],
                                      clipped_heads=[c.clipped_heads for c in layers],
                                      expert_balance=_balance(report), tokens_per_s=tps,
                                      skipped_steps=report.skipped_steps,
                                      wall_s=now - t_start)
                    if bar is not None:
                        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}",
                                        lr=f"{base_lrs[0] * factor:.2e}",
                                        max_logit=f"{max((c.max_logit for c in layers), default=0):.1f}")
                if bar is not None:
                    bar.update(1)
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    # The last pass reads the whole validation split, like the baselines.
                    val_loss = self.evaluate(model, autocast, full=step == cfg.steps)
                    if metrics is not None:
                        metrics.write(step, "eval", val_loss=val_loss)
                    self.log(f"step {step}: validation loss {val_loss:.4f}")
                stop = self._agree_interrupt()
                if step % cfg.save_every == 0 or step == cfg.steps or stop:
                    self._save(checkpoint, ckpt_root, model, optimizer, loader, step, manifest)
                if stop:
                    self.interrupted = True
                    self.log(f"interrupted: saved step {step}; continue with "
                             f"`k2 train --resume --run-dir {self.run_dir}`")
                    break
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()

        samples: list[str] = []
        if d.main:
            if not self.interrupted:
                samples = self.sample(model, manifest)
                self._summary(val_loss, baseline, samples)
            from k2.train.plots import plot_run

            plot_run(self.run_dir)
        if d.world > 1:
            dist.barrier()
        return RunResult(self.run_dir, step, val_loss, baseline, self.interrupted, samples)

    # ------------------------------------------------------------------ pieces
    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        (self.run_dir / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")

    def _on_sigint(self, signum, frame) -> None:  # noqa: ANN001
        if self.interrupted:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.interrupted = True
        self.log("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def _agree_interrupt(self) -> bool:
        """Whether Ctrl-C reached any rank (all ranks stop at the same step)."""
        flag = self.interrupted
        if self.d.world > 1:
            t = torch.tensor([float(flag)], device=self._collective_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def _collective_device(self) -> torch.device:
        return self.d.device if self.d.device.type == "cuda" else torch.device("cpu")

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.d.world > 1:
            value = value.detach().to(self._collective_device()).clone()
            dist.all_reduce(value)
            value /= self.d.world
        return float(value)

    def _save(self, checkpoint, root, model, optimizer, loader, step, manifest) -> None:  # noqa: ANN001
        state = {"step": step, "loader": loader.state_dict(), "config": self.config.to_dict()}
        if self.d.main:
            checkpoint.save(root, model, optimizer, state, keep_last=self.config.keep_last,
                            tokenizer_dir=self.config.data_dir)
        if self.d.world > 1:
            dist.barrier()

    @torch.no_grad()
    def evaluate(self, model, autocast, full: bool = False) -> float:  # noqa: ANN001
        """Mean validation loss over ``eval_batches`` batches per rank, or every batch of the
        split when ``full`` (the same batches every time: a fresh loader with the run's seed)."""
        from k2.data import TokenLoader

        cfg, d = self.config, self.d
        val = TokenLoader(cfg.data_dir, cfg.seq_len, cfg.batch_size, seed=cfg.seed, rank=d.rank,
                          world_size=d.world, split="validation", prefetch=1, threads=1)
        model.eval()
        total, count = torch.zeros((), device=d.device), 0
        for _ in range(len(val) if full else min(cfg.eval_batches, len(val))):
            batch = val.next_batch()
            ids, targets, positions = (torch.from_numpy(a).to(d.device)
                                       for a in (batch.inputs, batch.targets, batch.positions))
            positions = sample_positions(positions)
            with autocast:
                logits = model(input_ids=ids, position_ids=positions).logits
            total += torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            count += 1
        model.train()
        return self._mean_over_ranks(total / max(count, 1))

    def _baselines(self, manifest: TokenManifest) -> BaselineReport:
        from k2.data import load_tokenizer, read_tokens

        t0 = time.perf_counter()
        train = read_tokens(self.config.data_dir, "train")
        valid = read_tokens(self.config.data_dir, "validation")
        tokenizer = load_tokenizer(self.config.data_dir)
        valid_bytes = len(tokenizer.decode(valid.tolist(), skip_special_tokens=False).encode())
        report = fit_baselines(train, valid, manifest.vocab_size, valid_bytes=valid_bytes)
        self.log(f"baselines on {len(valid):,} validation tokens ({time.perf_counter() - t0:.1f} s): "
                 f"unigram {report.unigram_nats:.3f} nats/token, Kneser–Ney bigram "
                 f"{report.bigram_nats:.3f} nats/token ({report.bits_per_byte(report.bigram_nats):.3f} "
                 "bits/byte) — the model must beat the bigram")
        return report

    @torch.no_grad()
    def sample(self, model, manifest: TokenManifest) -> list[str]:  # noqa: ANN001
        """Continuations of ``sample_prompt`` (temperature 0.8, top-p 0.95), seeded."""
        from k2.data import load_tokenizer

        cfg = self.config
        if cfg.num_samples == 0 or cfg.sample_tokens == 0:
            return []
        tokenizer = load_tokenizer(cfg.data_dir)
        prompt = tokenizer.encode(cfg.sample_prompt).ids
        generator = torch.Generator(device=self.d.device).manual_seed(cfg.seed)
        model.eval()
        ids = model.generate([prompt] * cfg.num_samples, max_new_tokens=cfg.sample_tokens,
                             temperature=0.8, top_p=0.95, stop_tokens=[manifest.eod_token_id],
                             generator=generator)
        texts = [cfg.sample_prompt + tokenizer.decode(list(seq)) for seq in ids]
        with (self.run_dir / "samples.txt").open("w") as f:
            for i, text in enumerate(texts):
                f.write(f"--- sample {i} ---\n{text}\n")
        return texts

    def _summary(self, val_loss, baseline, samples) -> None:  # noqa: ANN001
        if val_loss is not None and baseline is not None:
            bpb = baseline.bits_per_byte
            margin = baseline.bigram_nats - val_loss
            self.log("")
            self.log(f"{'':24}{'nats/token':>12}{'bits/byte':>12}")
            for name, nats in (("unigram", baseline.unigram_nats),
                               ("Kneser–Ney bigram", baseline.bigram_nats),
                               (f"k2 {self.config.preset}", val_loss)):
                self.log(f"{name:<24}{nats:>12.4f}{bpb(nats) or float('nan'):>12.4f}")
            verdict = "beats" if margin > 0 else "does NOT beat"
            self.log(f"the model {verdict} the bigram baseline by {margin:+.4f} nats/token")
        for i, text in enumerate(samples):
            self.log(f"--- sample {i} ---\n{text}")


def _balance(report) -> list[float]:  # noqa: ANN001
    """Per MoE layer: the busiest expert's load over the mean load (1.0 is perfect balance)."""
    loads = getattr(report, "expert_loads", ()) or ()
    return [float(l.max() / l.mean()) if l.sum() > 0 else 1.0 for l in loads]


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
