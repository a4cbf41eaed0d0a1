"""``k2 recipe``: the whole K2 recipe in miniature, in one command (docs/recipe.md).

``k2 recipe [--config recipe.toml] [--out runs/recipe]`` runs ``k2 train`` (pretraining with
MuonClip), ``k2 synth`` (tool-use data), ``k2 sft`` and ``k2 rl`` (verifiable rewards, and
critic-rewarded prompts when configured) in order, each reading the previous one's output;
evaluates the model after every stage the same way; and writes a stage table and a
self-contained report, OUT/report.html.
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from k2.recipe import config as recipe_config
    from k2.recipe.run import run as run_recipe

    path = args.config or (recipe_config.QUICK_CONFIG if args.quick else recipe_config.DEFAULT_CONFIG)
    if args.config and args.quick:
        from k2.errors import ConfigError

        raise ConfigError("--quick picks the built-in quick settings; it cannot go with --config")
    result = run_recipe(recipe_config.load(path), args.out)
    return 130 if result.interrupted else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recipe",
        help="the whole recipe: pretrain, synthesize, SFT, RL, evaluate after each, and a report",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]
        + "\n\nA stage that finished (its marker OUT/stages/NAME.done.json exists) is skipped, so "
        "running the same command again after a crash or Ctrl-C resumes where it stopped: an "
        "unfinished training stage continues from its newest checkpoint (--resume), k2 synth starts "
        "over. One TOML file holds every stage's settings: tables [train], [synth], [sft], [rl] "
        "(the commands' settings, named as their flags with underscores) and [eval].",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="the recipe's TOML file (default: the built-in k2/recipe/default.toml, "
                        "sized for tens of minutes on a 2-core CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="the built-in quick settings (k2/recipe/quick.toml): a few minutes, to "
                        "see every stage run; the figures mean little")
    parser.add_argument("--out", default="runs/recipe", metavar="DIR",
                        help="where every stage's output, the table and report.html go (default runs/recipe)")
    parser.set_defaults(handler=run)
