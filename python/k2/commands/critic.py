"""``k2 critic``: the self-critique rubric reward's data (docs/critic.md).

``k2 critic rubrics [--task NAME] [--rubrics FILE]`` prints the rubrics a critic judges a task's
replies by; ``k2 critic bootstrap --out FILE`` writes the critic's bootstrap mix — synthesized
preference pairs as chat conversations for ``k2 sft --data FILE``.
"""

from __future__ import annotations

import argparse


def run_rubrics(args: argparse.Namespace) -> int:
    from k2.rl.critic.rubrics import rubrics_for

    for rubric in rubrics_for(args.task, file=args.rubrics):
        check = f" (checked: {rubric.check})" if rubric.check else ""
        print(rubric.line() + check)
    return 0


def run_bootstrap(args: argparse.Namespace) -> int:
    from k2.errors import ConfigError
    from k2.rl.critic.bootstrap import write_bootstrap

    if args.n < 1:
        raise ConfigError(f"critic bootstrap: --n must be at least 1, got {args.n}")
    if not 0 <= args.bait_share <= 1:
        raise ConfigError(f"critic bootstrap: --bait-share must lie in [0, 1], got {args.bait_share}")
    rows = write_bootstrap(args.out, args.n, args.seed, level=args.level, bait_share=args.bait_share,
                           rubrics_file=args.rubrics)
    print(f"wrote {rows} conversations ({args.n} preference pairs, both orders) to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("critic", help="the self-critique reward's rubrics and bootstrap data",
                                   description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="critic_command", metavar="ACTION", required=True)
    rubrics = sub.add_parser("rubrics", help="print the rubrics of a task's critic")
    rubrics.add_argument("--task", default=None, help="task name (arithmetic, countdown, bait, ...)")
    rubrics.add_argument("--rubrics", default=None, metavar="FILE", help="a JSON file of extra rubrics")
    rubrics.set_defaults(handler=run_rubrics)
    boot = sub.add_parser("bootstrap", help="write synthesized preference pairs as an SFT mix (JSONL)")
    boot.add_argument("--out", required=True, metavar="FILE", help="the JSONL file to write")
    boot.add_argument("--n", type=int, default=2000, help="preference pairs (two conversations each)")
    boot.add_argument("--seed", type=int, default=0)
    boot.add_argument("--level", type=int, default=2, help="arithmetic difficulty level of the prompts")
    boot.add_argument("--bait-share", type=float, default=0.25, help="share of pairs on bait questions")
    boot.add_argument("--rubrics", default=None, metavar="FILE", help="a JSON file of extra rubrics")
    boot.set_defaults(handler=run_bootstrap)
