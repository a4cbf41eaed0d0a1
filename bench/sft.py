"""What the loss mask costs: ``k2 sft`` steps against ``k2 train`` steps on the same model,
batch and tokens.

    python bench/sft.py [--quick] [--preset tiny] [--batch-size 4] [--seq-len 512]

Both jobs run on the same packed token stream: synthetic tool-use conversations prepared by
``k2.data.sft.prepare_sft`` (shards with a loss mask) and the very same tokens rewritten as
plain version-1 shards (no mask) for ``PretrainJob``. Each starts from the same weights with
MuonClip (QK-Clip on) and the WSD schedule; after a warmup, the two alternate in rounds of a few
steps, and each job's tokens/s is the median over rounds of input tokens per second of
``train_step`` wall time. Prints a table, the ratio and one JSON line (goal: the mask costs
< 5 %, i.e. ``sft_vs_train >= 0.95``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the order account city weather book ticket refund flight hotel please check status "
         "price date time cancel change number email name address total paid open closed "
         "yes no thanks done sorry cannot help with that now later today tomorrow").split()


def synthetic_chats(n: int, seed: int = 0) -> list[dict]:
    """Tool-use conversations of varied length: user asks, assistant calls a tool or two,
    tool answers, assistant replies."""
    rng = random.Random(seed)

    def say(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    tools = [{"type": "function", "function": {"name": name, "description": say(3), "parameters": {
        "type": "object", "properties": {"id": {"type": "integer"}, "note": {"type": "string"}}}}}
        for name in ("lookup", "cancel")]
    chats = []
    for i in range(n):
        messages = [{"role": "system", "content": say(5)}, {"role": "user", "content": say(rng.randint(5, 20))}]
        for turn in range(rng.randint(1, 2)):
            call_id = f"c{i}_{turn}"
            fn = rng.choice(tools)["function"]["name"]
            messages.append({"role": "assistant", "content": say(rng.randint(0, 10)), "tool_calls": [
                {"id": call_id, "type": "function", "function": {
                    "name": fn, "arguments": json.dumps({"id": rng.randint(1, 999), "note": say(3)})}}]})
            messages.append({"role": "tool", "tool_call_id": call_id, "content": say(rng.randint(3, 12))})
        messages.append({"role": "assistant", "content": say(rng.randint(5, 30))})
        chats.append({"messages": messages, "tools": tools})
    return chats


def plain_copy(sft_dir: Path, out: Path) -> Path:
    """The SFT directory's train tokens as an unmasked (version-1) prepared directory."""
    import numpy as np

    from k2 import _native
    from k2.data.loader import read_tokens
    from k2.data.manifest import ShardEntry, SplitEntry, read_manifest

    manifest = read_manifest(sft_dir)
    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((sft_dir / name).read_bytes())
    splits = {}
    for split in ("train", "validation"):
        entry = manifest.split(split)
        if not entry.shards:
            splits[split] = entry
            continue
        tokens = read_tokens(sft_dir, split)
        writer = _native.ShardWriter(out / f"{split}-00000.k2tok", manifest.vocab_size)
        writer.add_documents(tokens.astype(np.uint32), np.array([len(tokens)], np.int64))
        s = writer.finish()
        shard = ShardEntry(f"{split}-00000.k2tok", s["tokens"], s["documents"], f"{s['checksum']:016x}")
        splits[split] = SplitEntry((shard,), s["tokens"], s["documents"], entry.chunks)
    import dataclasses

    dataclasses.replace(manifest, splits=splits, directory=out).write(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=4)
    args = parser.parse_args()
    if args.quick:  # a smoke run: the numbers mean nothing
        args.rounds, args.steps_per_round, args.batch_size = 1, 1, 1

    import torch

    from k2.data.sft import prepare_sft
    from k2.data.tokenizer import save_tokenizer, train_tokenizer
    from k2.model import K2Config, K2ForCausalLM
    from k2.parallel.setup import Dist
    from k2.train.config import TrainConfig
    from k2.train.pretrain import PretrainJob
    from k2.train.sft import SFTConfig, SFTJob

    model_config = K2Config.from_preset(args.preset)
    d = Dist(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    steps = 2 + args.rounds * args.steps_per_round
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        chats = synthetic_chats(400 if not args.quick else 60)
        data = root / "chats.jsonl"
        data.write_text("".join(json.dumps(c) + "\n" for c in chats))
        tok = root / "tok"
        tok.mkdir()
        texts = [json.dumps(c) for c in chats]
        save_tokenizer(train_tokenizer(texts, min(1024, model_config.vocab_size)), tok)
        sft_dir = root / "sft"
        prepare_sft([data], sft_dir, tok, args.seq_len, val_fraction=0.0)
        plain_dir = plain_copy(sft_dir, root / "plain")

        common = dict(preset=args.preset, seq_len=args.seq_len, batch_size=args.batch_size,
                      steps=steps, warmup_steps=1, device=str(d.device))
        torch.manual_seed(0)
        base = K2ForCausalLM(model_config).to(d.device)
        log = lambda _: None  # noqa: E731
        train_job = PretrainJob(TrainConfig(data_dir=str(plain_dir), **common), d, copy.deepcopy(base), log)
        sft_job = SFTJob(SFTConfig(data_dir=str(sft_dir), init="bench", data=[str(data)], **common),
                         d, copy.deepcopy(base), log)
        share = float(sft_job.loader.next_batch().loss_mask.mean())  # not a step: a look at the data
        sft_job.loader.load_state_dict({**sft_job.loader.state_dict(), "epoch": 0, "step": 0})

        def timed(job, step: int) -> float:
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for k in range(args.steps_per_round):
                job.train_step(step + k, log=False)
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            return args.batch_size * args.seq_len * args.steps_per_round / (time.perf_counter() - t0)

        for job in (train_job, sft_job):  # warmup: first-step allocations, optimizer state
            for k in range(1 if args.quick else 2):
                job.train_step(k, log=False)
        rates: dict[str, list[float]] = {"train": [], "sft": []}
        step = 2
        for r in range(args.rounds):
            order = (("train", train_job), ("sft", sft_job)) if r % 2 == 0 else (("sft", sft_job), ("train", train_job))
            for name, job in order:
                rates[name].append(timed(job, step))
            step += args.steps_per_round

    train_tps, sft_tps = statistics.median(rates["train"]), statistics.median(rates["sft"])
    ratio = sft_tps / train_tps
    print(f"# k2 sft vs k2 train: {args.preset}, batch {args.batch_size} x {args.seq_len}, {d.device}, "
          f"{os.cpu_count()} CPUs, {args.rounds} rounds x {args.steps_per_round} steps, "
          f"assistant share of targets {share:.0%}")
    print(f"{'job':<8}{'tokens/s (median)':>20}{'rounds':>40}")
    for name, tps in (("train", train_tps), ("sft", sft_tps)):
        print(f"{name:<8}{tps:>20,.0f}   {' '.join(f'{x:,.0f}' for x in rates[name]):>37}")
    print(f"sft / train = {ratio:.3f} (the mask costs {100 * (1 - ratio):+.1f} %; goal < 5 %)")
    print(json.dumps({"bench": "sft", "preset": args.preset, "batch_size": args.batch_size,
                      "seq_len": args.seq_len, "device": str(d.device), "cpus": os.cpu_count(),
                      "machine": platform.machine(), "train_tokens_per_s": round(train_tps, 1),
                      "sft_tokens_per_s": round(sft_tps, 1), "sft_vs_train": round(ratio, 4),
                      "mask_cost_pct": round(100 * (1 - ratio), 2), "masked_share": round(share, 4),
                      "train_rounds": [round(x, 1) for x in rates["train"]],
                      "sft_rounds": [round(x, 1) for x in rates["sft"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
