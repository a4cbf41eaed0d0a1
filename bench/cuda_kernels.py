"""Benchmark k2's CUDA kernels against their PyTorch references on one GPU.

    python bench/cuda_kernels.py [--quick]

Baselines, run in the same process:
* Newton–Schulz (5 quintic steps): torch's three-matmul bf16 iteration
  (``k2.kernels.newton_schulz.newton_schulz_reference(..., dtype=bfloat16)``). FLOPs per step for X (m x n, m <= n),
  counted as dense products: X Xᵀ 2m²n + A A 2m³ + B X 2m²n. The kernel computes only half of the
  two symmetric products, so its ideal gain is about 1.39x for a square-ish matrix.
* MoE dispatch + combine (route, permute, combine; forward): the PyTorch reference path. Bytes
  moved: permute reads and writes N·H elements, combine reads N·H and writes T·H, plus indices.

Times are medians of CUDA-event timings after warm-up. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys

import torch

HBM_TBPS = 4.8  # H200 HBM3e bandwidth, TB/s (spec sheet)


def time_cuda(fn, repeat: int, warmup: int = 3) -> float:
    """Median seconds per call of ``fn`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def ns_flops(batch: int, m: int, n: int, steps: int) -> float:
    m, n = min(m, n), max(m, n)
    return batch * steps * (4 * m * m * n + 2 * m**3)


def bench_newton_schulz(shapes, repeat):
    from k2.kernels.newton_schulz import newton_schulz_cuda, newton_schulz_reference
    from k2.optim.newton_schulz import NewtonSchulzSchedule

    rows = []
    schedule = NewtonSchulzSchedule.resolve("quintic", 5)
    for batch, m, n in shapes:
        G = torch.randn(batch, m, n, device="cuda")
        t_ref = time_cuda(lambda: newton_schulz_reference(G, schedule.coefficients, schedule.input_scale, dtype=torch.bfloat16), repeat)
        t_k2 = time_cuda(lambda: newton_schulz_cuda(G, schedule.folded()), repeat)
        flops = ns_flops(batch, m, n, 5)
        rows.append({
            "case": f"NS {batch}x{m}x{n}", "torch_ms": t_ref * 1e3, "k2_ms": t_k2 * 1e3,
            "speedup": t_ref / t_k2, "k2_tflops": flops / t_k2 / 1e12,
            "torch_tflops": flops / t_ref / 1e12,
        })
    return rows


def bench_dispatch(T, k, E, H, repeat):
    from k2.kernels import moe_dispatch as md

    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    topk = torch.rand(T, E, device="cuda").topk(k, dim=1).indices
    w = torch.rand(T, k, device="cuda")

    def run(route, permute, combine):
        r = route(topk, E)
        return combine(permute(x, r), w, r)

    t_ref = time_cuda(lambda: run(md.route_reference, md.permute_reference, md.combine_reference),
                      repeat)
    t_k2 = time_cuda(lambda: run(md.route, md.permute, md.combine), repeat)
    N = T * k
    moved = 2 * (2 * N * H + N * H + T * H) + 8 * 4 * N
    return {
        "case": f"dispatch+combine T={T} k={k} E={E} H={H}", "torch_ms": t_ref * 1e3,
        "k2_ms": t_k2 * 1e3, "speedup": t_ref / t_k2, "k2_tbps": moved / t_k2 / 1e12,
        "hbm_fraction": moved / t_k2 / 1e12 / HBM_TBPS,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/cuda_kernels.py needs a CUDA GPU; nothing measured on this machine.")
        print(json.dumps({"benchmark": "kernels", "skipped": "no CUDA device"}))
        return 0
    from k2.kernels.launch import cuda_kernels_available

    if not cuda_kernels_available():
        print("CUDA is present but the kernels cannot run: install CuPy and cuda-bindings.")
        return 1
    props = torch.cuda.get_device_properties(0)
    print(f"# k2 kernels | {props.name} | torch {torch.__version__} | CUDA {torch.version.cuda} "
          f"| Python {platform.python_version()}")
    repeat = 3 if args.quick else 10
    shapes = [(1, 512, 1024), (8, 256, 512)] if args.quick else [(1, 4096, 16384), (64, 512, 1792)]
    rows = bench_newton_schulz(shapes, repeat)
    disp = bench_dispatch(*((1024, 8, 64, 1024) if args.quick else (16384, 8, 384, 7168)), repeat)

    print(f"{'case':<46} {'torch ms':>10} {'k2 ms':>10} {'speedup':>8} {'k2 rate':>14}")
    for r in rows:
        print(f"{r['case']:<46} {r['torch_ms']:>10.3f} {r['k2_ms']:>10.3f} {r['speedup']:>7.2f}x "
              f"{r['k2_tflops']:>8.1f} TFLOP/s")
    print(f"{disp['case']:<46} {disp['torch_ms']:>10.3f} {disp['k2_ms']:>10.3f} "
          f"{disp['speedup']:>7.2f}x {disp['k2_tbps']:>9.2f} TB/s ({disp['hbm_fraction']:.0%} HBM)")
    print(json.dumps({
        "benchmark": "kernels", "device": props.name,
        "newton_schulz": {r["case"]: {"speedup_vs_torch_bf16": round(r["speedup"], 3),
                                      "k2_tflops": round(r["k2_tflops"], 1)} for r in rows},
        "dispatch_combine": {"speedup_vs_reference": round(disp["speedup"], 3),
                             "hbm_fraction": round(disp["hbm_fraction"], 3)},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
