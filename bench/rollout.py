"""Rollout generation speed: k2's RolloutEngine against transformers' ``generate``, on the CPU.

Both run the same model: a k2 tiny-preset model saved as a k2 checkpoint, exported with the path
of ``k2 ckpt export-hf`` (:func:`k2.checkpoint.export_hf`) and loaded by transformers'
``DeepseekV3ForCausalLM.from_pretrained``. Both generate for the same batch of prompts of the
same length, exactly ``--new-tokens`` tokens each (no stop token), by temperature + top-p sampling
(transformers' top-k is switched off), at the same torch thread count, in one process.

Rows of the table:

* ``uniform``: every request has the full budget (the peer's setting: one static batch);
  columns: RolloutEngine, k2's plain ``K2ForCausalLM.generate`` (a static batch on the same
  cache), transformers.
* ``ragged`` (unless --quick): 4 x batch requests with budgets spread over 1..new-tokens,
  as RL rollouts stop at different lengths. The engine refills finished rows; the peer runs
  static batches of ``batch`` requests, each batch as long as its longest budget (tokens past a
  request's budget are wasted). Tokens/s counts budgeted tokens only.

Times are medians of interleaved rounds (one run of each per round), so drifting load on a
shared machine hits all columns alike.

Run:  python bench/rollout.py                      (tiny preset, batch 8, 32 + 64 tokens)
      python bench/rollout.py --threads 1          (steadier on a busy machine)
      python bench/rollout.py --quick              (a few seconds: smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from k2 import checkpoint
from k2.model import K2Config, K2ForCausalLM
from k2.rl import Request, RolloutEngine


def export_for_transformers(model: K2ForCausalLM, directory: Path):  # noqa: ANN201
    """Save ``model`` as a k2 checkpoint, export it to the Hub layout, load it in transformers."""
    from transformers import DeepseekV3ForCausalLM

    checkpoint.save(directory / "run", model, step=0, durable=False)
    checkpoint.export_hf(directory / "run", directory / "hf", log=lambda _line: None)
    return DeepseekV3ForCausalLM.from_pretrained(directory / "hf", dtype=torch.float32).eval()


def median_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each run over ``repeats`` interleaved rounds (after one warm-up)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def hf_generate(
    reference, prompts: torch.Tensor, new_tokens: int, temperature: float, top_p: float  # noqa: ANN001
) -> torch.Tensor:
    with torch.no_grad():
        out = reference.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            eos_token_id=None,
        )
    assert out.shape[1] == prompts.shape[1] + new_tokens, out.shape
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    parser.add_argument("--batch", type=int, default=8, help="sequences generated together (default 8)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument(
        "--quick", action="store_true", help="a 2-layer tiny model, batch 2, 8 + 8 tokens, no ragged row"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = K2Config.from_preset(args.preset)
    if args.quick:
        args.batch, args.prompt_len, args.new_tokens, args.repeats = 2, 8, 8, 1
        config = dataclasses.replace(config, num_hidden_layers=2, vocab_size=1024)

    import transformers

    torch.manual_seed(0)
    model = K2ForCausalLM(config).eval()
    batch, new = args.batch, args.new_tokens
    prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len))
    requests = [Request(p, new, args.temperature, args.top_p) for p in prompts.tolist()]
    engine = RolloutEngine(model, max_batch=batch)
    with tempfile.TemporaryDirectory() as directory:
        reference = export_for_transformers(model, Path(directory))

    print(f"# rollout: k2 RolloutEngine vs transformers {transformers.__version__} generate, preset {args.preset}"
          f"{' (quick: 2 layers)' if args.quick else ''}, batch {batch}, prompt {args.prompt_len} + {new} new "
          f"tokens, temperature {args.temperature}, top-p {args.top_p}, fp32, CPU")  # fmt: skip
    print(f"# machine: {platform.machine()} cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")  # fmt: skip

    runs = {
        "k2_engine": lambda: engine.generate(requests),
        "k2_generate": lambda: model.generate(
            prompts, max_new_tokens=new, temperature=args.temperature, top_p=args.top_p, stop_tokens=[]
        ),
        "transformers": lambda: hf_generate(reference, prompts, new, args.temperature, args.top_p),
    }
    seconds = median_times(runs, args.repeats)
    tokens = batch * new
    rates = {name: tokens / s for name, s in seconds.items()}
    result: dict = {
        "bench": "rollout",
        "preset": args.preset,
        "quick": args.quick,
        "batch": batch,
        "prompt_len": args.prompt_len,
        "new_tokens": new,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "threads": torch.get_num_threads(),
        "uniform_tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
        "uniform_ratio_vs_transformers": round(rates["k2_engine"] / rates["transformers"], 2),
    }
    print(f"{'workload':<10} {'k2 engine tok/s':>16} {'k2 generate':>12} {'transformers':>13} {'engine/hf':>10}")
    print(f"{'uniform':<10} {rates['k2_engine']:>16.1f} {rates['k2_generate']:>12.1f} "
          f"{rates['transformers']:>13.1f} {result['uniform_ratio_vs_transformers']:>9.2f}x")  # fmt: skip

    if not args.quick:
        g = torch.Generator().manual_seed(1)
        count = 4 * batch
        budgets = torch.randint(1, new + 1, (count,), generator=g).tolist()
        ragged_prompts = torch.randint(0, config.vocab_size, (count, args.prompt_len), generator=g)
        ragged = [Request(p, b, args.temperature, args.top_p) for p, b in zip(ragged_prompts.tolist(), budgets)]

        def hf_static() -> None:
            for start in range(0, count, batch):
                longest = max(budgets[start : start + batch])
                hf_generate(reference, ragged_prompts[start : start + batch], longest, args.temperature, args.top_p)

        ragged_runs = {"k2_engine": lambda: engine.generate(ragged), "transformers": hf_static}
        ragged_seconds = median_times(ragged_runs, args.repeats)
        useful = sum(budgets)
        ragged_rates = {name: useful / s for name, s in ragged_seconds.items()}
        result["ragged_requests"] = count
        result["ragged_tokens_per_s"] = {k: round(v, 1) for k, v in ragged_rates.items()}
        result["ragged_ratio_vs_transformers"] = round(ragged_rates["k2_engine"] / ragged_rates["transformers"], 2)
        print(f"{'ragged':<10} {ragged_rates['k2_engine']:>16.1f} {'-':>12} {ragged_rates['transformers']:>13.1f} "
              f"{result['ragged_ratio_vs_transformers']:>9.2f}x")  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
