"""``k2 sft``: fine-tune a K2 model on chat data, with the loss on the assistant's tokens only.

``k2 sft --init RUN_OR_CHECKPOINT --data FILE.jsonl [DIR ...]`` starts from a ``k2 train`` run
(its newest checkpoint) or a checkpoint directory, prepares the OpenAI-format chat JSONL once
into loss-masked token shards under the run directory, and trains with MuonClip on a WSD
schedule in a run directory like ``k2 train``'s (config, metrics, plots, checkpoints, --resume,
Ctrl-C). docs/sft.md describes it.
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from k2.train.resume import command_config
    from k2.train.sft import SFT_FLAGS, SFTConfig, SFTTrainer

    overrides = {name: getattr(args, name) for name in SFT_FLAGS}
    config, point = command_config(args, overrides, SFTConfig)
    result = SFTTrainer(config, resume=args.resume, progress=not args.no_progress,
                        resume_point=point, allow_changes=args.allow_changes).run()
    return 130 if result.interrupted else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from k2.train.resume import add_run_flags
    from k2.train.sft import SFT_FLAGS, SFT_HELP, SFTConfig

    parser = subparsers.add_parser(
        "sft",
        help="fine-tune a model on chat JSONL (loss on assistant tokens only)",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]
        + "\n\nSettings come from the defaults, then --config FILE.toml, then the flags. Lines "
        "that cannot be trained on (unknown roles, dangling tool_call_ids, invalid JSON "
        "arguments, conversations longer than --seq-len, ...) are skipped and counted, with their "
        "first line numbers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_flags(parser, SFTConfig, SFT_FLAGS, SFT_HELP)
    parser.set_defaults(handler=run)
