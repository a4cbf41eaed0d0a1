"""``k2 plot RUN``: redraw a training run's PNG plots from its metrics log."""

from __future__ import annotations

import argparse
from pathlib import Path

from k2.errors import K2IOError


def run(args: argparse.Namespace) -> int:
    from k2.train.plots import plot_run

    metrics = Path(args.run) / "metrics.jsonl"
    if not metrics.is_file():
        raise K2IOError(f"{metrics} does not exist: is {args.run} a k2 training run directory?")
    for path in plot_run(args.run):
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="redraw a training run's plots (loss, lr, grad norm, max logits, ...)",
        description="Read RUN/metrics.jsonl and write one PNG per recorded quantity beside it "
        "(loss.png, lr.png, grad_norm.png, max_logit.png, clipped_heads.png, "
        "expert_balance.png, tokens_per_s.png). Safe to run while training is still going.",
    )
    parser.add_argument("run", metavar="RUN", help="the run directory (it holds metrics.jsonl)")
    parser.set_defaults(handler=run)
