"""Pretraining (``k2 train``): the language-modelling step on the shared run harness.

One run, start to finish:

1. check the settings, resolve the run directory (:class:`k2.train.harness.Harness`) and write
   ``config.json`` and ``environment.json``;
2. prepare the data if ``data_dir`` holds none (rank 0; the others wait);
3. fit the unigram and Kneser–Ney bigram baselines on the training tokens (the bar to beat);
4. build the model from its preset (the same seed gives the same weights on every rank), spread
   it over the ranks with :func:`k2.parallel.parallelize`, and optimize it with MuonClip (or,
   for comparison, AdamW; see ``optimizers.py``) on a WSD schedule;
5. every step (:class:`PretrainJob`): ``grad_accum`` micro-batches of packed documents
   (positions restart at each document, so attention never crosses one), gradient clipping, one
   optimizer step (QK-Clip and the router-bias update included); the harness logs, evaluates
   and checkpoints on its cadence;
6. at the end (or on Ctrl-C): a checkpoint, the final validation loss against the baselines,
   a few sampled continuations of a code prompt, and PNG plots.

``--resume`` restores model, optimizer, loader position and RNG states from the newest complete,
verified checkpoint (``resume.py`` chooses it and checks the settings first, before anything is
written), so on a CPU the resumed run's losses and final weights are bit-identical to an
uninterrupted run's.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.distributed.tensor import DTensor

from k2.errors import ConfigError
from k2.parallel import init_distributed, mean_over_ranks, parallelize
from k2.parallel.fsdp import is_sharded, shard_model, unsharded_copy
from k2.parallel.mesh import build_mesh, check_sizes, mesh_sizes
from k2.parallel.setup import Dist
from k2.train.baseline import BaselineReport, fit_baselines
from k2.train.config import TrainConfig
from k2.train.harness import Cadence, Harness
from k2.train.resume import ResumePoint, check_settings
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


def ensure_data(config: TrainConfig, d: Dist, log: Callable[[str], None]) -> TokenManifest:
    """The manifest of ``config.data_dir``, preparing the data there first if it has none."""
    from k2.data import PrepareOptions, prepare
    from k2.data.manifest import MANIFEST, read_manifest

    if not (Path(config.data_dir) / MANIFEST).exists() and d.main:
        log(f"preparing data in {config.data_dir} (first run only)")
        prepare(PrepareOptions(corpus=tuple(config.corpus), out_dir=Path(config.data_dir),
                               vocab_size=config.vocab_size), log=log, show_progress=False)
    if d.world > 1:
        torch.distributed.barrier()
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


class PretrainJob:
    """The language-modelling step: what :class:`k2.train.harness.Harness` runs for ``k2 train``.

    Args:
        config: the run's settings.
        d: this process's rank, world size and device.
        model: the bare model on ``d.device``.
        log: progress lines (rank 0).
    """

    def __init__(self, config: TrainConfig, d: Dist, model: torch.nn.Module,
                 log: Callable[[str], None]) -> None:
        from k2.data import TokenLoader
        from k2.train.optimizers import build_optimizer, logit_watch

        self.config, self.d, self.model, self.log = config, d, model, log
        self.ep_group = None
        self.mesh = None
        self.fsdp_ep = config.ep > 1 and config.dp_shard > 1
        if config.ep > 1 and type(self) is not PretrainJob:
            raise ConfigError(f"ep: expert parallelism is built for k2 train only, not for "
                              f"{type(self).__name__}; run with ep = 1")
        if self.fsdp_ep:
            # One 2-D mesh (dp_shard x ep), built once: experts split over ep and sharded over
            # dp_shard, the rest sharded over every rank (docs/parallel.md, k2/parallel/fsdp_ep.py).
            from k2.parallel.fsdp_ep import parallelize as parallelize_fsdp_ep

            self.mesh = build_mesh(mesh_sizes(config), d.world, d.device)
            self.wrapped = parallelize_fsdp_ep(
                model, self.mesh, mixed_precision=d.device.type == "cuda" and config.bf16,
                cpu_offload=config.fsdp_cpu_offload)
        elif config.ep > 1:  # expert parallelism (docs/parallel.md): experts split, the rest DDP
            from k2.parallel.expert import expert_group, parallelize_experts

            self.ep_group = expert_group(config.ep)
            self.wrapped = parallelize_experts(model, self.ep_group)
        else:
            # The mesh, built once: None for one process or DDP (--dp-shard 1); else FSDP2
            # shards the model in place over its dp_shard ranks (docs/parallel.md).
            self.mesh = build_mesh(mesh_sizes(config), d.world, d.device)
            self.wrapped = (parallelize(model, d.world) if self.mesh is None else
                            shard_model(model, self.mesh, mixed_precision=d.device.type == "cuda" and config.bf16,
                                        cpu_offload=config.fsdp_cpu_offload))
        self.optimizer = build_optimizer(config, self.wrapped)
        self.watch = logit_watch(self.optimizer, model)  # None when MuonClip reports max logits
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.schedule = WSDSchedule(peak=1.0, total_steps=config.steps, warmup_steps=config.warmup_steps,
                                    decay_fraction=config.decay_fraction, floor=config.min_lr_ratio)
        self.loader = TokenLoader(config.data_dir, config.seq_len, config.batch_size, seed=config.seed,
                                  rank=d.rank, world_size=d.world)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if d.device.type == "cuda" and config.bf16 else nullcontext())
        self.t_last, self.tokens_since = time.perf_counter(), 0

    # ------------------------------------------------------------------ the Job protocol
    def train_step(self, step: int, log: bool) -> dict[str, Any] | None:
        factor = self.schedule(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self.model.train()
        step_loss = self.accumulate()
        grad_norm = self.clip_gradients(self.config.grad_clip if self.config.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        report = self.optimizer.last_report
        layers = self.watch.pop() if self.watch is not None else report.layers
        if not log:
            return None
        now = time.perf_counter()
        elapsed = max(now - self.t_last, 1e-9)
        fields = {"loss": step_loss(), "lr": self.base_lrs[0] * factor, "grad_norm": float(grad_norm),
                  "max_logit": [c.max_logit for c in layers],
                  "clipped_heads": [c.clipped_heads for c in layers],
                  "expert_balance": _balance(report), "tokens_per_s": self.tokens_since / elapsed,
                  **self.throughput(elapsed), "skipped_steps": report.skipped_steps}
        self.t_last, self.tokens_since = now, 0
        return fields

    def accumulate(self) -> Callable[[], float]:
        """Forward and backward over the step's ``grad_accum`` micro-batches (gradients summed
        into the parameters, ready for the optimizer). Returns a function giving the step's
        training loss agreed over ranks, called only on logged steps (it communicates)."""
        cfg, d = self.config, self.d
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(cfg.grad_accum):
            batch = self.loader.next_batch()
            ids, targets, positions = (torch.from_numpy(a).to(d.device, non_blocking=True)
                                       for a in (batch.inputs, batch.targets, batch.positions))
            positions = sample_positions(positions)
            sync = (self.wrapped.no_sync() if d.world > 1 and micro < cfg.grad_accum - 1
                    else nullcontext())
            with sync, self.autocast:
                # The model's loss: the fused head + cross-entropy, plus any balance loss.
                loss = self.wrapped(input_ids=ids, position_ids=positions, targets=targets).loss
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            self.tokens_since += ids.numel() * d.world
        return lambda: mean_over_ranks(loss_sum / cfg.grad_accum)

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients to ``max_norm`` by their global norm (counting every rank's experts
        under expert parallelism); returns that norm."""
        if self.fsdp_ep:  # every rank's local squares, each shard counted once
            from k2.parallel.fsdp_ep import clip_grad_norm_ as clip_fsdp_ep

            return clip_fsdp_ep(self.model, max_norm)
        if self.ep_group is not None:
            from k2.parallel.expert import clip_grad_norm_

            return clip_grad_norm_(self.model, max_norm, self.ep_group)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):  # FSDP2: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        return grad_norm

    def full_view(self):  # noqa: ANN201 - a context manager
        """A context in which the model and optimizer hold every expert (gathered from their
        owners), for checkpoints; a no-op without expert parallelism. Every rank enters it."""
        if self.ep_group is None or self.config.checkpoint_per_rank:  # per-rank: each its experts
            return nullcontext()
        from k2.parallel.expert import gathered_experts

        return gathered_experts(self.model, self.optimizer)

    def unsharded_model(self) -> torch.nn.Module | None:
        """The model with every weight whole, for generation on rank 0 (None on the other ranks
        under expert parallelism or FSDP2). Every rank calls it."""
        if is_sharded(self.model):  # FSDP2: every rank gathers, rank 0 keeps the copy
            return unsharded_copy(self.model, on_rank=0)
        if self.ep_group is None:
            return self.model
        from k2.parallel.expert import full_state_dict

        state = full_state_dict(self.model)
        if not self.d.main:
            return None
        full = type(self.model)(self.model.config).to(self.d.device)
        full.load_state_dict(state)
        return full

    def throughput(self, elapsed: float) -> dict[str, float]:
        """Extra per-log-interval rates of a job (none for pretraining); ``elapsed`` seconds
        since the last logged step."""
        return {}

    def progress(self, fields: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{fields['loss']:.3f}", "tok_s": f"{fields['tokens_per_s']:,.0f}",
                "lr": f"{fields['lr']:.2e}", "max_logit": f"{max(fields['max_logit'], default=0):.1f}"}

    @torch.no_grad()
    def evaluate(self, step: int, final: bool) -> dict[str, float]:
        """Mean validation loss over ``eval_batches`` batches per rank, or every batch of the
        split when ``final`` (the same batches every time: a fresh loader with the run's seed)."""
        val_loss = self.validation_loss(full=final)
        self.log(f"step {step}: validation loss {val_loss:.4f}")
        return {"val_loss": val_loss}

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])

    # ------------------------------------------------------------------ helpers
    @torch.no_grad()
    def validation_loss(self, full: bool = False) -> float:
        """Mean validation loss (see :meth:`evaluate`)."""
        from k2.data import TokenLoader

        cfg, d, model = self.config, self.d, self.model
        val = TokenLoader(cfg.data_dir, cfg.seq_len, cfg.batch_size, seed=cfg.seed, rank=d.rank,
                          world_size=d.world, split="validation", prefetch=1, threads=1)
        model.eval()
        total, count = torch.zeros((), device=d.device), 0
        for _ in range(len(val) if full else min(cfg.eval_batches, len(val))):
            batch = val.next_batch()
            ids, targets, positions = (torch.from_numpy(a).to(d.device)
                                       for a in (batch.inputs, batch.targets, batch.positions))
            positions = sample_positions(positions)
            with self.autocast:
                logits = model(input_ids=ids, position_ids=positions).logits
            total += torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            count += 1
        model.train()
        return mean_over_ranks(total / max(count, 1))


class Trainer:
    """One pretraining run. Build it, then call :meth:`run`.

    Args:
        config: the resolved configuration.
        resume: continue from the newest complete, verified checkpoint in ``config.run_dir``.
        log: receives human-readable progress lines (rank 0 only).
        progress: draw a progress bar.
        resume_point: the checkpoint to resume from, when already chosen
            (:func:`k2.train.resume.resume_config` returns it with the stored settings).
        allow_changes: let a resume continue with training settings that differ from the
            checkpoint's (each difference is printed); otherwise a difference is an error.
    """

    def __init__(self, config: TrainConfig, resume: bool = False,
                 log: Callable[[str], None] = print, progress: bool = True, *,
                 resume_point: ResumePoint | None = None, allow_changes: bool = False) -> None:
        from k2.model import K2Config

        self.config = config
        self.d = init_distributed(config.device)
        if config.ep == 1 or config.dp_shard > 1:  # before any work: sizes against the world
            check_sizes(mesh_sizes(config), self.d.world)
        self.model_config = K2Config.from_preset(config.preset)
        if config.ep > 1:  # ep alone spans every rank; with --dp-shard the product does
            from k2.parallel.expert import check_ep

            check_ep(config.ep, self.d.world, self.model_config.n_routed_experts, config.dp_shard)
        if config.seq_len > self.model_config.max_position_embeddings:
            raise ConfigError(
                f"seq_len {config.seq_len} is longer than the {config.preset} model allows "
                f"(max_position_embeddings = {self.model_config.max_position_embeddings})")
        self.harness = Harness(Path(config.run_dir), self.d, resume=resume, resume_point=resume_point,
                               log=log, progress=progress)
        self.run_dir = self.harness.run_dir
        self.log = self.harness.log
        if resume:  # decided before anything in the run directory is written (resume.py)
            check_settings(config, self.harness.resume_point, allow_changes, self.log)
            self.harness.barrier()  # rank 0 may move rejected checkpoints once every rank chose

    @property
    def interrupted(self) -> bool:
        return self.harness.interrupted

    def run(self) -> RunResult:
        from k2.model import K2ForCausalLM

        cfg, d, harness = self.config, self.d, self.harness
        harness.write_records(cfg.to_dict())
        manifest = ensure_data(cfg, d, self.log)
        if manifest.vocab_size > self.model_config.vocab_size:
            raise ConfigError(f"the data's vocabulary ({manifest.vocab_size}) is larger than the "
                              f"{cfg.preset} model's ({self.model_config.vocab_size}); prepare "
                              f"it with --vocab-size {self.model_config.vocab_size}")

        torch.manual_seed(cfg.seed)
        model = K2ForCausalLM(self.model_config).to(d.device)
        total, active = model.parameter_counts()
        self.log(f"model: {cfg.preset}, {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active)")
        job = PretrainJob(cfg, d, model, self.log)
        # Sharded runs write and read per-rank checkpoints unless told not to (docs/checkpoints.md).
        harness.per_rank_checkpoints = cfg.checkpoint_per_rank and (cfg.dp_shard > 1 or cfg.ep > 1)
        with job.full_view():  # a checkpoint holds every expert, whatever the ep it was saved at
            start = harness.restore(job)

        baseline = self._baselines(manifest) if d.main else None
        metrics = harness.open_metrics()
        if metrics is not None and baseline is not None and start == 0:
            metrics.write(0, "baseline", unigram_nats=baseline.unigram_nats,
                          bigram_nats=baseline.bigram_nats)

        cadence = Cadence(cfg.steps, cfg.log_every, cfg.eval_every, cfg.save_every, cfg.keep_last)

        def save(step: int) -> None:
            with job.full_view():
                harness.save(job, step, keep_last=cfg.keep_last, config=cfg.to_dict(),
                             tokenizer_dir=cfg.data_dir)

        result = harness.loop(job, cadence, start, save=save)
        val_loss = result.last_eval["val_loss"] if result.last_eval else None

        samples: list[str] = []
        if not result.interrupted:
            whole = job.unsharded_model()  # every rank takes part under EP and FSDP2
            if d.main:
                samples = self.sample(whole.to(d.device), manifest)
                self._summary(val_loss, baseline, samples)
        harness.finish()
        return RunResult(self.run_dir, result.step, val_loss, baseline, result.interrupted, samples)

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
