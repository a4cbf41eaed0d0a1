"""The figure of docs/results.md's "Tool use after SFT": the SFT loss on assistant tokens and the
held-out tool-use figures of ``k2 eval agentic`` against the tokens the model was trained on.

Inputs: the ``k2 sft`` run directory (its ``metrics.jsonl``: train and validation loss, the
batch shape from ``config.json``) and ``k2 eval agentic`` outputs (the JSON line it prints last)
of the pretrained model (0 SFT tokens) and of SFT checkpoints, each given as ``STEP=FILE``;
optionally a memorization-ceiling run's final evaluation (``--ceiling STEP=FILE``).

    python bench/plot_sft_study.py --run runs/sft --eval 0=eval_pre.log --eval 300=eval_300.log \\
        --eval 450=eval_450.log --ceiling 450=eval_ceiling.log --out docs/sft_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from study import save_figure


def last_json(path: Path) -> dict:
    """The last line of a ``k2 eval agentic`` log that is a JSON object (its results)."""
    for line in reversed(path.read_text().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"{path}: no JSON result line (did k2 eval agentic finish?)")


def step_file(text: str) -> tuple[int, Path]:
    step, _, file = text.partition("=")
    if not file:
        raise argparse.ArgumentTypeError(f"expected STEP=FILE, got {text!r}")
    return int(step), Path(file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="the k2 sft run directory")
    parser.add_argument("--eval", action="append", type=step_file, default=[], metavar="STEP=FILE")
    parser.add_argument("--ceiling", type=step_file, default=None, metavar="STEP=FILE")
    parser.add_argument("--chance", type=float, default=None,
                        help="tool-name accuracy of a uniform pick among the declared tools (%%)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = json.loads((args.run / "config.json").read_text())
    per_step = config["batch_size"] * config["seq_len"] * config.get("grad_accum", 1)
    records = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"] * per_step / 1e6, r["loss"]) for r in records if r["kind"] == "train" and "loss" in r]
    val = [(r["step"] * per_step / 1e6, r["val_loss"]) for r in records if r["kind"] == "eval" and "val_loss" in r]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(*zip(*train), color="tab:blue", alpha=0.5, label="train (one step)")
    if val:
        left.plot(*zip(*val), color="tab:blue", marker="o", label="validation (held-in)")
    left.set_xlabel("packed tokens seen (millions)")
    left.set_ylabel("loss on assistant tokens (nats/token)")
    left.set_title("k2 sft", fontsize=10)
    left.grid(alpha=0.3)
    left.legend()

    points = sorted((step * per_step / 1e6, last_json(path)) for step, path in args.eval)
    xs = [x for x, _ in points]
    series = (("tool_name_accuracy", "tool-name accuracy", "tab:green"),
              ("next_call_exact_match", "next-call exact match", "tab:orange"),
              ("episode_success_single_multi", "episode success, single/multi", "tab:purple"))
    for key, label, colour in series:
        for mode, style in (("constrained", dict(marker="o", label=f"{label} (constrained)")),
                            ("unconstrained", dict(marker="x", linestyle=":", alpha=0.7))):
            # An evaluation without episodes has no episode figures: leave those points out.
            got = [(x, 100 * d[mode][key]) for x, d in points if d[mode].get(key) is not None]
            if got:
                right.plot(*zip(*got), color=colour, **style)
        if args.ceiling:
            step, path = args.ceiling
            value = last_json(path)["constrained"].get(key)
            if value is not None:
                right.scatter([step * per_step / 1e6], [100 * value], marker="*", s=140, color=colour,
                              edgecolor="black", zorder=5)
    if args.chance is not None:
        right.axhline(args.chance, color="tab:green", linestyle="--", linewidth=1, alpha=0.6,
                      label=f"tool name by chance ({args.chance:.1f} %)")
    right.set_xlabel("packed SFT tokens (millions); 0 = the pretrained model")
    right.set_ylabel("% on held-out tool variants")
    right.set_title("k2 eval agentic (solid: constrained, dotted: free; star: memorization ceiling)", fontsize=9)
    right.set_ylim(-2, 102)
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="upper left")
    save_figure(fig, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
