"""k2 serve's batching gain: generated tokens/s with C concurrent streaming clients against the
same requests served one at a time, and time to first token (docs/serve.md).

A randomly initialized model of the tiny preset (cut to the vocabulary of a small byte-level
tokenizer trained here) is served in-process by uvicorn on a free local port; clients are
threads using the real ``openai`` client with ``stream=True``. Every request has the same budget
and its own seed, so every setting generates the very same tokens (``usage`` counts them; some
requests stop early at ``<|im_end|>``). The 1-client row is the serial baseline; ``gain`` is
tokens/s against it. Numbers are for the machine it runs on.

Run:  python bench/serve.py                       (clients 1, 8, 32; 64 requests each)
      python bench/serve.py --quick               (a few seconds: smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "serve"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=64, help="requests per setting")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens = "1,4", 8, 8
    torch.set_num_threads(args.threads)

    import openai

    from k2.data.tokenizer import train_tokenizer
    from k2.model import K2Config, K2ForCausalLM
    from k2.serve.app import ChatService, create_app
    from serve_helpers import Server, corpus

    tokenizer = train_tokenizer(corpus(), 400)
    config = dataclasses.replace(K2Config.from_preset("tiny"), vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(0)
    model = K2ForCausalLM(config).eval()
    service = ChatService(model, tokenizer, model_name="bench", max_batch=args.max_batch, max_queue=1024)
    server = Server(create_app(service))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[int, float, float]:
        started = time.perf_counter()
        first = None
        tokens = 0
        stream = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": f"Say hello {i}"}], max_tokens=args.max_tokens,
            seed=i, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens, first if first is not None else time.perf_counter() - started, time.perf_counter() - started

    one(0)  # warm up
    rows = []
    for clients in [int(c) for c in args.clients.split(",")]:
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(args.requests)))
        seconds = time.perf_counter() - started
        tokens = sum(r[0] for r in results)
        ttft = sorted(r[1] for r in results)
        rows.append({"clients": clients, "tokens": tokens, "seconds": round(seconds, 3),
                     "tokens_per_s": round(tokens / seconds, 1),
                     "ttft_p50_s": round(statistics.median(ttft), 4),
                     "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 4)})
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["gain_vs_first"] = round(row["tokens_per_s"] / base, 2) if base else None
        print(json.dumps(row))
    server.close()
    service.stop()


if __name__ == "__main__":
    main()
