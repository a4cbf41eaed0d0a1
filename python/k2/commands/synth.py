"""``k2 synth``: synthesize tool-use training data (docs/synthesis.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EPILOG = """\
Every episode is a pure function of --seed and its index, so the same options give byte-identical
output, whatever --workers is. The card (card.md) reports the kept share and why the rest were
rejected. Roles can be played by an OpenAI-compatible endpoint (--user/--expert/--judge/--evolve
openai with --openai-base-url and --openai-model); output is then as deterministic as the endpoint.
"""


def _mix(text: str) -> dict[str, float]:
    from k2.errors import ConfigError

    out: dict[str, float] = {}
    for part in text.split(","):
        kind, sep, share = part.partition("=")
        if not sep:
            raise ConfigError(f"synth: --mix entry {part!r} is not KIND=SHARE (e.g. single=0.3,multi=0.2)")
        try:
            out[kind.strip()] = float(share)
        except ValueError:
            raise ConfigError(f"synth: --mix share {share!r} of {kind.strip()} is not a number") from None
    return out


def run(args: argparse.Namespace) -> int:
    from k2.agentic.synth.output import Progress, synthesize
    from k2.agentic.synth.pipeline import DEFAULT_MIX, Synthesizer, SynthOptions
    from k2.errors import ConfigError

    mix = dict(DEFAULT_MIX)
    if args.mix:
        mix = {k: 0.0 for k in mix} | _mix(args.mix)
    options = SynthOptions(
        n=args.n, seed=args.seed, domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()), mix=mix,
        per_tool=args.per_tool, held_out=args.held_out, held_out_templates=args.held_out_templates,
        validation=args.validation, mistake_rate=args.mistake_rate, stochastic=not args.no_failures,
        failure_rate=args.failure_rate, max_tools=args.max_tools, max_chars=args.max_chars, tool_chars=args.tool_chars,
        tokenizer=args.tokenizer, max_tokens=args.max_tokens,
    )
    options.check()
    endpoint = (args.openai_model, args.openai_base_url, args.openai_api_key)
    roles = {"user": args.user, "expert": args.expert, "judge": args.judge, "evolve": args.evolve}
    remote = [name for name, how in roles.items() if how == "openai"]
    if remote and args.workers > 1:
        raise ConfigError(f"synth: --workers > 1 needs programmatic roles ({', '.join(remote)} use an endpoint)")
    kwargs: dict[str, Any] = {}
    if remote:
        from k2.agentic.synth import backends

        model, base_url, key = endpoint
        if not model:
            raise ConfigError(f"synth: --{remote[0]} openai needs --openai-model (and --openai-base-url for a local endpoint)")
        client = backends.make_client(base_url, key)
        if args.evolve == "openai":
            kwargs["describe"] = backends.OpenAIRewriter(model, client=client, seed=args.seed)
        if args.user == "openai":
            kwargs["user"] = backends.openai_user(model, client=client)
        if args.expert == "openai":
            kwargs["expert"] = backends.OpenAIExpert(model, client=client, seed=args.seed)
        if args.judge == "openai":
            kwargs["rubric_judge"] = backends.OpenAIRubricJudge(model, client=client, seed=args.seed)
    synth = Synthesizer(options, **kwargs) if kwargs else None
    progress = Progress(options.n, sys.stderr) if not args.quiet else None
    card = synthesize(options, args.out, workers=args.workers, overwrite=args.overwrite, progress=progress, synthesizer=synth)
    print(
        f"wrote {card['kept']} trajectories ({card['by_split'].get('train', 0)} train, "
        f"{card['by_split'].get('validation', 0)} validation) to {args.out}; kept {100 * card['kept_share']:.1f} % "
        f"of {card['attempted']} episodes; card: {args.out}/card.md"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth", help="synthesize tool-use training data (agentic SFT)",
        description="Synthesize graded tool-use trajectories from evolved tool variants (docs/synthesis.md).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder (train/validation JSONL, tasks, variants, card)")
    p.add_argument("--n", type=int, default=1000, help="trajectories to keep (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    p.add_argument("--domains", default="bank,calendar,contacts,device,notes,shop", help="comma-separated built-in domains")
    p.add_argument("--mix", default=None, help="task-kind shares, e.g. single=0.25,multi=0.25,parallel=0.15,info=0.15,error=0.1,impossible=0.1 (kinds left out get 0)")
    p.add_argument("--per-tool", type=int, default=60, help="tool variants per base tool (default 60)")
    p.add_argument("--held-out", type=float, default=0.1, help="share of tool variants never used in training (default 0.1)")
    p.add_argument("--held-out-templates", type=float, default=0.1, help="share of task templates never used in training (default 0.1)")
    p.add_argument("--validation", type=float, default=0.1, help="share of episodes in the validation split (default 0.1)")
    p.add_argument("--mistake-rate", type=float, default=0.1, help="chance an episode holds one recovered argument mistake (default 0.1)")
    p.add_argument("--failure-rate", type=float, default=0.05, help="chance a tool call fails transiently (default 0.05)")
    p.add_argument("--no-failures", action="store_true", help="no transient tool failures")
    p.add_argument("--max-tools", type=int, default=4, help="most tools an agent declares (default 4)")
    p.add_argument("--max-chars", type=int, default=3600, help="reject trajectories whose rendered text is longer (default 3600)")
    p.add_argument("--tool-chars", type=int, default=1500, help="budget of declaration JSON for distractor tools (default 1500)")
    p.add_argument("--tokenizer", default=None, help="a prepared data folder (or tokenizer.json): also reject conversations over --max-tokens")
    p.add_argument("--max-tokens", type=int, default=1024, help="with --tokenizer, the most tokens a rendered conversation may have (default 1024)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (output is the same for any count)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    for role, default, choices in (("user", "programmatic", ("programmatic", "openai")), ("expert", "scripted", ("scripted", "openai")),
                                   ("judge", "rubric", ("rubric", "openai")), ("evolve", "rules", ("rules", "openai"))):
        p.add_argument(f"--{role}", default=default, choices=choices, help=f"who plays the {role} role (default {default})")
    p.add_argument("--openai-base-url", default=None, help="an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    p.add_argument("--openai-model", default=None, help="the model the endpoint serves")
    p.add_argument("--openai-api-key", default=None, help="its key (default: OPENAI_API_KEY)")
    p.set_defaults(handler=run)
