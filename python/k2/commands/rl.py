"""``k2 rl``: reinforcement learning with verifiable rewards on a K2 policy.

``k2 rl --init RUN_OR_CHECKPOINT --task arithmetic [--objective k2|grpo]`` samples K responses
per prompt with the rollout engine, scores them with the task's verifier and steps MuonClip on
the K2 loss (or GRPO), with an optional warm-start SFT on the task's gold examples and an
optional PTX loss, in a run directory like ``k2 train``'s (config, metrics, plots, checkpoints,
--resume, Ctrl-C). docs/rl.md, "The RL loop", describes it.
"""

from __future__ import annotations

import argparse


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
    from k2.train.resume import add_run_flags

    parser = subparsers.add_parser(
        "rl",
        help="RL with verifiable rewards (K2 loss or GRPO) from a trained policy",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]
        + "\n\nSettings come from the defaults, then --config FILE.toml, then the flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_flags(parser, RLConfig, RL_FLAGS, RL_HELP)
    parser.set_defaults(handler=run)
