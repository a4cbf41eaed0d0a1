"""A hand-made recipe output directory (metrics, markers, evaluation figures) for the report tests:
every number in it is chosen here, so the report's table can be checked against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from k2.recipe.config import EvalSettings
from k2.recipe.stages import Stage

HOSTILE = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'

EPISODE: dict[str, Any] = {
    "task_id": "bank-move-" + HOSTILE, "kind": "multi-call", "domain": "bank",
    "messages": [
        {"role": "system", "content": "You are a bank agent."},
        {"role": "user", "content": "Move 20 from savings to checking, please."},
        {"role": "assistant", "content": "Sure. " + HOSTILE, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "transfer_funds", "arguments": json.dumps({"from": "savings", "to": "checking", "amount": 20, "memo": "</pre><script>x()</script>"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "transfer_funds", "content": '{"ok": true, "balance": 180}'},
        {"role": "assistant", "content": "Done: 20 moved."},
        {"role": "user", "content": "Thanks! ###STOP###"},
    ],
    "reward": 1.0, "done": True, "termination": "user_stop", "success": True,
    "grade": {"reward": 1.0, "basis": ["DB"], "components": {"DB": {"reward": 1.0, "details": []}}},
}


def metrics(path: Path, records: list[dict[str, Any]]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def fake_out(out: Path, *, rl_done: bool = True) -> tuple[list[Stage], dict, dict, dict]:
    metrics(out / "train", [{"step": 0, "kind": "baseline", "unigram_nats": 6.5, "bigram_nats": 4.1}]
            + [{"step": s, "kind": "train", "loss": 9 - s / 10, "max_logit": [10 + s, 20 + s / 2, 5.0, 7.0]} for s in range(1, 21)]
            + [{"step": 10, "kind": "eval", "val_loss": 8.2}, {"step": 20, "kind": "eval", "val_loss": 3.9}])
    (out / "train" / "config.json").write_text(json.dumps({"qk_clip_tau": 30.0}))
    metrics(out / "sft", [{"step": s, "kind": "train", "loss": 3 - s / 10, "max_logit": [31.0, 25, 6, 8]} for s in range(1, 11)]
            + [{"step": 10, "kind": "eval", "val_loss": 1.5}])
    (out / "synth").mkdir(parents=True)
    (out / "synth" / "card.json").write_text(json.dumps({"kept": 400, "attempted": 450, "by_split": {"train": 360, "validation": 40}}))
    if rl_done:
        metrics(out / "rl", [{"step": 0, "kind": "eval", "accuracy": 0.1, "reward": 0.2}]
                + [{"step": s, "kind": "train", "phase": "warm_start", "loss": 2 - s / 10, "max_logit": [30.0, 20, 6, 8]} for s in range(1, 6)]
                + [{"step": s, "kind": "train", "phase": "rl", "loss": 0.1, "reward": 0.1 * s, "accuracy": 0.05 * s,
                    "max_logit": [29.0, 21, 6, 8]} for s in range(6, 11)]
                + [{"step": 10, "kind": "eval", "accuracy": 0.3, "reward": 0.4}])
    names = ["train", "synth", "sft"] + (["rl"] if rl_done else [])
    plan = [Stage(n, out / n, {}, [n, "--run-dir=" + str(out / n)]) for n in ("train", "synth", "sft", "rl")]
    markers = {n: {"stage": n, "seconds": 10.0 * (i + 1), "attempts": 1 + (n == "sft"), "finished": "t", "command": "k2 " + n}
               for i, n in enumerate(names)}

    def agentic(exact: float, success: float) -> dict[str, Any]:
        return {"mode": "constrained", "records": 8, "episodes": [EPISODE],
                "constrained": {"tool_name_accuracy": 0.5, "next_call_exact_match": exact, "schema_valid_calls": 1.0,
                                "episode_success": success}}

    figures = {
        "train": {"val_loss": {"val_loss": 3.9, "margin_over_bigram": 0.2}, "arithmetic": {"accuracy": 0.0, "prompts": 16},
                  "agentic": agentic(0.0, 0.0)},
        "sft": {"val_loss": {"val_loss": 4.0, "margin_over_bigram": 0.1}, "arithmetic": {"accuracy": 0.0625, "prompts": 16},
                "agentic": agentic(0.25, 0.125)},
    }
    if rl_done:
        figures["rl"] = {"val_loss": {"val_loss": 4.05, "margin_over_bigram": 0.05}, "arithmetic": {"accuracy": 0.3125, "prompts": 16},
                         "agentic": agentic(0.25, 0.125), "critic": {"agreement": 0.75, "pairs": 12}}
    record = {"machine": {"platform": "Linux-test", "cpu_model": "Test CPU", "cpu_count": 2}, "total_seconds": 100.0,
              "interrupted": None if rl_done else "rl"}
    return plan, markers, figures, record


SETTINGS = EvalSettings(report_episodes=2)
