"""``k2 rl``: reinforcement learning with verifiable rewards on a K2 policy.

``k2 rl --init RUN_OR_CHECKPOINT --task arithmetic [--objective k2|grpo]`` samples K responses
per prompt with the rollout engine, scores them with the task's verifier and steps MuonClip on
the K2 loss (or GRPO), with an optional warm-start SFT on the task's gold examples and an
optional PTX loss, in a run directory like ``k2 train``'s (config, metrics, plots, checkpoints,
--resume, Ctrl-C). docs/rl.md, "The RL loop", describes it.
"""

from __future__ import annotations

import argparse
import dataclasses


def run(args: argparse.Namespace) -> int:
    from k2.rl.config import RL_FLAGS, RLConfig
    from k2.rl.loop import RLTrainer
    from k2.train.resume import command_config

    overrides = {name: getattr(args, name) for name in RL_FLAGS}
    config, point = command_config(args, overrides, RLConfig)
    assert isinstance(config, RLConfig)
    result = RLTrainer(config, resume=args.resume, progress=not args.no_progress,
                       resume_point=point, allow_changes=args.allow_changes).run()
    return 130 if result.interrupted else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from k2.rl.config import RL_FLAGS, RL_HELP, RLConfig

    parser = subparsers.add_parser(
        "rl",
        help="RL with verifiable rewards (K2 loss or GRPO) from a trained policy",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]
        + "\n\nSettings come from the defaults, then --config FILE.toml, then the flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="a TOML file of settings")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its newest complete, verified "
                        "checkpoint, with the settings stored there")
    parser.add_argument("--allow-changes", action="store_true",
                        help="with --resume: continue even though training settings differ")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    fields = {f.name: f for f in dataclasses.fields(RLConfig)}
    for name in RL_FLAGS:
        f = fields[name]
        flag = "--" + name.replace("_", "-")
        default = f.default
        help_text = RL_HELP[name] + (f" (default: {default!r})" if default not in ([], "") else "")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, dest=name, type=kind, default=None,
                                metavar=name.upper(), help=help_text)
    parser.set_defaults(handler=run)
