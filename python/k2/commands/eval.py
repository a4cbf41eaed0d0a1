"""``k2 eval agentic RUN --data DIR``: tool-use figures on a ``k2 synth`` output's held-out split,
with and without schema-constrained decoding (docs/constrained-decoding.md)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from k2.errors import ConfigError


def agentic(args: argparse.Namespace) -> int:
    import torch

    from k2.agentic.evaluate import AgenticEvaluator, EvalOptions, format_table, load_eval_set, load_model

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    for flag in ("call_tokens", "turn_tokens", "episode_tokens"):
        if getattr(args, flag) < 8:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 8, got {getattr(args, flag)}")
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature must be at least 0, got {args.temperature}")
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.constraints]
    options = EvalOptions(limit=args.limit, split=args.split, batch_size=args.batch_size,
                          call_tokens=args.call_tokens, turn_tokens=args.turn_tokens,
                          episode_tokens=args.episode_tokens, episodes=not args.no_episodes, modes=modes,
                          temperature=args.temperature, seed=args.seed)
    torch.manual_seed(args.seed)
    model, tokenizer, ckpt = load_model(args.run)
    data = load_eval_set(args.data, args.split, args.limit)
    start = time.monotonic()

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - start:6.1f}s] {line}", file=sys.stderr, flush=True)

    progress(f"model {ckpt}; {len(data.records)} {args.split} records from {args.data}")
    results = AgenticEvaluator(model, tokenizer, options, progress).run(data)
    print(format_table(results))
    summary = {"run": str(args.run), "checkpoint": str(ckpt), "data": str(args.data), "split": args.split,
               "records": len(data.records), "seconds": round(time.monotonic() - start, 1),
               "options": {"call_tokens": args.call_tokens, "turn_tokens": args.turn_tokens,
                           "episode_tokens": args.episode_tokens, "temperature": args.temperature,
                           "seed": args.seed, "episodes": not args.no_episodes},
               **results}
    print(json.dumps(summary, sort_keys=True))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model (agentic: tool use on held-out tasks)",
                                   description="Evaluate a trained model.")
    commands = parser.add_subparsers(dest="eval_command", metavar="SUITE", required=True)
    p = commands.add_parser(
        "agentic", help="next-call match, episode success and schema validity on k2 synth's held-out split",
        description="Evaluate RUN_OR_CHECKPOINT (a k2 run directory, a checkpoint root or a checkpoint) "
        "on the held-out tasks and tool variants of a k2 synth output: tool-name accuracy and next-call "
        "exact match, full-episode success with the programmatic user and the grader, and the share of "
        "schema-valid calls, with and without schema-constrained decoding. Prints a table and one JSON line.",
    )
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a k2 run directory or checkpoint")
    p.add_argument("--data", required=True, metavar="DIR", help="a k2 synth output directory")
    p.add_argument("--split", default="validation", help="which split (default validation: the held-out one)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N records")
    p.add_argument("--constraints", choices=("both", "on", "off"), default="both",
                   help="decode with schema constraints, without, or both (default both)")
    p.add_argument("--no-episodes", action="store_true", help="skip the full episodes")
    p.add_argument("--batch-size", type=int, default=8, help="rows decoded together: the rollout engine's slots (default 8)")
    p.add_argument("--call-tokens", type=int, default=128, help="budget of a next-call prediction (default 128)")
    p.add_argument("--turn-tokens", type=int, default=256, help="budget of an assistant turn (default 256)")
    p.add_argument("--episode-tokens", type=int, default=1024, help="budget of an episode (default 1024)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(handler=agentic)
