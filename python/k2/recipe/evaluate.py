"""The evaluation run after every stage, on the model the stage left (docs/recipe.md, "Evaluation").

Each figure comes from the evaluator the rest of k2 uses:

* ``val_loss``: ``k2 train``'s own validation loss (``PretrainJob.validation_loss``) on the
  pretraining data's validation split, beside the unigram and Kneser–Ney bigram baselines that
  ``k2 train`` fitted (its ``baseline`` metrics record);
* ``agentic``: ``k2 eval agentic``'s :class:`~k2.agentic.evaluate.AgenticEvaluator` on the
  held-out split of the recipe's ``k2 synth`` output (next-call exact match, tool-name accuracy,
  schema validity, task success of whole episodes); the first episodes are kept for the report;
* ``arithmetic``: held-out greedy accuracy on ``k2.rl``'s arithmetic task, scored as ``k2 rl``'s
  evaluation scores it (the same prompts, rendering, stop token and verifier);
* ``critic``: the critic–verifier agreement ``k2 rl`` measured on held-out pairs, when the RL
  stage trained a critic (the other stages have none).

Results are cached in ``OUT/eval/STAGE.json`` with the inputs they came from (the stage's marker,
the synthesis marker, the settings), so a resumed recipe evaluates only what changed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from k2.recipe.config import EvalSettings


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    from k2.train.metrics import read_metrics as read

    return list(read(path))


def baselines(train_dir: Path) -> dict[str, float] | None:
    """The unigram and bigram validation losses ``k2 train`` fitted (nats/token)."""
    for record in read_metrics(train_dir):
        if record.get("kind") == "baseline":
            return {"unigram_nats": record["unigram_nats"], "bigram_nats": record["bigram_nats"]}
    return None


def validation_loss(model: Any, train_dir: Path, settings: EvalSettings) -> dict[str, Any]:
    """The model's loss on the pretraining validation split, computed by ``k2 train``'s own
    :meth:`PretrainJob.validation_loss` with the pretraining run's sequence length, batch and seed
    (with ``val_batches`` 0: every batch of the split, as ``k2 train``'s final evaluation)."""
    import torch

    from k2.parallel.setup import Dist
    from k2.train.pretrain import PretrainJob

    config = json.loads((Path(train_dir) / "config.json").read_text())
    full = settings.val_batches == 0
    cfg = SimpleNamespace(data_dir=config["data_dir"], seq_len=config["seq_len"], batch_size=config["batch_size"],
                          seed=config["seed"], eval_batches=settings.val_batches or 1)
    view = SimpleNamespace(config=cfg, d=Dist(0, 1, torch.device("cpu")), model=model, autocast=nullcontext())
    loss = PretrainJob.validation_loss(view, full=full)  # type: ignore[arg-type]
    model.eval()
    out: dict[str, Any] = {"val_loss": loss, "batches": "all" if full else settings.val_batches}
    base = baselines(train_dir)
    if base:
        out.update(base)
        out["margin_over_bigram"] = base["bigram_nats"] - loss
    return out


def arithmetic_accuracy(model: Any, tokenizer: Any, settings: EvalSettings, level: int, seed: int,
                        budget: int = 0, working: str = "none", digits: int = 0) -> dict[str, Any]:
    """Held-out greedy accuracy on the arithmetic task, as ``k2 rl`` evaluates it
    (``RLJob.evaluate``: its test prompts drawn with ``seed``, rendered with the assistant turn
    open, decoded greedily up to ``<|im_end|>`` or the task's budget, scored by its verifier).
    ``working``: the RL stage's ``task_working`` (its system prompt and budget); ``digits``: its
    ``task_digits`` (0: the level's)."""
    from k2.rl.job import IM_END, render_prompt
    from k2.rl.rollout import Request, RolloutEngine
    from k2.rl.tasks import get_task

    options: dict[str, Any] = {"level": level} if level else {}
    if working != "none":
        options["working"] = working
    if digits:
        options["digits"] = digits
    task = get_task("arithmetic", **options)
    prompts = task.prompts("test", settings.arithmetic_prompts, seed=seed)
    im_end = tokenizer.token_to_id(IM_END)
    pad = tokenizer.token_to_id("<|pad|>")
    engine = RolloutEngine(model, max_batch=64, pad_token_id=pad or 0)
    requests = [Request(render_prompt(tokenizer, p), budget or task.token_budget, temperature=0.0, stop_ids=[im_end])
                for p in prompts]
    completions = engine.generate(requests, seed=0)
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=False) for c in completions]
    verdicts = task.verify_many(prompts, texts)
    return {"accuracy": sum(v.correct for v in verdicts) / len(verdicts),
            "reward": sum(v.score for v in verdicts) / len(verdicts),
            "truncation_rate": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "prompts": len(prompts), "level": level or "default", "working": working,
            "digits": task.level.digits,
            "examples": [{"prompt": p.messages[-1]["content"], "reply": t} for p, t in list(zip(prompts, texts))[:3]]}


def _recording_evaluator(keep: int) -> type:
    from k2.agentic.evaluate import AgenticEvaluator

    class Recording(AgenticEvaluator):
        """``AgenticEvaluator`` that also keeps the first ``keep`` finished episodes: the
        conversation the environment holds (user turns, tool calls, tool results) and its grade."""

        episodes_kept: list[dict[str, Any]]

        def _end_episode(self, tally: Any, record: Any, env: Any, reward: float | None) -> None:  # type: ignore[override]
            AgenticEvaluator._end_episode(tally, record, env, reward)
            kept = self.__dict__.setdefault("episodes_kept", [])
            if len(kept) < keep:
                grade = getattr(env, "grade", None)
                kept.append({
                    "task_id": record.get("task_id"), "kind": record.get("kind"), "domain": record.get("domain"),
                    "messages": json.loads(json.dumps(getattr(env, "messages", []), default=str)),
                    "reward": reward, "done": bool(env.done),
                    "termination": getattr(env, "termination", None) if env.done else "out of tokens",
                    "success": bool(env.done and reward is not None and math.isclose(reward, 1.0)),
                    "grade": grade.to_json() if grade is not None else None,
                })

    return Recording


def agentic(model: Any, tokenizer: Any, synth_dir: Path, settings: EvalSettings,
            progress: Callable[[str], None]) -> dict[str, Any]:
    """``k2 eval agentic``'s figures on the held-out split of ``synth_dir``, plus a few episodes."""
    from k2.agentic.evaluate import EvalOptions, load_eval_set

    modes = {"both": (False, True), "on": (True,), "off": (False,)}[settings.agentic_constraints]
    options = EvalOptions(limit=settings.agentic_limit, batch_size=settings.agentic_batch,
                          call_tokens=settings.call_tokens, turn_tokens=settings.turn_tokens,
                          episode_tokens=settings.episode_tokens, episodes=settings.agentic_episodes,
                          modes=modes)
    data = load_eval_set(synth_dir, "validation", settings.agentic_limit)
    evaluator = _recording_evaluator(settings.report_episodes)(model, tokenizer, options, progress)
    figures = evaluator.run(data)
    main = "constrained" if True in modes else "unconstrained"
    return {"mode": main, "records": len(data.records), **figures,
            "episodes": evaluator.__dict__.get("episodes_kept", [])}


def critic_agreement(rl_dir: Path) -> dict[str, Any] | None:
    """The newest critic–verifier agreement ``k2 rl`` logged (None when it trained no critic)."""
    config_path = Path(rl_dir) / "config.json"
    if not config_path.is_file() or not json.loads(config_path.read_text()).get("critic_share", 0):
        return None
    measured = [r for r in read_metrics(rl_dir) if r.get("critic_agreement_pairs")]
    if not measured:
        return {"agreement": None, "pairs": 0, "step": None}
    last = measured[-1]
    return {"agreement": last.get("critic_agreement"), "pairs": last["critic_agreement_pairs"],
            "p_winner": last.get("critic_p_winner"), "step": last["step"]}


# ---------------------------------------------------------------------------- per stage, cached
def evaluate_stage(stage: str, out: Path, markers: dict[str, dict[str, Any]], settings: EvalSettings,
                   rl_settings: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Every figure whose inputs exist for the model ``stage`` left, reusing cached ones whose
    inputs have not changed; the result is written to ``OUT/eval/STAGE.json``."""
    from k2.recipe.stages import write_json_atomic

    out = Path(out)
    path = out / "eval" / f"{stage}.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    model_key = markers[stage].get("id", markers[stage]["finished"])
    common = {"model": model_key, "settings": asdict(settings)}
    wanted: dict[str, dict[str, Any]] = {
        "val_loss": common,
        "arithmetic": {**common, "level": _arithmetic_level(settings, rl_settings),
                       "seed": int(rl_settings.get("seed", 0)), "budget": _arithmetic_budget(settings, rl_settings),
                       **_arithmetic_variant(rl_settings)},
    }
    if "synth" in markers:
        wanted["agentic"] = {**common, "synth": markers["synth"].get("id", markers["synth"]["finished"])}
    if stage == "rl":
        wanted["critic"] = common
    result = {k: v for k, v in cached.items() if k in wanted and v.get("inputs") == _jsonable(wanted[k])}
    todo = [k for k in wanted if k not in result]
    if not todo:
        return result
    model = tokenizer = None
    if set(todo) - {"critic"}:
        from k2.agentic.evaluate import load_model

        model, tokenizer, _ = load_model(out / stage)
    for name in todo:
        started = time.monotonic()
        log(f"recipe: evaluating {stage}: {name}")
        if name == "val_loss":
            figures = validation_loss(model, out / "train", settings)
        elif name == "arithmetic":
            figures = arithmetic_accuracy(model, tokenizer, settings, wanted[name]["level"], wanted[name]["seed"],
                                          wanted[name]["budget"], wanted[name].get("working", "none"),
                                          wanted[name].get("digits", 0))
        elif name == "agentic":
            figures = agentic(model, tokenizer, out / "synth", settings, lambda line: log(f"recipe:   {line}"))
        else:
            figures = critic_agreement(out / "rl") or {"agreement": None, "pairs": 0, "step": None, "no_critic": True}
        figures["seconds"] = round(time.monotonic() - started, 2)
        figures["inputs"] = _jsonable(wanted[name])
        result[name] = figures
        write_json_atomic(path, result)  # each figure as soon as it is known
    return result


def _arithmetic_level(settings: EvalSettings, rl_settings: dict[str, Any]) -> int:
    if settings.arithmetic_level:
        return settings.arithmetic_level
    if rl_settings.get("task", "arithmetic") == "arithmetic":
        return int(rl_settings.get("task_level", 0))
    return 0


def _arithmetic_budget(settings: EvalSettings, rl_settings: dict[str, Any]) -> int:
    """``k2 rl``'s token budget when its task is arithmetic (0: the task's own)."""
    if rl_settings.get("task", "arithmetic") == "arithmetic":
        return int(rl_settings.get("token_budget", 0))
    return 0


def _arithmetic_variant(rl_settings: dict[str, Any]) -> dict[str, Any]:
    """``working`` and ``digits`` when the RL stage trains arithmetic with worked steps or other
    operand digits, else nothing (so the inputs of evaluations cached before the options existed
    still match)."""
    if rl_settings.get("task", "arithmetic") != "arithmetic":
        return {}
    variant: dict[str, Any] = {}
    if rl_settings.get("task_working", "none") != "none":
        variant["working"] = str(rl_settings["task_working"])
    if int(rl_settings.get("task_digits", 0)):
        variant["digits"] = int(rl_settings["task_digits"])
    return variant


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))
