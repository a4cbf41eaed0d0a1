"""The run's metrics log: one JSON object per line in ``RUN/metrics.jsonl``.

Each record has ``step`` and ``kind`` (``"train"`` or ``"eval"``) and whatever the loop measured:
``loss``, ``val_loss``, ``lr``, ``grad_norm``, ``max_logit`` (per layer), ``clipped_heads`` (per
layer), ``expert_balance`` (per MoE layer: the busiest expert's load over the mean load),
``tokens_per_s``, ``wall_s``. Lines are flushed as written, so a crash loses at most the line
being written, and the reader skips a torn last line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON-lines writer.

    Args:
        path: the ``metrics.jsonl`` file; created with its directory if missing, appended to
            otherwise (a resumed run continues the same log).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, step: int, kind: str, **values: Any) -> None:
        record = {"step": int(step), "kind": kind, **{k: _jsonable(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file, in order (a torn last line is ignored)."""
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and torch tensors
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
