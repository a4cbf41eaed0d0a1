"""Supervised fine-tuning (``k2 sft``): chat data, loss on the assistant's tokens only, on the
shared run harness.

One run:

1. check the settings and resolve the run directory (:class:`k2.train.harness.Harness`);
2. find the model to start from (:func:`resolve_init`): a k2 run directory (its newest
   checkpoint) or a checkpoint directory (a k2 checkpoint, or a Hub-layout export such as
   ``k2 ckpt export-hf`` writes), with its tokenizer;
3. prepare the chat JSONL once into shards whose loss mask is 1 on assistant tokens
   (:func:`k2.data.sft.prepare_sft`; under ``RUN/data`` unless ``data_dir`` says otherwise);
4. train with MuonClip (QK-Clip on) on a WSD schedule: each step (:class:`SFTJob`) is the mean
   cross-entropy over the step's masked target tokens, so system, user and tool text and the
   padding between packed conversations give no gradient; the harness logs, evaluates,
   checkpoints, resumes exactly and handles Ctrl-C as for ``k2 train``.

The design is in docs/sft.md.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from k2.errors import CheckpointError, ConfigError
from k2.parallel import init_distributed, mean_over_ranks
from k2.parallel.setup import Dist
from k2.train.config import HELP, TrainConfig
from k2.train.harness import Cadence, Harness
from k2.train.pretrain import PretrainJob, sample_positions
from k2.train.resume import ResumePoint, check_settings

CUSTOM_PRESET = "custom"
"""``preset`` of a run whose model shape matches no preset (taken from the init's config.json)."""
IGNORE_INDEX = -100
"""The target value the model's loss skips (k2.model.loss)."""


@dataclass
class SFTConfig(TrainConfig):
    """``k2 train``'s settings with SFT's defaults, plus where to start and what to learn.

    ``preset`` is not chosen: it is the init model's (or ``custom``). ``data_dir`` is where the
    prepared shards go (empty: ``RUN_DIR/data``).
    """

    run_dir: str = "runs/sft"
    data_dir: str = ""
    seq_len: int = 1024
    batch_size: int = 4
    steps: int = 300
    lr: float = 2e-3
    adamw_lr: float = 1e-3
    warmup_steps: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    num_samples: int = 0
    init: str = ""
    data: list[str] = field(default_factory=list)
    val_fraction: float = 0.05

    def validate(self) -> None:
        # The shared checks, with a custom model shape standing in as any preset.
        base = dataclasses.replace(self, preset="tiny") if self.preset == CUSTOM_PRESET else self
        TrainConfig.validate(base)
        if self.ep != 1:
            raise ConfigError(f"ep must be 1 in k2 sft (expert parallelism is built for k2 train "
                              f"only), got {self.ep}")
        if not self.init:
            raise ConfigError("init is missing: give --init RUN_DIR or --init CHECKPOINT_DIR (the "
                              "model to fine-tune)")
        if not self.data:
            raise ConfigError("data is missing: give --data FILE.jsonl [DIR ...] (OpenAI-format chat "
                              "JSONL, one {\"messages\": [...], \"tools\": [...]} per line); k2 sft "
                              "has no built-in data set")
        for path in self.data:
            if not Path(path).exists():
                raise ConfigError(f"data path {path} does not exist")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")


SFT_HELP: dict[str, str] = {
    **HELP,
    "run_dir": "where checkpoints, metrics, plots and the prepared SFT data go",
    "data_dir": "where the SFT shards are prepared (default: RUN_DIR/data)",
    "seq_len": "tokens per sample; a conversation must fit whole (longer ones are skipped)",
    "init": "the model to fine-tune: a k2 run directory (its newest checkpoint) or a checkpoint "
            "directory (k2 or Hub layout, with tokenizer files)",
    "data": "OpenAI-format chat JSONL files or directories of them",
    "val_fraction": "share of the conversations held out for validation",
}
SFT_FLAGS = [name for name in SFTConfig.fields()
             if name not in ("corpus", "vocab_size", "preset", "sample_prompt", "sample_tokens",
                             "num_samples", "ep")]
"""The settings ``k2 sft`` takes as flags (the rest follow from --init and --data)."""


# ---------------------------------------------------------------------------- the init model
@dataclass(frozen=True)
class InitModel:
    """Where the weights, the model shape and the tokenizer come from."""

    checkpoint: Path
    hf_config: dict[str, Any]
    tokenizer_dir: Path
    preset: str


def resolve_init(path: str | Path, what: str = "--init") -> InitModel:
    """The checkpoint, model configuration and tokenizer behind ``--init`` (``what`` names the
    option or argument in errors).

    Accepts a k2 run directory (``config.json`` with a ``preset`` and ``checkpoints/``: the newest
    checkpoint, the tokenizer saved with it or else the run's ``data_dir``), a checkpoint root
    (with ``latest``) or a checkpoint directory (``manifest.json``: what k2 saves and what
    ``k2 ckpt export-hf``/``import-hf`` write), which must carry ``config.json`` and the
    tokenizer files.

    Raises:
        CheckpointError: the path is none of these, or lacks the model config or tokenizer.
    """
    from k2.checkpoint import resolve
    from k2.model.config import PRESETS, K2Config

    path = Path(path)
    run_config = path / "config.json"
    tokenizer_dir: Path | None = None
    if (path / "checkpoints").is_dir() and run_config.is_file():
        checkpoint = resolve(path / "checkpoints")
        try:
            data_dir = json.loads(run_config.read_text()).get("data_dir")
        except (ValueError, OSError, AttributeError):
            data_dir = None
        if not (checkpoint / "tokenizer.json").is_file() and data_dir:
            tokenizer_dir = Path(data_dir)
    elif path.exists():
        checkpoint = resolve(path)
    else:
        raise CheckpointError(f"{what} {path} does not exist")
    tokenizer_dir = tokenizer_dir or checkpoint
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{what} {path}: no tokenizer.json in {tokenizer_dir} (the model's "
                              "tokenizer is needed)")
    config_file = checkpoint / "config.json"
    try:
        hf_config = json.loads(config_file.read_text())
        model_config = K2Config.from_hf_dict(hf_config)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path}: {config_file} is missing (not a k2 model "
                              "checkpoint)") from None
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{what} {path}: {config_file} is not a K2 model config: {err}") from None
    preset = next((p for p in PRESETS if K2Config.from_preset(p) == model_config), CUSTOM_PRESET)
    return InitModel(checkpoint, hf_config, tokenizer_dir, preset)


# ---------------------------------------------------------------------------- the step
def masked_targets(targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``targets`` with every position whose mask is 0 set to the ignored index (-100)."""
    return torch.where(loss_mask.bool(), targets, torch.full_like(targets, IGNORE_INDEX))


class SFTJob(PretrainJob):
    """The SFT step for :class:`k2.train.harness.Harness`: the pretraining job's model, optimizer,
    WSD schedule, loader and checkpoint state, with the loss restricted to masked targets.

    The loss of a step is the mean cross-entropy over every masked target token of the step
    (all micro-batches, all ranks): micro-batch ``k`` with ``n_k`` of the step's ``N`` masked
    tokens contributes its own mean times ``n_k / N``.
    """

    def __init__(self, config: SFTConfig, d: Dist, model: torch.nn.Module,
                 log: Callable[[str], None]) -> None:
        super().__init__(config, d, model, log)
        if not self.loader.has_loss_mask:
            log(f"warning: {config.data_dir} has no loss mask: training on every token")
        self.trained_since, self.masked_total = 0, torch.zeros(())

    def _tensors(self, batch, non_blocking: bool = True):  # noqa: ANN001, ANN202
        device = self.d.device
        ids, targets, positions, mask = (torch.from_numpy(a).to(device, non_blocking=non_blocking)
                                         for a in (batch.inputs, batch.targets, batch.positions,
                                                   batch.loss_mask))
        return ids, masked_targets(targets, mask), sample_positions(positions), mask

    def accumulate(self) -> Callable[[], float]:
        cfg, d = self.config, self.d
        micro = [self._tensors(self.loader.next_batch()) for _ in range(cfg.grad_accum)]
        counts = torch.stack([m.sum() for *_, m in micro]).to(torch.float32)
        total = counts.sum()
        if d.world > 1:  # the step's masked tokens over every rank
            torch.distributed.all_reduce(total)
        loss_sum = torch.zeros((), device=d.device)
        for k, (ids, targets, positions, _) in enumerate(micro):
            # DDP averages gradients over ranks: scale by world so the sum is over every token.
            weight = counts[k] * d.world / total.clamp(min=1)
            sync = (self.wrapped.no_sync() if d.world > 1 and k < cfg.grad_accum - 1
                    else nullcontext())
            with sync, self.autocast:
                loss = self.wrapped(input_ids=ids, position_ids=positions, targets=targets).loss
            (loss * weight).backward()
            loss_sum += loss.detach() * counts[k]
            self.tokens_since += ids.numel() * d.world
        self.trained_since += int(counts.sum().item()) * d.world
        self.masked_total = total

        def step_loss() -> float:
            if d.world > 1:
                torch.distributed.all_reduce(loss_sum)
            return float(loss_sum / total.clamp(min=1))

        return step_loss

    def throughput(self, elapsed: float) -> dict[str, float]:
        cfg, d = self.config, self.d
        trained, self.trained_since = self.trained_since / elapsed, 0
        share = float(self.masked_total) / (cfg.grad_accum * cfg.batch_size * cfg.seq_len * d.world)
        return {"trained_tokens_per_s": trained, "masked_share": share}

    @torch.no_grad()
    def validation_loss(self, full: bool = False) -> float:
        """Mean cross-entropy over the masked targets of the validation split (the train split
        when no conversation was held out), ``eval_batches`` batches per rank or all of them."""
        from k2.data import TokenLoader
        from k2.data.manifest import read_manifest

        cfg, d, model = self.config, self.d, self.model
        split = "validation" if read_manifest(cfg.data_dir).split("validation").shards else "train"
        probe = TokenLoader(cfg.data_dir, cfg.seq_len, 1, split=split, prefetch=1, threads=1)
        batch_size = max(1, min(cfg.batch_size, probe.num_samples // d.world))
        val = TokenLoader(cfg.data_dir, cfg.seq_len, batch_size, seed=cfg.seed, rank=d.rank,
                          world_size=d.world, split=split, prefetch=1, threads=1)
        model.eval()
        total = torch.zeros((), device=d.device, dtype=torch.float64)
        count = torch.zeros((), device=d.device, dtype=torch.float64)
        for _ in range(len(val) if full else min(cfg.eval_batches, len(val))):
            ids, targets, positions, mask = self._tensors(val.next_batch(), non_blocking=False)
            with self.autocast:
                logits = model(input_ids=ids, position_ids=positions).logits
            total += torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum").double()
            count += mask.sum()
        model.train()
        if d.world > 1:
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        return float(total / count.clamp(min=1))

    def progress(self, fields: dict[str, Any]) -> dict[str, str]:
        out = super().progress(fields)
        out["trained_tok_s"] = f"{fields['trained_tokens_per_s']:,.0f}"
        return out


# ---------------------------------------------------------------------------- the run
@dataclass
class SFTResult:
    """What a finished (or interrupted) SFT run reached."""

    run_dir: Path
    step: int
    val_loss: float | None
    interrupted: bool


class SFTTrainer:
    """One SFT run. Build it, then call :meth:`run`.

    Args:
        config: the resolved settings (``preset`` is replaced by the init model's).
        resume: continue the run in ``config.run_dir`` from its newest verified checkpoint.
        log: progress lines (rank 0).
        progress: draw a progress bar.
        resume_point: the checkpoint to resume from, when already chosen.
        allow_changes: let a resume continue with changed training settings.
    """

    def __init__(self, config: SFTConfig, resume: bool = False, log: Callable[[str], None] = print,
                 progress: bool = True, *, resume_point: ResumePoint | None = None,
                 allow_changes: bool = False) -> None:
        from k2.model import K2Config

        self.d = init_distributed(config.device)
        self.harness = Harness(Path(config.run_dir), self.d, resume=resume,
                               resume_point=resume_point, log=log, progress=progress)
        self.run_dir = self.harness.run_dir
        self.log = self.harness.log
        if resume:  # the model is the run's own; the init only seeded it
            point = self.harness.resume_point
            init = resolve_init(point.path)
            config = dataclasses.replace(config, preset=init.preset)
        else:
            init = resolve_init(config.init)
            config = dataclasses.replace(config, preset=init.preset)
        if not config.data_dir:
            config = dataclasses.replace(config, data_dir=str(self.run_dir / "data"))
        config.validate()
        self.config, self.init = config, init
        self.model_config = K2Config.from_hf_dict(init.hf_config)
        if config.seq_len > self.model_config.max_position_embeddings:
            raise ConfigError(f"seq_len {config.seq_len} is longer than the init model allows "
                              f"(max_position_embeddings = {self.model_config.max_position_embeddings})")
        if resume:
            check_settings(config, self.harness.resume_point, allow_changes, self.log)
            self.harness.barrier()

    @property
    def interrupted(self) -> bool:
        return self.harness.interrupted

    def prepare_data(self) -> None:
        """Prepare the chat data into ``data_dir`` (rank 0; reused when already prepared)."""
        from k2.data.sft import prepare_sft

        cfg, d = self.config, self.d
        if d.main:
            tokenizer_dir = self.init.tokenizer_dir
            if self.harness.resume and (Path(cfg.data_dir) / "tokenizer.json").is_file():
                tokenizer_dir = Path(cfg.data_dir)
            prepared = prepare_sft(cfg.data, cfg.data_dir, tokenizer_dir, cfg.seq_len,
                                   cfg.val_fraction, log=self.log)
            if prepared.manifest.vocab_size > self.model_config.vocab_size:
                raise ConfigError(f"the tokenizer's vocabulary ({prepared.manifest.vocab_size}) is "
                                  f"larger than the model's ({self.model_config.vocab_size})")
        if d.world > 1:
            torch.distributed.barrier()

    def run(self) -> SFTResult:
        from k2 import checkpoint
        from k2.model import K2ForCausalLM

        cfg, d, harness = self.config, self.d, self.harness
        harness.write_records(cfg.to_dict())
        self.prepare_data()
        torch.manual_seed(cfg.seed)
        model = K2ForCausalLM(self.model_config).to(d.device)
        if not harness.resume:
            checkpoint.load(self.init.checkpoint, model, restore_rng=False)
            self.log(f"init: {self.init.checkpoint} ({cfg.preset})")
        job = SFTJob(cfg, d, model, self.log)
        start = harness.restore(job)
        cadence = Cadence(cfg.steps, cfg.log_every, cfg.eval_every, cfg.save_every, cfg.keep_last)
        result = harness.loop(job, cadence, start, save=lambda step: harness.save(
            job, step, keep_last=cfg.keep_last, config=cfg.to_dict(), tokenizer_dir=cfg.data_dir))
        val_loss = result.last_eval["val_loss"] if result.last_eval else None
        if val_loss is not None and not result.interrupted:
            self.log(f"final validation loss on assistant tokens: {val_loss:.4f} nats/token")
        harness.finish()
        return SFTResult(self.run_dir, result.step, val_loss, result.interrupted)
