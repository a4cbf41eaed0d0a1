"""The training run's configuration: defaults, a TOML file, command-line overrides, validation.

Precedence: dataclass defaults < ``--config FILE.toml`` < explicit command-line flags. Every value
is checked before any work starts, and an error names the field (and the file it came from).
The resolved configuration is written to ``RUN/config.json`` so a run can be reproduced.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k2.errors import ConfigError

OPTIMIZERS = ("muonclip", "adamw")
MAX_INT = 2**63
"""Every integer setting must fit a signed 64-bit integer (torch, numpy and the Rust loader
take them as such)."""


@dataclass
class TrainConfig:
    """Everything a pretraining run needs; :data:`HELP` documents each field."""

    preset: str = "tiny"
    run_dir: str = "runs/tiny"
    data_dir: str = "data"
    corpus: list[str] = field(default_factory=list)
    vocab_size: int = 8192
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 600
    optimizer: str = "muonclip"
    lr: float = 6e-3
    adamw_lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    decay_fraction: float = 0.3
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    qk_clip_tau: float = 100.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    dp_shard: int = 1
    fsdp_cpu_offload: bool = False
    ep: int = 1
    checkpoint_per_rank: bool = True
    sample_prompt: str = "def fibonacci(n):\n"
    sample_tokens: int = 64
    num_samples: int = 3

    # ------------------------------------------------------------------ building
    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_toml(cls, path: str | Path) -> dict[str, Any]:
        """The overrides a TOML file holds: flat keys, or every key under one ``[train]`` table.

        A file with a ``[train]`` table and keys outside it is refused, naming those keys: they
        would otherwise be ignored without a word (docs/training.md, Settings).
        """
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory, not a TOML file") from None
        except OSError as err:
            raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}); TOML "
                              "files are UTF-8") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        if "train" in data:
            if not isinstance(data["train"], dict):
                raise ConfigError(f"config file {path}: `train` must be a table ([train]), "
                                  f"got {data['train']!r}")
            outside = sorted(set(data) - {"train"})
            if outside:
                raise ConfigError(
                    f"config file {path}: {', '.join(outside)} sit(s) outside the [train] table "
                    "and would be ignored; put every setting under [train], or drop the [train] "
                    "header and write them all as top-level keys")
            data = data["train"]
        unknown = sorted(set(data) - set(cls.fields()))
        if unknown:
            raise ConfigError(f"config file {path}: unknown field(s) {', '.join(unknown)}; "
                              f"known fields: {', '.join(cls.fields())}")
        return data

    @classmethod
    def resolve(cls, file: str | Path | None = None, base: dict[str, Any] | None = None,
                **overrides: Any) -> TrainConfig:
        """Defaults, then ``base`` (a resumed run's stored settings), then ``file``'s values, then
        ``overrides`` (None values are ignored)."""
        values: dict[str, Any] = dict(base or {})
        source = "command line"
        if file is not None:
            values.update(cls.from_toml(file))
            source = f"{file} or the command line"
        values.update({k: v for k, v in overrides.items() if v is not None})
        fields = cls.fields()
        for name, value in values.items():
            if name not in fields:
                raise ConfigError(f"unknown field {name!r} ({source})")
            values[name] = _coerce(name, value, fields[name])
        config = cls(**values)
        config.validate()
        return config

    # ------------------------------------------------------------------ checking
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        from k2.model.config import PRESETS  # the one list of presets (imports torch: kept lazy)

        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        fields = self.fields()
        for name, f in fields.items():
            value = getattr(self, name)
            if f.type == "float" and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
            if f.type == "int" and value >= MAX_INT:
                raise ConfigError(f"{name} must be below 2**63, got {value}")
            if f.type == "int" and value < -MAX_INT:
                raise ConfigError(f"{name} must be at least -2**63, got {value}")
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "eval_batches",
                    "save_every", "keep_last", "log_every", "vocab_size", "dp_shard", "ep")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "adamw_lr"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value}")
        for name in ("weight_decay", "grad_clip", "qk_clip_tau", "warmup_steps", "seed",
                     "sample_tokens", "num_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.fsdp_cpu_offload and self.dp_shard == 1:
            raise ConfigError("fsdp_cpu_offload offloads FSDP2's shards: it needs dp_shard > 1")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        for name in ("decay_fraction", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for path in self.corpus:
            if not Path(path).exists():
                raise ConfigError(f"corpus path {path} does not exist")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.num_samples > 0 and self.sample_tokens > 0 and not self.sample_prompt:
            raise ConfigError("sample_prompt is empty: the end-of-run samples need a prompt "
                              "(or set num_samples to 0 to draw none)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


HELP: dict[str, str] = {
    "preset": 'model preset: tiny (CPU minutes), small (one GPU)',
    "run_dir": 'where checkpoints, metrics, plots and samples go',
    "data_dir": 'prepared token shards; prepared here when missing',
    "corpus": 'files/dirs to prepare into --data-dir (none: the Python standard library)',
    "vocab_size": 'tokenizer vocabulary when preparing data',
    "seq_len": 'tokens per training sequence',
    "batch_size": 'sequences per micro-batch on each rank',
    "grad_accum": 'micro-batches per optimizer step',
    "steps": 'optimizer steps',
    "optimizer": 'muonclip (K2) | adamw (torch.optim.AdamW on every parameter, at adamw_lr)',
    "lr": 'peak Muon learning rate (AdamW-matched update scale)',
    "adamw_lr": 'peak AdamW learning rate (embeddings, head, norms; everything with --optimizer adamw)',
    "weight_decay": 'decoupled weight decay (K2: 0.1)',
    "warmup_steps": 'linear warmup steps of the WSD schedule',
    "decay_fraction": 'share of the steps spent in the final cosine decay',
    "min_lr_ratio": 'decay floor as a fraction of the peak (K2: 2e-5/2e-4)',
    "grad_clip": 'global gradient-norm clip (0 disables)',
    "qk_clip_tau": 'QK-Clip threshold tau (K2: 100; 0 disables)',
    "eval_every": 'steps between validation passes',
    "eval_batches": 'validation batches per pass (per rank)',
    "save_every": 'steps between checkpoints',
    "keep_last": 'checkpoints kept',
    "log_every": 'steps between metrics lines',
    "seed": 'seeds init, data order and sampling',
    "device": 'auto | cpu | cuda | cuda:N',
    "bf16": 'bf16 autocast on GPU (ignored on CPU)',
    "dp_shard": 'ranks to shard parameters, gradients and optimizer states over with FSDP2 '
                '(1: DDP replicas; otherwise the number of torchrun processes, or with --ep the '
                'number that --ep times it makes)',
    "fsdp_cpu_offload": 'with --dp-shard: keep the shards and the optimizer step in CPU memory',
    "ep": 'expert parallelism: split each MoE layer\'s experts over this many ranks (torchrun; '
          'must divide the experts and equal the number of ranks, or with --dp-shard, '
          'dp_shard x ep must)',
    "checkpoint_per_rank": 'sharded runs (--dp-shard, --ep): each rank writes and reads only its own '
                           'rows of each checkpoint (one manifest; needs a file system every rank '
                           'sees); off: rank 0 gathers and writes whole tensors',
    "sample_prompt": 'prompt for the end-of-run samples',
    "sample_tokens": 'tokens generated per sample',
    "num_samples": 'samples drawn at the end',
}
"""The ``--help`` text of each field (also the documentation of the TOML keys)."""


def _coerce(name: str, value: Any, f: dataclasses.Field) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if kind == "str":
            return str(value)
        if kind.startswith("list"):
            return [str(v) for v in ([value] if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be of type {kind}, got {value!r}") from None
    return value
