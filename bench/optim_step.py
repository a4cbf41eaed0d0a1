"""Benchmark one full MuonClip optimizer step on the `tiny` k2 preset, on the CPU.

    python bench/optim_step.py [--quick] [--steps N]

Contenders, each on its own copy of the model with the same gradients, timed in the same run:

* **MuonClip** — k2's optimizer as configured by default: Muon (quintic Newton–Schulz in fp32,
  same-shape matrices and expert stacks orthogonalized as batches) + AdamW, then QK-Clip and the
  router-bias update (a small no-grad forward before each step records what those need; it is
  not timed).
* **(a) reference loop** — the same math written straightforwardly: a Python loop over
  parameters and over the experts of each stack, fp32 Newton–Schulz one matrix at a time, and
  ``torch.optim.AdamW`` for the rest. This is the goal's baseline (MuonClip >= 1.1x).
* **(b) torch.optim.Muon** — stock torch Muon (``adjust_lr_fn="match_rms_adamw"``; it runs its
  iteration in bf16 whatever the parameter dtype, which is slow on CPUs) + ``torch.optim.AdamW``.
  torch.optim.Muon only takes 2-D parameters, so each expert stack is given to it as E separate
  matrices, as a user of the Hub layout would.

Newton–Schulz throughput: MuonClip's batches are timed on their own and their FLOPs counted as
dense products (per step, for r = min(m, n), s = max(m, n): X Xᵀ 2r²s + A·A 2r³ + B·X 2r²s),
then compared with this machine's fp32 matmul rate, measured in the same run on square
``torch.mm`` products (1024) — the goal is 70% or more; the ratio is also measured on one thread,
which a shared machine's load disturbs much less.

Times are medians over the timed steps. Prints a header, a table and one final JSON line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from k2.model import K2Config, K2ForCausalLM
from k2.optim import MuonClip
from k2.optim.muon import _batches
from k2.optim.newton_schulz import QUINTIC, NewtonSchulzSchedule, orthogonalize

LR, WEIGHT_DECAY, MOMENTUM = 2e-4, 0.1, 0.95
MATMUL_N, MATMUL_REPEAT = 1024, 4  # the machine's fp32 rate: 4 products of 1024 x 1024 matrices


def interleaved_seconds(contenders: dict[str, tuple[Callable[[], None], Callable[[], None]]],
                        repeat: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each contender's ``run`` over ``repeat`` rounds, after ``warmup`` rounds.

    Each round runs every contender once, in turn, so that a change in the machine's load
    (it is shared) hits all of them alike; ``prepare`` runs untimed before each ``run``.

    Args:
        contenders: name -> (prepare, run).
        repeat: timed rounds.
        warmup: untimed rounds first.

    Returns:
        name -> seconds per timed round.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(warmup + repeat):
        for name, (prepare, run) in contenders.items():
            prepare()
            start = time.perf_counter()
            run()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _nothing() -> None:
    pass


# ---------------------------------------------------------------- (a) the reference loop


def newton_schulz_one(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The textbook iteration on one fp32 matrix [m, n]."""
    a, b, c = QUINTIC
    X = G.float()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() + eps)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if tall else X


class ReferenceMuon:
    """Muon one parameter and one matrix at a time (sum momentum, Nesterov, Moonlight scale)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.buffers = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        for p, M in zip(self.params, self.buffers):
            M.mul_(MOMENTUM).add_(p.grad)
            U = p.grad + MOMENTUM * M
            matrices = U if U.ndim == 3 else U[None]
            O = torch.stack([newton_schulz_one(matrix) for matrix in matrices]).view_as(p)
            m, n = p.shape[-2:]
            p.mul_(1 - LR * WEIGHT_DECAY)
            p.add_(O, alpha=-LR * 0.2 * math.sqrt(max(m, n)))


# ---------------------------------------------------------------- setup


def tiny_model(quick: bool) -> K2ForCausalLM:
    """The `tiny` preset; for --quick, cut to 2 layers and a 1024-token vocabulary."""
    config = K2Config.from_preset("tiny")
    if quick:
        config = dataclasses.replace(config, num_hidden_layers=2, vocab_size=1024)
    torch.manual_seed(0)
    return K2ForCausalLM(config).train()


def set_grads(params: list[nn.Parameter], seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-2


def split_experts(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """2-D leaves for torch.optim.Muon: matrices as they are, each stack as E matrices."""
    out = []
    for p in params:
        for matrix, grad in zip(p.detach().reshape(-1, *p.shape[-2:]), p.grad.reshape(-1, *p.shape[-2:])):
            leaf = nn.Parameter(matrix.clone())
            leaf.grad = grad.clone()
            out.append(leaf)
    return out


def newton_schulz_work(opt: MuonClip) -> tuple[Callable[[], None], float]:
    """MuonClip's Newton–Schulz batches for one step on random inputs, and their FLOPs."""
    (group,) = [g for g in opt.param_groups if g["kind"] == "muon"]
    params = group["params"]
    schedule = NewtonSchulzSchedule(tuple(group["ns_coefficients"]), group["ns_input_scale"])
    inputs, flops = [], 0.0
    for batch in _batches(params, True, 1 << 27):
        m, n = params[batch[0]].shape[-2:]
        count = sum(params[i].numel() // (m * n) for i in batch)
        inputs.append(torch.randn(count, m, n))
        r, s = min(m, n), max(m, n)
        flops += count * schedule.steps * (4 * r * r * s + 2 * r**3)
    return lambda: [orthogonalize(G, schedule, dtype=torch.float32) for G in inputs], flops


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a fast smoke run: 2 timed rounds on a 2-layer cut of the preset (figures not comparable)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 7; each runs every contender)")
    args = parser.parse_args()
    repeat = args.steps or (2 if args.quick else 7)

    print(f"# k2 optimizer step | {platform.processor() or platform.machine()} | {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads | load average {os.getloadavg()[0]:.1f} | "
          f"torch {torch.__version__} | Python {platform.python_version()}")
    model = tiny_model(args.quick)
    preset = "tiny (2-layer quick cut)" if args.quick else "tiny"
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))

    # MuonClip
    ours = copy.deepcopy(model)
    opt = MuonClip(ours, lr=LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM)
    set_grads(list(ours.parameters()))

    def record() -> None:  # what QK-Clip and the router-bias update read: one small forward
        with torch.no_grad():
            ours(ids)

    muon_params = [p for _, p in opt.split.muon]
    n_muon, n_matrices = len(muon_params), sum(p.numel() // math.prod(p.shape[-2:]) for p in muon_params)

    # (a) reference loop
    ref = copy.deepcopy(model)
    ref_params = dict(ref.named_parameters())
    ref_muon = ReferenceMuon([ref_params[name] for name, _ in opt.split.muon])
    ref_adamw = torch.optim.AdamW([ref_params[name] for name, _ in opt.split.adamw], lr=LR,
                                  betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)
    set_grads(list(ref.parameters()))

    # (b) stock torch.optim.Muon
    stock = copy.deepcopy(model)
    stock_params = dict(stock.named_parameters())
    set_grads(list(stock.parameters()))
    torch_muon = torch.optim.Muon(split_experts([stock_params[name] for name, _ in opt.split.muon]), lr=LR,
                                  weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, adjust_lr_fn="match_rms_adamw")
    torch_adamw = torch.optim.AdamW([stock_params[name] for name, _ in opt.split.adamw], lr=LR,
                                    betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)

    # Newton–Schulz alone, and the machine's fp32 matmul rate on a square product
    ns_run, flops = newton_schulz_work(opt)
    A, B = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    matmul_flops = MATMUL_REPEAT * 2 * MATMUL_N**3

    def matmuls() -> None:
        for _ in range(MATMUL_REPEAT):
            torch.mm(A, B)

    times = interleaved_seconds({
        "ours": (record, opt.step),
        "reference": (_nothing, lambda: (ref_muon.step(), ref_adamw.step())),
        "stock": (_nothing, lambda: (torch_muon.step(), torch_adamw.step())),
        "ns": (_nothing, ns_run),
        "matmul": (_nothing, matmuls),
    }, repeat)
    t_ours, t_ref, t_stock = (statistics.median(times[k]) for k in ("ours", "reference", "stock"))
    t_ns, t_mm = statistics.median(times["ns"]), statistics.median(times["matmul"])
    ns_rate, peak = flops / t_ns, matmul_flops / t_mm
    fraction = statistics.median((flops / a) / (matmul_flops / b) for a, b in zip(times["ns"], times["matmul"]))
    # The same on one thread: on a shared machine, other jobs' load stalls multi-threaded small
    # products far more than one big product, so this is the steadier figure of the code itself.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single = interleaved_seconds({"ns": (_nothing, ns_run), "matmul": (_nothing, matmuls)}, repeat)
    torch.set_num_threads(threads)
    fraction_1 = statistics.median((flops / a) / (matmul_flops / b) for a, b in zip(single["ns"], single["matmul"]))

    # Sanity: after the same number of steps MuonClip and the reference hold the same weights.
    with torch.no_grad():
        worst = max(float((a - b).abs().max() / b.abs().max()) for (_, a), b in
                    zip(opt.split.muon, ref_muon.params))

    rows = [
        ("MuonClip (k2)", t_ours),
        ("(a) reference loop: fp32 per-matrix Muon + AdamW", t_ref),
        ("(b) torch.optim.Muon (bf16 NS) + AdamW", t_stock),
    ]
    print(f"{preset} preset: {sum(p.numel() for p in model.parameters()):,} parameters; Muon: {n_muon} tensors "
          f"= {n_matrices} matrices; AdamW: {len(opt.split.adamw)} tensors")
    print(f"{'contender':<52} {'ms/step':>10} {'MuonClip speedup':>17}")
    for name, seconds in rows:
        print(f"{name:<52} {seconds * 1e3:>10.1f} {seconds / t_ours:>16.2f}x")
    print(f"Newton–Schulz (MuonClip batches): {flops / 1e9:.2f} GFLOP in {t_ns * 1e3:.1f} ms = "
          f"{ns_rate / 1e9:.1f} GFLOP/s; fp32 matmul (1024^2) {peak / 1e9:.1f} GFLOP/s -> "
          f"{fraction:.0%} of the machine's rate (median of per-round ratios); on one thread "
          f"{fraction_1:.0%} of one thread's rate")
    print(f"MuonClip vs reference after {repeat + 1} steps: max relative weight difference {worst:.1e}")
    print(json.dumps({
        "benchmark": "optim_step", "preset": preset, "steps": repeat,
        "muonclip_ms": round(t_ours * 1e3, 2),
        "speedup_vs_reference_loop": round(t_ref / t_ours, 3),
        "speedup_vs_torch_muon": round(t_stock / t_ours, 3),
        "ns_gflop": round(flops / 1e9, 3), "ns_gflops": round(ns_rate / 1e9, 2),
        "matmul_gflops": round(peak / 1e9, 2), "ns_fraction_of_matmul": round(fraction, 3),
        "ns_fraction_of_matmul_1_thread": round(fraction_1, 3),
        "max_rel_weight_diff_vs_reference": float(f"{worst:.2e}"),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
