"""``k2 recipe``: the stages in order, the evaluation after each, the table and the report
(docs/recipe.md)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k2.recipe import evaluate, stages
from k2.recipe.config import MODEL_STAGES, RecipeConfig


@dataclass
class RecipeResult:
    out: Path
    finished: list[str] = field(default_factory=list)   # stages done (run now or before)
    skipped: list[str] = field(default_factory=list)    # of those, finished by an earlier run
    interrupted: str | None = None                      # the stage Ctrl-C stopped
    report: Path | None = None


def run(config: RecipeConfig, out: str | Path, log: Callable[[str], None] = print) -> RecipeResult:
    """Run every stage not yet finished in ``out``, evaluate, and write the table and report.

    A stage that fails leaves the stages before it finished and the report written for them;
    the exception passes on (a Ctrl-C of a stage becomes ``result.interrupted``).
    """
    from k2.recipe.report import write_report, write_table
    from k2.train.harness import environment

    out = Path(out)
    plan = stages.plan(config, out)  # every setting checked before anything runs
    _require_extras(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.toml.used").write_bytes(config.source.read_bytes())  # what this run was asked
    result = RecipeResult(out)
    markers: dict[str, dict[str, Any]] = {}
    rl_settings = next(s.settings for s in plan if s.name == "rl")
    started = time.monotonic()
    try:
        for index, stage in enumerate(plan):
            marker = stages.read_marker(out, stage.name)
            if marker is not None:
                stages.check_marker(stage, marker, out)
                log(f"recipe: {stage.name}: finished earlier ({marker['seconds']:.0f} s); skipped")
                result.skipped.append(stage.name)
            else:
                stages.forget_after(plan, index, out, log)
                for later in plan[index + 1:]:
                    markers.pop(later.name, None)
                try:
                    marker = stages.run_stage(stage, out, log)
                except stages.StageInterrupted:
                    log(f"recipe: {stage.name} was interrupted; run the same k2 recipe command again to "
                        "resume it")
                    result.interrupted = stage.name
                    break
                log(f"recipe: {stage.name}: done in {marker['seconds']:.1f} s")
            markers[stage.name] = marker
            result.finished.append(stage.name)
            for model_stage in MODEL_STAGES:
                if model_stage in markers:
                    evaluate.evaluate_stage(model_stage, out, markers, config.eval, rl_settings, log)
    finally:
        figures = {name: _cached_eval(out, name) for name in MODEL_STAGES if name in markers}
        record = {"machine": {**environment(), "cpu_model": cpu_model()}, "out": str(out), "stages": {n: _timing(m) for n, m in markers.items()},
                  "total_seconds": round(sum(m["seconds"] for m in markers.values()), 1),
                  "this_run_seconds": round(time.monotonic() - started, 1),
                  "complete": len(markers) == len(plan), "interrupted": result.interrupted}
        stages.write_json_atomic(out / "recipe.json", record)
        table = write_table(out, plan, markers, figures)
        result.report = write_report(out, plan, markers, figures, record, config.eval)
        log("")
        log(table)
        log(f"recipe: {len(markers)}/{len(plan)} stages finished, {record['total_seconds']:.0f} s of stage time "
            f"in all; report: {result.report}")
    return result


def _require_extras(config: RecipeConfig) -> None:
    """The evaluation plays tool-use episodes (and constrains their calls): fail now, not after
    an hour of training, when the extras it needs are missing."""
    from k2.optional import require

    require("jsonschema", extra="agentic", purpose="k2 recipe's tool-use evaluation")
    if config.eval.agentic_constraints != "off":
        require("llguidance", extra="constrain", purpose="k2 recipe's schema-constrained tool calls")


def cpu_model() -> str | None:
    """The CPU's model name (Linux), for the record of where the times were measured."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None


def _timing(marker: dict[str, Any]) -> dict[str, Any]:
    return {k: marker[k] for k in ("seconds", "attempts", "finished", "command")}


def _cached_eval(out: Path, name: str) -> dict[str, Any]:
    path = out / "eval" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}
