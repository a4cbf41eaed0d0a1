"""What schema-constrained tool calls cost per generated token (docs/constrained-decoding.md).

The tiny K2 preset (random weights; vocabulary from a BPE tokenizer trained on the synthesized
data) continues ``--batch`` next-call prompts of a fresh ``k2 synth`` run (held-out records:
the conversation up to ``<|tool_call_begin|>``, real tool declarations) for ``--new-tokens``
tokens each, with no stop token, so both runs generate exactly the same number of tokens:

* unconstrained: plain greedy decoding;
* constrained: the same batch with a :class:`k2.agentic.constrain.ToolCallConstraint` per row
  (llguidance masks while a call is open, fixed masks between calls and in free text).

Each is timed ``--repeats`` times, alternating (the constrainer, its tokenizer and grammar caches are built
before timing, as in a long generation run; a fresh per-row state is made inside every timed run)
and the best time is kept. The JSON line reports seconds per generated token for both, their ratio
(goal: constrained at most 1.15x), the constraint's own work per token (building and applying the
masks, advancing the states: timed inside the constrained run) and the share of constrained
row-steps spent inside a call. Both runs are warmed up first (llguidance builds its lexer states
lazily, and a cached grammar keeps them). The two runs sample different tokens, and the MoE's cost
depends a little on which experts the tokens pick, so the wall-time ratio has noise that the
constraint's own time does not.

Run:  python bench/constrained_decoding.py            (CPU)
      python bench/constrained_decoding.py --quick    (a few seconds: smoke test)
      python bench/constrained_decoding.py --engine   (sample with k2.rl's RolloutEngine)
      python bench/constrained_decoding.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from k2.agentic.constrain import ToolCallConstrainer
from k2.agentic.evaluate import next_call_items
from k2.agentic.synth import SynthOptions, synthesize
from k2.data.tokenizer import train_tokenizer
from k2.model import K2Config, K2ForCausalLM
from k2.model import generate as generate_module
from k2.rl import rollout as rollout_module
from k2.rl.rollout import Request, RolloutEngine


def prompts(data: Path, tokenizer, batch: int, max_len: int):
    items = []
    for line in (data / "validation.jsonl").read_text().splitlines() + (data / "train.jsonl").read_text().splitlines():
        for item in next_call_items(json.loads(line)):
            ids = tokenizer.encode(item.prompt).ids
            if len(ids) <= max_len:
                items.append((ids, item.tools))
        if len(items) >= batch:
            break
    return items[:batch]


class ConstraintClock:
    """Times the constraint's own work inside generate: mask building and application
    (``apply_constraints``) and every row's ``advance``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._apply = generate_module.apply_constraints

        def apply(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._apply(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        generate_module.apply_constraints = apply
        rollout_module.apply_constraints = apply

    def wrap(self, constraint):
        advance = constraint.advance

        def timed_advance(token):
            start = time.perf_counter()
            try:
                advance(token)
            finally:
                self.seconds += time.perf_counter() - start

        constraint.advance = timed_advance
        return constraint


def timed(model, batch, new_tokens: int, constrainer, device: str, clock: ConstraintClock,
          engine: RolloutEngine | None = None) -> tuple[float, float, float]:
    """Seconds of one generate call, the constraint's own seconds in it, and the share of
    constrained row-steps inside a call."""
    constraints = None
    inside = []
    if constrainer is not None:
        constraints = [clock.wrap(constrainer.row(tools, ids)) for ids, tools in batch]
        for c in constraints:  # count the row-steps whose mask came from a call grammar
            original = c.allowed_mask

            def counted(vocab, c=c, original=original):
                inside.append(c.state == "in_call")
                return original(vocab)

            c.allowed_mask = counted
    if device == "cuda":
        torch.cuda.synchronize()
    clock.seconds = 0.0
    start = time.perf_counter()
    if engine is None:
        model.generate([ids for ids, _ in batch], max_new_tokens=new_tokens, stop_tokens=[], constraints=constraints)
    else:
        engine.generate([Request(ids, new_tokens, 0.0, constraint=c)
                         for (ids, _), c in zip(batch, constraints or [None] * len(batch))])
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, clock.seconds, (sum(inside) / len(inside) if inside else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="batch 2, 16 tokens, 1 repeat")
    parser.add_argument("--engine", action="store_true", help="sample with k2.rl's RolloutEngine instead of generate()")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.new_tokens, args.repeats = 2, 16, 1

    torch.manual_seed(0)
    config = K2Config.from_preset("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        synthesize(SynthOptions(n=60 if args.quick else 300, seed=0), data)
        tokenizer = train_tokenizer((data / "train.jsonl").read_text().splitlines(), config.vocab_size)
        batch = prompts(data, tokenizer, args.batch, config.max_position_embeddings - args.new_tokens)
    model = K2ForCausalLM(config).to(args.device).eval()
    constrainer = ToolCallConstrainer(tokenizer)
    clock = ConstraintClock()
    engine = RolloutEngine(model, max_batch=len(batch)) if args.engine else None
    for c in (None, constrainer):  # warm up: kernels; grammars and llguidance's lexer states
        timed(model, batch, args.new_tokens, c, args.device, clock, engine)

    results = {"unconstrained": float("inf"), "constrained": float("inf")}
    own = float("inf")
    inside = 0.0
    for _ in range(args.repeats):  # alternate, so that a busy moment of the machine hits both
        for name, c in (("unconstrained", None), ("constrained", constrainer)):
            seconds, constraint_seconds, share = timed(model, batch, args.new_tokens, c, args.device, clock, engine)
            results[name] = min(results[name], seconds / (len(batch) * args.new_tokens))
            if c is not None:
                inside = share
                own = min(own, constraint_seconds / (len(batch) * args.new_tokens))
    summary = {
        "bench": "constrained_decoding",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "machine": platform.machine(), "threads": torch.get_num_threads(),
        "sampler": "RolloutEngine" if args.engine else "generate", "model": "tiny", "vocab": tokenizer.get_vocab_size(), "batch": len(batch), "new_tokens": args.new_tokens,
        "prompt_tokens_mean": sum(len(ids) for ids, _ in batch) / len(batch),
        "s_per_token_unconstrained": results["unconstrained"],
        "s_per_token_constrained": results["constrained"],
        "ratio": results["constrained"] / results["unconstrained"],
        "s_per_token_constraint_work": own,
        "constraint_work_share": own / results["unconstrained"],
        "in_call_share": inside,
    }
    print(f"per generated token: unconstrained {results['unconstrained'] * 1e3:.3f} ms, constrained "
          f"{results['constrained'] * 1e3:.3f} ms, ratio {summary['ratio']:.3f} "
          f"({inside:.0%} of constrained row-steps inside a call); the constraint's own work "
          f"{own * 1e3:.3f} ms = {summary['constraint_work_share']:.1%} of an unconstrained token")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
