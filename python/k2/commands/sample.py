"""``k2 sample RUN``: generate text from a trained run's newest checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from k2.errors import ConfigError, K2IOError


def run(args: argparse.Namespace) -> int:
    import torch

    from k2 import checkpoint
    from k2.data import load_tokenizer, render_chat
    from k2.model import K2Config, K2ForCausalLM

    run_dir = Path(args.run)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise K2IOError(f"{config_file} does not exist: is {run_dir} a k2 training run directory?")
    config = json.loads(config_file.read_text())
    if args.messages:
        messages = json.loads(Path(args.messages).read_text())
        prompt = render_chat(messages, add_generation_prompt=True)
    elif args.prompt_file:
        prompt = Path(args.prompt_file).read_text()
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise ConfigError("give --prompt TEXT, --prompt-file FILE or --messages FILE.json")

    tokenizer = load_tokenizer(config["data_dir"])
    model = K2ForCausalLM(K2Config.from_preset(config["preset"]))
    checkpoint.load(run_dir / "checkpoints", model, restore_rng=False)
    ids = tokenizer.encode(prompt).ids
    generator = torch.Generator().manual_seed(args.seed)
    eod = tokenizer.token_to_id("<|endoftext|>")
    stops = [eod] + ([tokenizer.token_to_id("<|im_end|>")] if args.messages else [])
    outputs = model.generate([ids] * args.num_samples, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, stop_tokens=stops,
                             generator=generator)
    for i, new in enumerate(outputs):
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        sys.stdout.write(prompt + tokenizer.decode(list(new)) + "\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate from a trained run (a prompt, a prompt file or chat messages)",
        description="Load RUN's newest checkpoint and continue a prompt. --messages takes a JSON "
        "list of chat messages ({role, content}) rendered with K2's chat template. Temperature "
        "0 decodes greedily; 0.7-1.0 with top-p 0.9-0.95 gives varied samples.",
    )
    parser.add_argument("run", metavar="RUN", help="the training run directory")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a file")
    source.add_argument("--messages", metavar="FILE", help="a JSON list of chat messages")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default 0.95)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to draw (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.set_defaults(handler=run)
