"""Benchmark k2's CUDA kernels against their PyTorch references on one GPU.

    python bench/cuda_kernels.py [--quick] [--part all|ns-moe|mla]

Baselines, run in the same process:
* Newton–Schulz (5 quintic steps): torch's three-matmul bf16 iteration
  (``k2.kernels.newton_schulz.newton_schulz_reference(..., dtype=bfloat16)``). FLOPs per step for X (m x n, m <= n),
  counted as dense products: X Xᵀ 2m²n + A A 2m³ + B X 2m²n. The kernel computes only half of the
  two symmetric products, so its ideal gain is about 1.39x for a square-ish matrix.
* MoE dispatch + combine (route, permute, combine; forward): the PyTorch reference path. Bytes
  moved: permute reads and writes N·H elements, combine reads N·H and writes T·H, plus indices.

* MLA decode (absorbed, one new token per sequence over the latent cache), two PyTorch
  baselines: the absorbed path as ``k2.model.mla.MLA._absorbed`` runs it (concatenated query and
  key, a broadcast matmul over heads — which copies the cache once per head — fp32 softmax,
  ``probs.to(bf16) @ c``), and the same math with the heads folded into the rows of one ``bmm``
  per sequence (``mla_decode_reference``'s form, no copies): the fair baseline. The mask is
  built beforehand and the ``W_uk``/``W_uv`` products are left out on all sides. Bytes: the cache
  read once (B·S·(R+P) bf16) plus queries and outputs; the HBM fraction uses the device's
  spec-sheet bandwidth. The kernel runs without range validation (a caller validates once per
  batch composition, not per layer).
* MLA training forward with per-head max logits: ``MLA._attend``'s path, PyTorch's fused
  attention with the document mask plus its separate max pass (scores again, masked, amax); also
  the fused attention alone. FLOPs count allowed (query, key) pairs: 2·(Dk + Dv) each.

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


def hbm_tbps(name: str) -> float:
    """Spec-sheet HBM bandwidth (TB/s) of the device, by name (H200 when unknown)."""
    for key, tbps in (("H200", 4.8), ("H100", 3.35), ("A100", 2.0)):
        if key in name:
            return tbps
    return HBM_TBPS


def bench_mla_decode(B, H, S, repeat, R=512, P=64):
    """Absorbed decode at batch B, H heads, S cached tokens per sequence (all full)."""
    from k2.kernels import mla_decode as md

    q_latent = torch.randn(B, 1, H, R, device="cuda", dtype=torch.bfloat16)
    q_pe = torch.randn(B, 1, H, P, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(B, S, R, device="cuda", dtype=torch.bfloat16)
    k_pe = torch.randn(B, S, P, device="cuda", dtype=torch.bfloat16)
    starts = torch.zeros(B, dtype=torch.int32, device="cuda")
    ends = torch.full((B,), S, dtype=torch.int32, device="cuda")
    allowed = md.decode_allowed(starts, ends, 1, S)[:, None]  # [B, 1, 1, S], built once
    scale = 192 ** -0.5

    def torch_absorbed():  # the lines of MLA._absorbed between W_uk and W_uv
        q = torch.cat((q_latent, q_pe), dim=-1).transpose(1, 2)
        k = torch.cat((c, k_pe), dim=-1)[:, None]
        scores = torch.matmul(q * scale, k.transpose(-1, -2)).float()
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        return torch.matmul(probs.to(c.dtype), c[:, None])

    folded_mask = allowed[:, 0].expand(B, H, S)  # T = 1: row h of sequence b

    def torch_folded():  # heads folded into rows: [B, H, R+P] x [B, R+P, S], no broadcast copy
        q = torch.cat((q_latent, q_pe), dim=-1).reshape(B, H, R + P)
        k = torch.cat((c, k_pe), dim=-1)
        scores = torch.bmm(q * scale, k.transpose(1, 2)).float()
        probs = torch.softmax(scores.masked_fill(~folded_mask, float("-inf")), dim=-1)
        return torch.bmm(probs.to(c.dtype), c)

    t_model = time_cuda(torch_absorbed, max(2, repeat // 3))
    t_ref = time_cuda(torch_folded, repeat)
    t_k2 = time_cuda(lambda: md.mla_decode_cuda(q_latent, q_pe, c, k_pe, starts, ends, scale), repeat)
    moved = 2 * (B * S * (R + P) + B * H * (R + P) + B * H * R)
    flops = 2 * B * H * S * (R + P + R)
    peak = hbm_tbps(torch.cuda.get_device_name(0))
    return {
        "case": f"MLA decode B={B} H={H} S={S} R={R} P={P}", "torch_ms": t_ref * 1e3,
        "k2_ms": t_k2 * 1e3, "speedup": t_ref / t_k2, "model_path_ms": t_model * 1e3,
        "speedup_vs_model_path": t_model / t_k2, "k2_tbps": moved / t_k2 / 1e12,
        "hbm_fraction": moved / t_k2 / 1e12 / peak, "torch_hbm_fraction": moved / t_ref / 1e12 / peak,
        "k2_tflops": flops / t_k2 / 1e12,
    }


def bench_mla_attention(B, H, T, docs, repeat, Dk=192, Dv=128):
    """Training forward with per-head max logits over packed documents of the given lengths."""
    import torch.nn.functional as F

    from k2.kernels import mla_attention as ma

    q = torch.randn(B, H, T, Dk, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, H, T, Dk, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, H, T, Dv, device="cuda", dtype=torch.bfloat16)
    positions = torch.cat([torch.arange(n) for n in docs])[None].repeat(B, 1).cuda()
    doc_start = ma.doc_starts(positions)
    allowed = ma.allowed_pairs(doc_start)  # [B, 1, T, T]
    scale = Dk ** -0.5

    def torch_attend(with_max=True):  # MLA._attend: the max pass, then fused attention
        if with_max:
            with torch.no_grad():
                scores = torch.matmul(q, k.transpose(-1, -2)).float()
                scores.masked_fill_(~allowed, float("-inf"))
                scores.amax(dim=(0, 2, 3)) * scale
        out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, Dk - Dv)), attn_mask=allowed, scale=scale)
        return out[..., :Dv]

    t_ref = time_cuda(torch_attend, repeat)
    t_fused = time_cuda(lambda: torch_attend(False), repeat)
    t_k2 = time_cuda(lambda: ma.mla_attention_cuda(q, k, v, doc_start, scale), repeat)
    pairs = int(allowed.sum()) * H
    flops = 2 * pairs * (Dk + Dv)
    return {
        "case": f"MLA train fwd+max B={B} H={H} T={T} docs={len(docs)}", "torch_ms": t_ref * 1e3,
        "k2_ms": t_k2 * 1e3, "speedup": t_ref / t_k2, "fused_only_ms": t_fused * 1e3,
        "speedup_vs_fused_only": t_fused / t_k2, "k2_tflops": flops / t_k2 / 1e12,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--part", choices=("all", "ns-moe", "mla"), default="all",
                        help="which kernels to measure (gpu_check.sh runs the parts separately)")
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
    if args.part == "mla":
        print(json.dumps({"benchmark": "kernels", "device": props.name,
                          **report_mla(args.quick, repeat)}))
        return 0
    shapes = [(1, 512, 1024), (8, 256, 512)] if args.quick else [(1, 4096, 16384), (64, 512, 1792)]
    rows = bench_newton_schulz(shapes, repeat)
    disp = bench_dispatch(*((1024, 8, 64, 1024) if args.quick else (16384, 8, 384, 7168)), repeat)

    print(f"{'case':<46} {'torch ms':>10} {'k2 ms':>10} {'speedup':>8} {'k2 rate':>14}")
    for r in rows:
        print(f"{r['case']:<46} {r['torch_ms']:>10.3f} {r['k2_ms']:>10.3f} {r['speedup']:>7.2f}x "
              f"{r['k2_tflops']:>8.1f} TFLOP/s")
    print(f"{disp['case']:<46} {disp['torch_ms']:>10.3f} {disp['k2_ms']:>10.3f} "
          f"{disp['speedup']:>7.2f}x {disp['k2_tbps']:>9.2f} TB/s ({disp['hbm_fraction']:.0%} HBM)")
    mla = report_mla(args.quick, repeat) if args.part == "all" else {}
    print(json.dumps({
        "benchmark": "kernels", "device": props.name,
        "newton_schulz": {r["case"]: {"speedup_vs_torch_bf16": round(r["speedup"], 3),
                                      "k2_tflops": round(r["k2_tflops"], 1)} for r in rows},
        "dispatch_combine": {"speedup_vs_reference": round(disp["speedup"], 3),
                             "hbm_fraction": round(disp["hbm_fraction"], 3)},
        **mla,
    }))
    return 0


def report_mla(quick: bool, repeat: int) -> dict:
    """Print the MLA rows and return their JSON fields: decode at batch 64, 64 heads, context
    4096 (the issue's case) and the training forward with max logits over packed documents at
    K2's head sizes."""
    dec = bench_mla_decode(*((8, 64, 1024) if quick else (64, 64, 4096)), repeat)
    docs = [100, 412] if quick else [1000, 3, 1500, 1593]
    att = bench_mla_attention(*((1, 8, 512) if quick else (1, 64, 4096)), docs, repeat)
    print(f"{'case':<46} {'torch ms':>10} {'k2 ms':>10} {'speedup':>8} {'k2 rate':>14}")
    print(f"{dec['case']:<46} {dec['torch_ms']:>10.3f} {dec['k2_ms']:>10.3f} {dec['speedup']:>7.2f}x "
          f"{dec['k2_tbps']:>9.2f} TB/s ({dec['hbm_fraction']:.0%} HBM; torch {dec['torch_hbm_fraction']:.0%})")
    print(f"{'  vs MLA._absorbed as written (broadcast copy)':<46} {dec['model_path_ms']:>10.3f} "
          f"{dec['k2_ms']:>10.3f} {dec['speedup_vs_model_path']:>7.2f}x")
    print(f"{att['case']:<46} {att['torch_ms']:>10.3f} {att['k2_ms']:>10.3f} {att['speedup']:>7.2f}x "
          f"{att['k2_tflops']:>8.1f} TFLOP/s (fused attention alone {att['fused_only_ms']:.3f} ms: "
          f"{att['speedup_vs_fused_only']:.2f}x)")
    return {
        "mla_decode": {"speedup_vs_torch_absorbed_folded": round(dec["speedup"], 3),
                       "speedup_vs_model_absorbed_path": round(dec["speedup_vs_model_path"], 3),
                       "hbm_fraction": round(dec["hbm_fraction"], 3),
                       "torch_hbm_fraction": round(dec["torch_hbm_fraction"], 3),
                       "k2_ms": round(dec["k2_ms"], 4)},
        "mla_attention_fwd_max": {"speedup_vs_torch_fwd_plus_max": round(att["speedup"], 3),
                                  "speedup_vs_torch_fused_only": round(att["speedup_vs_fused_only"], 3),
                                  "k2_tflops": round(att["k2_tflops"], 1)},
    }


if __name__ == "__main__":
    sys.exit(main())
