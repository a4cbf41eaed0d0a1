"""Writing a synthesis run: JSONL splits, tau2 task files, the variants and the dataset card
(docs/synthesis.md).

Files in the output folder:

- ``train.jsonl``, ``validation.jsonl``: one kept trajectory per line, OpenAI chat format
  (``messages``, ``tools``) plus ``domain``, ``task_id``, ``seed``, ``grade`` and what made it
  (``kind``, ``template``, ``variants``, ``split``, ``turns``, ``calls``, ``mistakes``, ...);
- ``train.tasks.json``, ``validation.tasks.json``: the kept episodes' tasks in tau2's format;
- ``variants.jsonl``: every tool variant with its mapping and whether it is held out;
- ``card.json``, ``card.md``: the dataset card (counts by domain, kind, template, turns, calls
  per trajectory, rejection reasons, kept share).

Nothing in them depends on time or on the worker count, so a seed gives the same bytes.
"""

from __future__ import annotations

import heapq
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from k2.agentic.synth.agents import agent_policy
from k2.agentic.synth.evolve import ToolVariant
from k2.agentic.synth.pipeline import Episode, Synthesizer, SynthOptions, kind_quotas
from k2.agentic.synth.variant_domain import VariantDomain
from k2.errors import K2IOError, SynthError

SPLITS = ("train", "validation")
OUTPUTS = ("train.jsonl", "validation.jsonl", "train.tasks.json", "validation.tasks.json", "variants.jsonl", "card.json", "card.md")
BLOCK = 32

_WORKER: Synthesizer | None = None


def _init_worker(options: SynthOptions) -> None:
    global _WORKER
    _WORKER = Synthesizer(options)


def _block(kind: str, start: int) -> list[Episode]:
    assert _WORKER is not None
    return [_WORKER.episode(kind, i) for i in range(start, start + BLOCK)]


def kind_stream(kind: str, synth: Synthesizer | None, executor: ProcessPoolExecutor | None, ahead: int) -> Iterator[Episode]:
    """The episodes of ``kind`` in index order, from ``synth`` here or from ``executor``'s
    workers (``ahead`` blocks in flight); the order is the same either way."""
    if executor is None:
        assert synth is not None
        yield from synth.run(kind)
        return
    pending = [executor.submit(_block, kind, i * BLOCK) for i in range(ahead)]
    following = ahead
    try:
        while True:
            done = pending.pop(0).result()
            pending.append(executor.submit(_block, kind, following * BLOCK))
            following += 1
            yield from done
    finally:
        for future in pending:
            future.cancel()


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def synthesize(
    options: SynthOptions,
    out: str | Path,
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    synthesizer: Synthesizer | None = None,
) -> dict[str, Any]:
    """Run the pipeline until each kind's quota of ``options.n`` is kept, write the output folder,
    and return the card. Gives up with SynthError when a kind keeps fewer than one episode in four.

    The kept trajectories of all kinds are interleaved by their position within their kind
    (a kind's j-th of q sits at (j + 0.5) / q), so any prefix of a split file has about the
    stated mix."""
    options.check()
    if workers < 1:
        raise SynthError(f"synth: --workers must be at least 1, not {workers}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise K2IOError(f"synth: the output {out} exists and is not a folder")
    clashes = [name for name in OUTPUTS if (out / name).exists()]
    if clashes and not overwrite:
        raise K2IOError(f"synth: {out} already holds a synthesis run ({', '.join(clashes)}); pass --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise K2IOError(f"synth: cannot create the output folder {out}: {err}") from err
    synth = synthesizer or Synthesizer(options)
    quotas = kind_quotas(options.n, options.mix)
    stats = _Stats(options)
    parts = {kind: out / f".{kind}.partial.jsonl" for kind in quotas}
    executor = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(options,)) if workers > 1 else None
    try:
        for kind, quota in quotas.items():
            limit = max(50, 4 * quota)
            have = tried = 0
            part = open(parts[kind], "w", encoding="utf-8")  # kept episodes wait on disk, not in memory
            for episode in kind_stream(kind, synth, executor, workers * 2):
                stats.add(episode)
                tried += 1
                if episode.kept:
                    part.write(_dump([episode.record, episode.task]) + "\n")
                    have += 1
                if progress is not None:
                    progress(stats.kept, stats.attempted)
                if have >= quota:
                    break
                if tried >= limit:
                    part.close()
                    raise SynthError(
                        f"synth: only {have} of {tried} {kind} episodes were kept (wanted {quota}); "
                        f"rejections so far: {dict(stats.reasons.most_common())}"
                    )
            part.close()
        _merge(parts, quotas, out)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
        for path in parts.values():
            path.unlink(missing_ok=True)
    with open(out / "variants.jsonl", "w", encoding="utf-8") as f:
        for vid, variant in synth.pool.variants.items():
            f.write(_dump({**variant.to_json(), "held_out": synth.pool.is_held_out(vid)}) + "\n")
    card = stats.card(synth)
    (out / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "card.md").write_text(card_markdown(card), encoding="utf-8")
    return card


def _merge(parts: dict[str, Path], quotas: dict[str, int], out: Path) -> None:
    """Interleave the kinds' kept episodes (a kind's j-th of q at (j + 0.5) / q, ties in kind
    order) into the split files, streaming: the task files are JSON lists, one task a line."""

    def lines(rank: int, kind: str) -> Iterator[tuple[float, int, str]]:
        with open(parts[kind], encoding="utf-8") as f:
            for j, line in enumerate(f):
                yield (j + 0.5) / quotas[kind], rank, line

    streams = [lines(rank, kind) for rank, kind in enumerate(quotas)]
    records = {s: open(out / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
    tasks = {s: open(out / f"{s}.tasks.json", "w", encoding="utf-8") for s in SPLITS}
    first = dict.fromkeys(SPLITS, True)
    try:
        for f in tasks.values():
            f.write("[")
        for _, _, line in heapq.merge(*streams):
            record, task = json.loads(line)
            split = record["split"]
            records[split].write(_dump(record) + "\n")
            tasks[split].write(("\n" if first[split] else ",\n") + _dump(task))
            first[split] = False
        for f in tasks.values():
            f.write("\n]\n")
    finally:
        for f in (*records.values(), *tasks.values()):
            f.close()


class _Stats:
    def __init__(self, options: SynthOptions) -> None:
        self.options = options
        self.attempted = 0
        self.kept = 0
        self.reasons: Counter[str] = Counter()
        self.rejected = 0
        self.counts: dict[str, Counter[Any]] = {k: Counter() for k in
                                                ("split", "domain", "kind", "template", "turns", "calls", "mistakes", "retries")}
        self.chars: list[int] = []
        self.tokens: list[int] = []
        self.used: dict[str, set[str]] = {s: set() for s in SPLITS}

    def add(self, episode: Episode) -> None:
        self.attempted += 1
        if not episode.kept:
            self.rejected += 1
            self.reasons.update(episode.reasons)
            return
        self.kept += 1
        r = episode.record
        assert r is not None
        for key in self.counts:
            self.counts[key][r[key]] += 1
        self.chars.append(r["chars"])
        if "tokens" in r:
            self.tokens.append(r["tokens"])
        self.used[r["split"]].update(r["variants"])

    def card(self, synth: Synthesizer) -> dict[str, Any]:
        pool = synth.pool
        held = sorted(v for v in pool.variants if pool.is_held_out(v))
        specs = {json.dumps(v.spec, sort_keys=True) for v in pool.variants.values()}
        return {
            "options": asdict(self.options),
            "attempted": self.attempted,
            "kept": self.kept,
            "kept_share": round(self.kept / max(1, self.attempted), 4),
            "rejected": self.rejected,
            "rejection_reasons": dict(sorted(self.reasons.items())),
            "by_split": dict(sorted(self.counts["split"].items())),
            "by_domain": dict(sorted(self.counts["domain"].items())),
            "by_kind": dict(sorted(self.counts["kind"].items())),
            "by_template": dict(sorted(self.counts["template"].items())),
            "assistant_turns": {str(k): v for k, v in sorted(self.counts["turns"].items())},
            "calls_per_trajectory": {str(k): v for k, v in sorted(self.counts["calls"].items())},
            "with_recovered_mistake": sum(v for k, v in self.counts["mistakes"].items() if k),
            "with_transient_retry": sum(v for k, v in self.counts["retries"].items() if k),
            "rendered_chars": _spread(self.chars),
            "rendered_tokens": _spread(self.tokens) if self.tokens else None,
            "variants": {
                "total": len(pool.variants), "distinct_specs": len(specs), "held_out": len(held),
                "used_in_train": len(self.used["train"]), "used_in_validation": len(self.used["validation"]),
                "held_out_used_in_train": len(self.used["train"] & set(held)),
            },
            "templates": {
                "total": len(synth.templates),
                "held_out": sorted(t.id for t in synth.templates if synth.template_held_out(t.id)),
            },
        }


def _spread(values: list[int]) -> dict[str, int]:
    return {"min": min(values, default=0), "median": int(statistics.median(values)) if values else 0, "max": max(values, default=0)}


def _table(title: str, counts: dict[str, int], total: int) -> str:
    rows = [f"### {title}", "", "| value | count | share |", "| --- | ---: | ---: |"]
    rows += [f"| {k} | {v} | {100 * v / max(1, total):.1f} % |" for k, v in counts.items()]
    return "\n".join(rows) + "\n"


def card_markdown(card: dict[str, Any]) -> str:
    """The dataset card as Markdown (the same numbers as card.json)."""
    o = card["options"]
    kept = card["kept"]
    parts = [
        "# Synthesized tool-use dataset",
        "",
        f"Made by `k2 synth --n {o['n']} --seed {o['seed']}` (docs/synthesis.md). Episodes attempted: "
        f"{card['attempted']}; kept: {kept} ({100 * card['kept_share']:.1f} %); rejected: {card['rejected']}.",
        "",
        f"Tool variants: {card['variants']['total']} ({card['variants']['distinct_specs']} distinct specs) from "
        f"{len(o['domains'])} domains; held out of training: {card['variants']['held_out']} "
        f"(used in train: {card['variants']['held_out_used_in_train']}). Templates held out: "
        f"{', '.join(card['templates']['held_out']) or 'none'}.",
        "",
        f"Kind mix asked for: {', '.join(f'{k} {v}' for k, v in o['mix'].items())}. Recovered mistakes in "
        f"{card['with_recovered_mistake']} trajectories, transient-failure retries in {card['with_transient_retry']}. "
        f"Rendered length (characters): min {card['rendered_chars']['min']}, median {card['rendered_chars']['median']}, "
        f"max {card['rendered_chars']['max']}."
        + (f" Tokens: min {card['rendered_tokens']['min']}, median {card['rendered_tokens']['median']}, "
           f"max {card['rendered_tokens']['max']}." if card["rendered_tokens"] else ""),
        "",
        _table("Split", card["by_split"], kept),
        _table("Domain", card["by_domain"], kept),
        _table("Task kind", card["by_kind"], kept),
        _table("Assistant turns per trajectory", card["assistant_turns"], kept),
        _table("Tool calls per trajectory", card["calls_per_trajectory"], kept),
        _table("Rejection reasons (an episode may have several)", card["rejection_reasons"], card["attempted"]),
        _table("Template", card["by_template"], kept),
    ]
    return "\n".join(parts)


class Progress:
    """Prints ``kept/n, attempted, kept share, trajectories/s`` to a stream at most once a second."""

    def __init__(self, n: int, stream: Any, every: float = 1.0) -> None:
        self.n = n
        self.stream = stream
        self.every = every
        self.start = self.last = time.monotonic()

    def __call__(self, kept: int, attempted: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every and kept < self.n:
            return
        self.last = now
        rate = attempted / max(now - self.start, 1e-9)
        self.stream.write(f"synth: {kept}/{self.n} kept, {attempted} attempted ({100 * kept / max(1, attempted):.1f} % kept), {rate:.0f} episodes/s\n")
        self.stream.flush()


def load_variants(path: str | Path) -> dict[str, ToolVariant]:
    """The variants of a run's ``variants.jsonl`` by id (to rebuild an episode's domain)."""
    path = Path(path)
    out: dict[str, ToolVariant] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise K2IOError(f"cannot read the variants file {path}: {err}") from err
    for number, line in enumerate(lines, 1):
        try:
            variant = ToolVariant.from_json(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SynthError(f"{path}: line {number} is not a tool variant: {err}") from err
        out[variant.id] = variant
    return out


def episode_domain(record: dict[str, Any], variants: dict[str, ToolVariant]) -> VariantDomain:
    """The domain a recorded trajectory was played in (its agent's variants and policy), fresh:
    play the record's task in it, or grade the record with :func:`~k2.agentic.synth.judge.regrade`."""
    missing = [v for v in record["variants"] if v not in variants]
    if missing:
        raise SynthError(f"task {record.get('task_id')}: variants {missing} are not in the variants file")
    return VariantDomain(record["domain"], [variants[v] for v in record["variants"]], policy=agent_policy(record["domain"]))
