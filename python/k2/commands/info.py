"""``k2 info``: a model preset's configuration and its exact parameter counts.

The model is built on PyTorch's meta device, so even the full 1T-parameter Kimi-K2 preset is
counted in a second without allocating its weights.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def preset_info(name: str) -> dict[str, Any]:
    """The preset's Hub-style configuration plus its total and active parameter counts."""
    import torch

    from k2.model import K2Config, K2ForCausalLM

    config = K2Config.from_preset(name)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    total, active = model.parameter_counts()
    return {
        "preset": name,
        "total_parameters": total,
        "active_parameters": active,
        "config": config.to_hf_dict(),
    }


def run(args: argparse.Namespace) -> int:
    from k2.model.config import ConfigError

    try:
        info = preset_info(args.preset)
    except ConfigError as err:  # an unknown preset: a usage error, like argparse's own
        args.parser.error(str(err))
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"preset             {info['preset']}")
    print(f"total parameters   {info['total_parameters']:,}")
    print(f"active parameters  {info['active_parameters']:,} "
          f"({info['active_parameters'] / 1e9:.2f}B per token)")
    print("configuration (config.json fields):")
    config = info["config"]
    width = max(map(len, config))
    for key, value in config.items():
        print(f"  {key:<{width}}  {json.dumps(value)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="print a model preset's configuration and exact parameter counts",
        description="Print a K2 model preset's configuration (as config.json fields) and its "
        "exact total and active (per-token) parameter counts. The model is built on the meta "
        "device, so the full kimi-k2 preset costs no memory.",
    )
    parser.add_argument(
        "--preset",
        default="tiny",
        metavar="PRESET",
        help="a preset of k2.model.config.PRESETS: tiny: ~10M, trains on a laptop CPU; small: ~150M, one GPU; kimi-k2: the full "
        "1.03T-parameter K2 (default: tiny)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.set_defaults(handler=run, parser=parser)
