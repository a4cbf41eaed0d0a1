"""``k2 train``: pretrain a K2 model (the project's main job).

With no arguments it prepares the built-in corpus (the Python standard library) if needed,
trains the ``tiny`` preset with MuonClip on a WSD schedule for a few minutes on a laptop CPU, and
ends with validation loss against a Kneser–Ney bigram baseline and sampled continuations.
Under ``torchrun --nproc_per_node N -m k2 train ...`` it trains data-parallel (gloo on CPU,
NCCL on GPU).
"""

from __future__ import annotations

import argparse

from k2.train.config import HELP, TrainConfig
from k2.train.resume import add_run_flags, command_config


def run(args: argparse.Namespace) -> int:
    from k2.train.pretrain import Trainer

    overrides = {name: getattr(args, name) for name in TrainConfig.fields()}
    config, point = command_config(args, overrides)
    result = Trainer(config, resume=args.resume, progress=not args.no_progress,
                     resume_point=point, allow_changes=args.allow_changes).run()
    return 130 if result.interrupted else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="pretrain a K2 model (default: the tiny preset on the built-in corpus, minutes on a CPU)",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]
        + "\n\nSettings come from the defaults, then --config FILE.toml (flat keys or a [train] "
        "table, named as the flags with underscores), then the flags you give. Everything a run "
        "did lands in RUN_DIR: config.json, environment.json, metrics.jsonl, checkpoints/, "
        "PNG plots and samples.txt. Ctrl-C saves a checkpoint; --resume continues from it with the "
        "stored settings and refuses changed training settings unless --allow-changes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_flags(parser, TrainConfig, TrainConfig.fields(), HELP)
    parser.set_defaults(handler=run)
