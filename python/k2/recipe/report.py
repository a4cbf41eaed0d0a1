"""The recipe's stage table (``stage_table.json``, ``stage_table.md``) and its report
(``report.html``): one self-contained page — inline CSS, plots as base64 PNG, no script, nothing
fetched — that a person can open anywhere (docs/recipe.md, "The report").

Every piece of text that comes from a run (model replies, tool arguments and results, user turns,
paths, settings) is HTML-escaped: model output is untrusted input.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from k2.recipe.config import EvalSettings
from k2.recipe.evaluate import baselines, read_metrics

COLUMNS = (
    ("stage", "stage"),
    ("seconds", "time (s)"),
    ("val_loss", "val loss (nats/token)"),
    ("margin_over_bigram", "below bigram"),
    ("tool_name_accuracy", "tool-name accuracy"),
    ("next_call_exact_match", "next-call exact match"),
    ("schema_valid_calls", "schema-valid calls"),
    ("episode_success", "task success"),
    ("arithmetic_accuracy", "arithmetic accuracy"),
    ("critic_agreement", "critic agreement"),
    ("output", "output"),
)


def table_rows(plan: list[Any], markers: dict[str, dict[str, Any]], figures: dict[str, dict[str, Any]],
               out: Path) -> list[dict[str, Any]]:
    """One row per stage: its time, and the figures of the model it left (None: not measured)."""
    rows = []
    for stage in plan:
        name = stage.name
        marker = markers.get(name)
        row: dict[str, Any] = {key: None for key, _ in COLUMNS}
        row.update(stage=name, done=marker is not None, seconds=marker["seconds"] if marker else None)
        f = figures.get(name, {})
        if "val_loss" in f:
            row["val_loss"] = f["val_loss"]["val_loss"]
            row["margin_over_bigram"] = f["val_loss"].get("margin_over_bigram")
        agentic = f.get("agentic")
        if agentic:
            mode = agentic[agentic["mode"]]
            for key in ("tool_name_accuracy", "next_call_exact_match", "schema_valid_calls", "episode_success"):
                row[key] = mode.get(key)
            row["agentic_mode"] = agentic["mode"]
            row["agentic_records"] = agentic["records"]
        if "arithmetic" in f:
            row["arithmetic_accuracy"] = f["arithmetic"]["accuracy"]
            row["arithmetic_prompts"] = f["arithmetic"]["prompts"]
        critic = f.get("critic")
        if critic and not critic.get("no_critic"):
            row["critic_agreement"] = critic.get("agreement")
            row["critic_pairs"] = critic.get("pairs")
        row["output"] = _output(name, out, marker)
        rows.append(row)
    return rows


def _output(name: str, out: Path, marker: dict[str, Any] | None) -> str:
    if marker is None:
        return "not run yet"
    if name == "synth":
        card_path = out / "synth" / "card.json"
        if card_path.is_file():
            card = json.loads(card_path.read_text())
            by = card.get("by_split", {})
            return (f"{card.get('kept')} trajectories ({by.get('train', 0)} train, {by.get('validation', 0)} "
                    f"held-out) of {card.get('attempted')} episodes")
        return "k2 synth output"
    records = read_metrics(out / name)
    steps = max((r["step"] for r in records if r.get("kind") == "train"), default=0)
    evals = [r for r in records if r.get("kind") == "eval"]
    text = f"{steps} steps"
    if name in ("train", "sft") and evals and "val_loss" in evals[-1]:
        text += f"; its own val loss {evals[-1]['val_loss']:.3f}"
    if name == "rl":
        rewards = [r["reward"] for r in records if r.get("kind") == "train" and "reward" in r]
        if rewards:
            text += f"; reward {rewards[0]:.2f} → {rewards[-1]:.2f}"
    return text


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "seconds":
        return f"{value:.1f}"
    if key in ("val_loss", "margin_over_bigram"):
        return f"{value:+.3f}" if key == "margin_over_bigram" else f"{value:.3f}"
    if isinstance(value, float):
        return f"{100 * value:.1f} %"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(label for _, label in COLUMNS) + " |",
             "| " + " | ".join("---" if k in ("stage", "output") else "---:" for k, _ in COLUMNS) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(k, row.get(k)).replace("|", "\\|") for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def write_table(out: Path, plan: list[Any], markers: dict[str, dict[str, Any]],
                figures: dict[str, dict[str, Any]]) -> str:
    """Write ``stage_table.json`` and ``stage_table.md``; return the Markdown."""
    from k2.recipe.stages import write_json_atomic

    rows = table_rows(plan, markers, figures, out)
    base = baselines(out / "train")
    write_json_atomic(out / "stage_table.json", {"columns": [k for k, _ in COLUMNS], "rows": rows, "baselines": base})
    text = markdown_table(rows)
    if base:
        text += (f"\n\nBaselines on the same validation split: unigram {base['unigram_nats']:.3f}, "
                 f"Kneser–Ney bigram {base['bigram_nats']:.3f} nats/token.")
    (out / "stage_table.md").write_text(text + "\n", encoding="utf-8")
    return text


# ---------------------------------------------------------------------------- plots
def _finish(ax, ran: bool) -> None:  # noqa: ANN001
    """Mark a panel whose stage has not run yet, or give it a legend."""
    if not ran:
        ax.text(0.5, 0.5, "not run yet", ha="center", transform=ax.transAxes)
    elif ax.lines:
        ax.legend(fontsize=8)


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _series(records: list[dict[str, Any]], kind: str, key: str, phase: str | None = None) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        if r.get("kind") != kind or key not in r or not isinstance(r[key], (int, float)):
            continue
        if phase is not None and r.get("phase", "rl") != phase:
            continue
        if isinstance(r[key], float) and not math.isfinite(r[key]):
            continue
        xs.append(r["step"])
        ys.append(r[key])
    return xs, ys


def plots(out: Path, rows: list[dict[str, Any]]) -> dict[str, str]:
    """The report's figures as base64 PNGs: loss, RL reward/accuracy, figures by stage, QK-Clip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {name: read_metrics(out / name) for name in ("train", "sft", "rl")}
    images: dict[str, str] = {}

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    base = baselines(out / "train")
    for ax, name, title in zip(axes, ("train", "sft", "rl"), ("pretraining (k2 train)", "SFT (k2 sft)",
                                                              "RL warm start (k2 rl)")):
        records = metrics[name]
        phase = "warm_start" if name == "rl" else None
        ax.plot(*_series(records, "train", "loss", phase), label="train loss", lw=1)
        xs, ys = _series(records, "eval", "val_loss")
        if xs:
            ax.plot(xs, ys, "o-", label="validation loss")
        if name == "train" and base:
            ax.axhline(base["bigram_nats"], color="gray", ls="--", label="Kneser–Ney bigram")
            ax.axhline(base["unigram_nats"], color="gray", ls=":", label="unigram")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("nats/token")
        _finish(ax, bool(records))
    images["loss"] = _png(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    rl = metrics["rl"]
    axes[0].plot(*_series(rl, "train", "reward", "rl"), label="mean shaped reward (train samples)")
    axes[0].plot(*_series(rl, "train", "accuracy", "rl"), label="accuracy (train samples)", alpha=0.7)
    axes[0].set_title("RL reward")
    axes[1].plot(*_series(rl, "eval", "accuracy"), "o-", label="held-out accuracy (greedy)")
    axes[1].plot(*_series(rl, "eval", "reward"), "s--", label="held-out mean reward")
    axes[1].set_title("RL held-out evaluation")
    for ax in axes:
        ax.set_xlabel("optimizer step (warm start included)")
        _finish(ax, bool(rl))
    images["reward"] = _png(fig)

    fig, ax = plt.subplots(figsize=(9, 3.8))
    model_rows = [r for r in rows if r["stage"] in ("train", "sft", "rl")]
    keys = (("arithmetic_accuracy", "arithmetic accuracy"), ("next_call_exact_match", "next-call exact match"),
            ("tool_name_accuracy", "tool-name accuracy"), ("episode_success", "task success"),
            ("critic_agreement", "critic agreement"))
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        values = [r.get(key) for r in model_rows]
        xs = [i + (k - len(keys) / 2 + 0.5) * width for i in range(len(model_rows))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=label)
    ax.set_xticks(range(len(model_rows)), [r["stage"] for r in model_rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share")
    ax.set_title("after each stage (– in the table: not measured)")
    ax.legend(fontsize=8, ncol=2)
    images["stages"] = _png(fig)

    fig, ax = plt.subplots(figsize=(11, 3.8))
    offset = 0
    for name in ("train", "sft", "rl"):
        records = [r for r in metrics[name] if r.get("kind") == "train" and isinstance(r.get("max_logit"), list)]
        if not records:
            continue
        layers = len(records[0]["max_logit"])
        for layer in range(layers):
            ax.plot([offset + r["step"] for r in records], [r["max_logit"][layer] for r in records], lw=1,
                    color=f"C{layer}", label=f"layer {layer}" if name == "train" else None)
        config_path = out / name / "config.json"
        if config_path.is_file():
            tau = json.loads(config_path.read_text()).get("qk_clip_tau")
            end = offset + records[-1]["step"]
            if tau:
                ax.hlines(tau, offset, end, colors="k", linestyles="--", lw=1)
        ax.axvline(offset, color="gray", lw=0.5)
        ax.text(offset, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top", fontsize=9)
        offset += records[-1]["step"]
    ax.set_xlabel("optimizer step, stages one after the other (dashed: QK-Clip τ)")
    ax.set_ylabel("max attention logit")
    ax.set_title("QK-Clip: the largest pre-softmax logit per layer")
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no training steps yet", ha="center", transform=ax.transAxes)
    images["qk_clip"] = _png(fig)
    return images


# ---------------------------------------------------------------------------- episodes
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI's list of text parts
        content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def render_episode(episode: dict[str, Any], title: str) -> str:
    """One agent episode as HTML: each turn, tool calls with their arguments and results, the grade."""
    verdict = "success" if episode.get("success") else "failure"
    reward = episode.get("reward")
    parts = [f'<div class="episode {verdict}"><h4>{_e(title)}: {_e(episode.get("task_id"))} '
             f'<span class="tag">{_e(episode.get("kind"))}</span> <span class="tag">{_e(episode.get("domain"))}</span></h4>']
    for message in episode.get("messages", []):
        role = str(message.get("role", "?"))
        text = _text(message.get("content"))
        if role == "system":
            parts.append(f'<details class="msg system"><summary>system prompt ({len(text)} characters)</summary>'
                         f"<pre>{_e(text)}</pre></details>")
            continue
        label = {"user": "user", "assistant": "agent", "tool": "tool result"}.get(role, role)
        extra = ""
        if role == "tool":
            extra = f' <span class="tag">{_e(message.get("name") or message.get("tool_call_id") or "")}</span>'
        body = f"<pre>{_e(text)}</pre>" if text.strip() else ""
        calls = []
        for call in message.get("tool_calls") or []:
            function = call.get("function", {}) if isinstance(call, dict) else {}
            arguments = function.get("arguments", "")
            try:
                arguments = json.dumps(json.loads(arguments), indent=1, ensure_ascii=False)
            except (TypeError, ValueError):
                arguments = str(arguments)
            calls.append(f'<div class="call">call <b>{_e(function.get("name", "?"))}</b> '
                         f'<span class="tag">{_e(call.get("id", ""))}</span><pre>{_e(arguments)}</pre></div>')
        parts.append(f'<div class="msg {_e(role)}"><div class="role">{_e(label)}{extra}</div>{body}{"".join(calls)}</div>')
    grade = episode.get("grade") or {}
    components = "; ".join(f"{k}: {v.get('reward')}" for k, v in (grade.get("components") or {}).items())
    parts.append(f'<div class="grade {verdict}">grade: <b>{verdict}</b>, reward {_e(reward)}, ended by '
                 f'{_e(episode.get("termination"))}{(" — " + _e(components)) if components else ""}</div></div>')
    return "\n".join(parts)


# ---------------------------------------------------------------------------- the page
CSS = """
body{font-family:sans-serif;margin:24px auto;max-width:1200px;color:#222;background:#fff;line-height:1.4}
h1{margin-bottom:0}.sub{color:#555;margin-top:4px}
table{border-collapse:collapse;margin:12px 0;font-size:14px}
th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eef}
td:first-child,td:last-child,th:first-child,th:last-child{text-align:left}
tr.pending td{color:#999}
img{max-width:100%;border:1px solid #ddd;margin:6px 0}
.episode{border:2px solid #ccc;border-radius:6px;padding:8px 12px;margin:14px 0}
.episode.success{border-color:#5a5}.episode.failure{border-color:#c77}
.msg{margin:6px 0;padding:4px 8px;border-left:4px solid #ccc}.msg.user{border-color:#48c;background:#f3f8ff}
.msg.assistant{border-color:#a6c;background:#faf5ff}.msg.tool{border-color:#999;background:#f6f6f6}
.role{font-weight:bold;font-size:13px}.tag{font-size:12px;color:#555;background:#eee;padding:0 4px;border-radius:3px}
pre{white-space:pre-wrap;word-break:break-word;margin:2px 0;font-size:13px}
.call{margin:4px 0 4px 12px}.grade{margin-top:8px;font-size:14px}.grade.success{color:#262}.grade.failure{color:#933}
"""


def write_report(out: Path, plan: list[Any], markers: dict[str, dict[str, Any]], figures: dict[str, dict[str, Any]],
                 record: dict[str, Any], settings: EvalSettings) -> Path:
    """Write ``OUT/report.html`` (atomically) and return its path."""
    rows = table_rows(plan, markers, figures, out)
    images = plots(out, rows)
    machine = record.get("machine", {})
    done = sum(r["done"] for r in rows)
    head = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>k2 recipe report</title>", f"<style>{CSS}</style></head><body>",
            "<h1>k2 recipe</h1>",
            f'<p class="sub">{done} of {len(rows)} stages finished in {_e(out)}; stage time '
            f'{_e(record.get("total_seconds"))} s on {_e(machine.get("platform", "?"))} '
            f'({_e(machine.get("cpu_model") or "?")}, {_e(machine.get("cpu_count", "?"))} CPUs).'
            f'{" Interrupted during " + _e(record["interrupted"]) + "." if record.get("interrupted") else ""}</p>']
    body = ["<h2>What each stage changed</h2>", "<table><tr>" + "".join(f"<th>{_e(label)}</th>" for _, label in COLUMNS) + "</tr>"]
    for row in rows:
        cls = "" if row["done"] else ' class="pending"'
        body.append(f"<tr{cls}>" + "".join(f"<td>{_e(_cell(k, row.get(k)))}</td>" for k, _ in COLUMNS) + "</tr>")
    body.append("</table>")
    base = baselines(out / "train")
    notes = []
    if base:
        notes.append(f"Validation loss is on the pretraining data's validation split; the n-gram baselines "
                     f"fitted on its training split score unigram {base['unigram_nats']:.3f} and Kneser–Ney "
                     f"bigram {base['bigram_nats']:.3f} nats/token (“below bigram”: how far under the bigram).")
    agentic_row = next((r for r in rows if r.get("agentic_records")), None)
    if agentic_row:
        notes.append(f"Tool use: k2 eval agentic on {agentic_row['agentic_records']} held-out k2 synth records "
                     f"({agentic_row['agentic_mode']} decoding, greedy).")
    arith_row = next((r for r in rows if r.get("arithmetic_prompts")), None)
    if arith_row:
        notes.append(f"Arithmetic: greedy accuracy on {arith_row['arithmetic_prompts']} held-out prompts of "
                     "k2.rl's arithmetic task. Critic agreement: the share of held-out answer pairs where the RL "
                     "stage's critic prefers the one the verifier scored higher (only when a critic was trained).")
    body.append("<p>" + " ".join(_e(n) for n in notes) + "</p>")
    body.append("<h2>Curves</h2>")
    for key, alt in (("loss", "training and validation loss of each stage"), ("reward", "RL reward and held-out accuracy"),
                     ("stages", "figures after each stage"), ("qk_clip", "QK-Clip max logit per layer")):
        body.append(f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{images[key]}"><figcaption>{_e(alt)}'
                    "</figcaption></figure>")
    body.append("<h2>Agent episodes</h2>")
    shown = 0
    for name in ("rl", "sft", "train"):
        agentic = figures.get(name, {}).get("agentic")
        if not agentic or not agentic.get("episodes"):
            continue
        body.append(f"<p>Held-out episodes played by the model after <b>{_e(name)}</b> "
                    f"({_e(agentic['mode'])} decoding, the programmatic user, graded against the task's gold actions).</p>")
        for i, episode in enumerate(agentic["episodes"][:settings.report_episodes]):
            body.append(render_episode(episode, f"episode {i + 1}"))
            shown += 1
        break
    if not shown:
        body.append("<p>No episodes yet: they are played once the SFT or pretraining model meets the synthesized tasks.</p>")
    body.append("<h2>Stages</h2><table><tr><th>stage</th><th>time (s)</th><th>attempts</th><th>command</th></tr>")
    for stage in plan:
        m = markers.get(stage.name)
        body.append(f"<tr><td>{_e(stage.name)}</td><td>{_e(m['seconds'] if m else '–')}</td>"
                    f"<td>{_e(m['attempts'] if m else '–')}</td><td><code>{_e(stage.command())}</code></td></tr>")
    body.append("</table>")
    page = "\n".join(head + body + ["</body></html>"]) + "\n"
    path = out / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
