"""Training throughput of the K2 model against transformers' DeepseekV3ForCausalLM, on the CPU.

Both models hold the same weights (k2's ``to_hf_state_dict()`` written with safetensors and read
back by ``from_pretrained``) and run the same training step: forward with labels, loss, backward,
in training mode (k2 records QK-Clip's max logits and expert loads, as it does when it trains).
transformers is measured with both of its expert implementations, ``eager`` (a loop over experts)
and ``grouped_mm`` (``torch._grouped_mm``); its attention is its default (``sdpa``).

Besides the whole model, three blocks are timed alone (forward + backward of a sum of outputs):
one MLA layer, one MoE layer, and the output head with its loss, so the whole-model ratio is not
just the loss head.

Model FLOPs per token (forward + backward = 3x forward):
    6 * N_matmul  +  6 * L * H * (d_qk + d_v) * T / 2
where N_matmul counts the weights one token multiplies with (active parameters minus the
embedding table and norm gains: lm_head, router and the K chosen + shared experts included), and
the second term is causal attention (scores and weighted values over T/2 keys on average). The
achieved FLOP/s are compared with this machine's fp32 matmul rate, measured in the same run on a
square GEMM; the step time that rate implies is a floor for any implementation of the same math
whose GEMMs run no faster than that (the tiny model is GEMM-bound, which caps any speedup over
transformers).

Run:  python bench/model_throughput.py            (batch 8 x 256, the tiny preset)
      python bench/model_throughput.py --threads 1 --clock cpu   (steadier on a busy machine)
      python bench/model_throughput.py --quick    (a few seconds: smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from k2.model import K2Config, K2ForCausalLM
from k2.model.mla import build_attention_mask
from k2.model.loss import linear_cross_entropy, shift_labels


def interleaved_medians(steps: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of each step, timed in alternating rounds (one call of each per round).

    Alternating makes the ratios robust to load that drifts during the run (the machine is shared).
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(_timed(step))
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_flops_per_second(size: int, repeats: int) -> float:
    """fp32 FLOP/s of ``[size, size] @ [size, size]`` (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best


CLOCK = time.perf_counter  # --clock cpu switches to the process's CPU time


def _timed(fn: Callable[[], object]) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def model_flops_per_token(model: K2ForCausalLM, seq_len: int) -> float:
    """``6 * N_matmul + 6 * L * H * (d_qk + d_v) * T / 2`` (see the module docstring)."""
    config = model.config
    _, active = model.parameter_counts()
    not_matmul = model.model.embed_tokens.weight.numel()
    not_matmul += sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    n_matmul = active - not_matmul
    attention = config.num_hidden_layers * config.num_attention_heads
    attention *= config.qk_head_dim + config.v_head_dim
    return 6 * n_matmul + 6 * attention * seq_len / 2


def load_reference(model: K2ForCausalLM, directory: Path, experts_implementation: str):  # noqa: ANN201
    """transformers' DeepseekV3ForCausalLM with k2's weights, through the Hub file layout."""
    from safetensors.torch import save_file
    from transformers import DeepseekV3ForCausalLM

    if not (directory / "model.safetensors").exists():
        tensors = {k: v.detach().clone().contiguous() for k, v in model.to_hf_state_dict().items()}
        save_file(tensors, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    reference = DeepseekV3ForCausalLM.from_pretrained(
        directory, dtype=torch.float32, experts_implementation=experts_implementation
    )
    return reference.train()


def training_step(model: torch.nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(tokens, labels=tokens).loss.backward()

    return step


def block_steps(k2: K2ForCausalLM, references: dict, tokens: torch.Tensor) -> dict[str, dict[str, Callable]]:  # noqa: ANN001
    """Steps for one MLA layer, one MoE layer and the head with loss: k2's, then each
    transformers model's (both expert implementations for the MoE; attention and head do not
    depend on it, so one suffices)."""
    batch, length = tokens.shape
    moe_index = k2.config.first_k_dense_replace
    x = torch.randn(batch, length, k2.config.hidden_size, requires_grad=True)
    positions = torch.arange(length).expand(batch, -1)
    mask = build_attention_mask(positions)
    rope = k2.model.rotary_emb(positions)
    first = next(iter(references.values()))
    hf_rope = first.model.rotary_emb(x, positions)

    def mla(attention, *inputs) -> Callable[[], None]:  # noqa: ANN001, ANN002
        return lambda: _first(attention(x, *inputs)).sum().backward()

    def moe(block) -> Callable[[], None]:  # noqa: ANN001
        return lambda: block(x).sum().backward()

    def k2_head() -> None:  # what K2ForCausalLM does with labels: the fused head + loss
        linear_cross_entropy(x, k2.lm_head.weight, shift_labels(tokens))[1].backward()

    def hf_head() -> None:
        logits = first.lm_head(x)
        first.loss_function(logits=logits, labels=tokens, vocab_size=first.config.vocab_size).backward()

    return {
        "mla_layer": {
            "k2": mla(k2.model.layers[0].self_attn, rope, mask),
            "transformers": mla(first.model.layers[0].self_attn, hf_rope, None),
        },
        "moe_layer": {"k2": moe(k2.model.layers[moe_index].mlp)}
        | {f"hf_{name}": moe(hf.model.layers[moe_index].mlp) for name, hf in references.items()},
        "head_loss": {"k2": k2_head, "transformers": hf_head},
    }


def _first(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per measurement (median)")
    parser.add_argument("--gemm-size", type=int, default=1024, help="square fp32 GEMM for the peak rate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time, steadier on a machine "
        "shared with other jobs (use it with --threads 1)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="batch 2 x 64, 1 repeat: a smoke run")
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.seq_len, args.repeats, args.gemm_size = 2, 64, 1, 256
    warmup = 1

    import transformers

    torch.manual_seed(0)
    config = K2Config.from_preset(args.preset)
    k2 = K2ForCausalLM(config).train()
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))
    with tempfile.TemporaryDirectory() as directory:
        references = {name: load_reference(k2, Path(directory), name) for name in ("eager", "grouped_mm")}

    print(f"# model_throughput: k2 vs transformers DeepseekV3ForCausalLM, preset {args.preset}, "
          f"batch {args.batch} x {args.seq_len}, forward+backward, fp32, CPU")  # fmt: skip
    print(f"# machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"torch_threads={torch.get_num_threads()} clock={args.clock}")  # fmt: skip
    print(f"# versions: python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; load average {os.getloadavg()[0]:.1f}")  # fmt: skip

    step_tokens = args.batch * args.seq_len
    whole = {"k2": training_step(k2, tokens)}
    whole |= {f"hf_{name}": training_step(hf, tokens) for name, hf in references.items()}
    seconds = interleaved_medians(whole, warmup, args.repeats)
    best_hf = min(("hf_eager", "hf_grouped_mm"), key=seconds.__getitem__)

    block_seconds = {
        block: interleaved_medians(steps, warmup, args.repeats)
        for block, steps in block_steps(k2, references, tokens).items()
    }
    block_ratios = {
        block: min(t for name, t in times.items() if name != "k2") / times["k2"]
        for block, times in block_seconds.items()
    }

    peak = matmul_flops_per_second(args.gemm_size, max(3, args.repeats))
    flops_token = model_flops_per_token(k2, args.seq_len)
    achieved = flops_token * step_tokens / seconds["k2"]

    print(f"\n{'whole model (fwd+bwd)':<22} {'tokens/s':>10} {'k2 speedup':>11}")
    for name, value in seconds.items():
        print(f"{name:<22} {step_tokens / value:>10.0f} {value / seconds['k2']:>10.2f}x")
    print(f"\n{'block (fwd+bwd)':<12} {'k2 ms':>8}  {'transformers ms':<36} {'speedup':>8}")
    for block, times in block_seconds.items():
        theirs = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in times.items() if k != "k2")
        print(f"{block:<12} {times['k2'] * 1e3:>8.1f}  {theirs:<36} {block_ratios[block]:>7.2f}x")
    print(f"\nmodel FLOPs/token = 6*N_matmul + 6*L*H*(d_qk+d_v)*T/2 = {flops_token / 1e6:.1f} MFLOP")
    print(f"fp32 matmul rate ({args.gemm_size}x{args.gemm_size} GEMM): {peak / 1e9:.1f} GFLOP/s; "
          f"k2 achieves {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.1%} of it")  # fmt: skip
    floor = flops_token * step_tokens / peak
    print(f"a step whose every FLOP ran at that rate would take {floor * 1e3:.0f} ms: k2 takes "
          f"{seconds['k2'] / floor:.2f}x that, {best_hf} {seconds[best_hf] / floor:.2f}x")  # fmt: skip

    result = {
        "bench": "model_throughput",
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "k2_tokens_per_s": round(step_tokens / seconds["k2"], 1),
        "hf_eager_tokens_per_s": round(step_tokens / seconds["hf_eager"], 1),
        "hf_grouped_mm_tokens_per_s": round(step_tokens / seconds["hf_grouped_mm"], 1),
        "speedup_vs_best_hf": round(seconds[best_hf] / seconds["k2"], 3),
        "best_hf": best_hf,
        "block_speedups": {k: round(v, 3) for k, v in block_ratios.items()},
        "model_flops_per_token": flops_token,
        "gemm_size": args.gemm_size,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "fraction_of_fp32_matmul_peak": round(achieved / peak, 4),
        "gemm_floor_ms": round(flops_token * step_tokens / peak * 1e3, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
