"""Load test of ``k2 serve``: many concurrent clients for a fixed time, mixing normal, streamed,
tool-calling, cancelled and malformed requests (docs/serve.md, "Load test").

A randomly initialized model of the tiny preset (with the small tokenizer of the serve tests)
is saved as a run in a temporary directory and served by ``python -m k2 serve`` in its own
process, so its resident memory is measured alone (``VmRSS`` from ``/proc``, every second).
Clients are asyncio tasks speaking HTTP/1.1 over raw sockets (so a cancellation really closes
the connection mid-response, and a malformed body really is malformed). Each client loops over
the request kinds, starting at its own offset:

* ``plain`` — a chat completion (8 to 32 tokens);
* ``stream`` — the same streamed, read to ``data: [DONE]``;
* ``tools`` — two tools declared, ``tool_choice`` ``required`` or ``auto``;
* ``cancel`` — a stream closed after its first event, or a plain request closed after 0.2 s;
* ``malformed`` — a body that is not JSON, an unknown role, a bad temperature, a tool schema
  that is not an object, an unknown model, no messages, ``n`` 0, a context overflow.

A client that gets a 429 waits ``--backoff`` seconds (0.25) before its next request, as a
well-behaved client does; ``--backoff 0`` floods the server with retries instead.

Pass criteria: every valid request is answered 200 or 429 (queue full), every malformed one
4xx (400 or 404, or 429 when it parses but meets a full queue: capacity is checked before the
costly part of validation); nothing is answered 5xx, no request hangs (each has a deadline), the server answers
``/health`` afterwards with no sequence left running, and its RSS grows at most 5 % from 10 s
to the end. Reported: requests/s, generated tokens/s, p50/p99 latency of answered requests.

Run:  python bench/serve_load.py                    (64 clients, 60 s)
      python bench/serve_load.py --seconds 10       (the smoke version, tests/serve/test_serve_load.py)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "serve"))

KINDS = ("plain", "stream", "tools", "cancel", "malformed")
USER = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


def malformed_bodies(model: str, context: int) -> list[tuple[str, bytes]]:
    """Bodies every one of which must be answered 4xx: (what is wrong, body)."""
    good = {"model": model, "messages": USER, "max_tokens": 4}

    def body(**change) -> bytes:
        return json.dumps({**good, **change}).encode()

    return [
        ("not json", b'{"model": "' + model.encode() + b'", "messages": [}'),
        ("unknown role", body(messages=[{"role": "wizard", "content": "hi"}])),
        ("temperature", body(temperature=5)),
        ("tool schema", body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}])),
        ("unknown model", body(model="no-such-model")),
        ("no messages", body(messages=[])),
        ("n", body(n=0)),
        ("context", body(max_tokens=context + 10)),
        ("array body", b"[1, 2, 3]"),
        ("not utf-8", b"\xff\xfe\x00garbage"),
    ]


@dataclasses.dataclass
class Outcome:
    kind: str
    status: int | None  # None: no status line (hang, reset)
    seconds: float
    tokens: int = 0
    error: str | None = None


async def _request(port: int, body: bytes, *, stream: bool, cancel_after: float | None,
                   deadline: float) -> tuple[int | None, bytes, str | None]:
    """POST /v1/chat/completions; returns (status, decoded body, error). ``cancel_after``: close the
    connection that many seconds in (a stream: after its first event)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), deadline)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        if cancel_after is not None and not stream:
            await asyncio.sleep(cancel_after)
            return None, b"", "cancelled"
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), deadline)
        status = int(head.split(b" ", 2)[1])
        headers = head.decode("latin-1").lower()
        if cancel_after is not None and status == 200:
            await asyncio.wait_for(reader.readuntil(b"\n\n"), deadline)  # the first event (chunk framing aside)
            return status, b"", "cancelled"
        raw = await asyncio.wait_for(reader.read(), deadline)
        if "transfer-encoding: chunked" in headers:
            raw = _dechunk(raw)
        return status, raw, None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def _dechunk(raw: bytes) -> bytes:
    out, at = bytearray(), 0
    while True:
        end = raw.index(b"\r\n", at)
        size = int(raw[at:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += raw[end + 2 : end + 2 + size]
        at = end + 2 + size + 2


def _tokens(raw: bytes, stream: bool) -> tuple[int, str | None]:
    """Generated tokens reported by a 200 answer, or the reason it is not a well-formed answer."""
    if not stream:
        body = json.loads(raw)
        return body["usage"]["completion_tokens"], None if body.get("choices") else "no choices"
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return 0, "stream did not end with [DONE]"
    usage = [json.loads(e)["usage"] for e in events[:-1] if '"usage"' in e and json.loads(e).get("usage")]
    return (usage[-1]["completion_tokens"] if usage else 0), None


async def _client(i: int, port: int, model: str, stop_at: float, deadline: float, bad: list[tuple[str, bytes]],
                  tools: list, outcomes: list[Outcome], cap: int, backoff: float) -> None:
    n = i
    while time.monotonic() < stop_at:
        kind = KINDS[n % len(KINDS)]
        n += 1
        request = {"model": model, "messages": USER, "max_tokens": 8 + (n * 7) % 25, "seed": n * 1000 + i}
        stream = kind == "stream" or (kind == "cancel" and n % 2 == 0)
        cancel_after = 0.2 if kind == "cancel" else None
        if kind == "tools":
            request.update(tools=tools, tool_choice="required" if n % 2 else "auto", max_tokens=48)
        if kind == "cancel":
            request["max_tokens"] = 64
        request["max_tokens"] = min(request["max_tokens"], cap)
        if stream:
            request.update(stream=True, stream_options={"include_usage": True})
        body = bad[(n // len(KINDS) + i) % len(bad)][1] if kind == "malformed" else json.dumps(request).encode()
        started = time.monotonic()
        try:
            status, raw, note = await _request(port, body, stream=stream, cancel_after=cancel_after, deadline=deadline)
        except asyncio.TimeoutError:
            outcomes.append(Outcome(kind, None, time.monotonic() - started, error="hang"))
            continue
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError) as err:
            outcomes.append(Outcome(kind, None, time.monotonic() - started, error=f"{type(err).__name__}: {err}"))
            continue
        seconds = time.monotonic() - started
        if note == "cancelled":
            outcomes.append(Outcome(kind, status, seconds, error="cancelled"))
            continue
        tokens, error = 0, None
        if status == 200:
            try:
                tokens, error = _tokens(raw, stream)
            except (ValueError, KeyError) as err:
                error = f"bad body: {err}"
        outcomes.append(Outcome(kind, status, seconds, tokens, error))
        if status == 429 and backoff:
            await asyncio.sleep(backoff)  # a well-behaved client waits before trying again


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _get(port: int, path: str) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return response.status, response.read().decode()


def make_run(directory: Path, model_kind: str = "tiny", max_position: int = 512) -> Path:
    """A run directory holding a random model (the ``tiny`` preset, or the serve tests' smaller
    ``test`` model) and the serve tests' tokenizer."""
    import torch

    from k2 import checkpoint
    from k2.data.tokenizer import save_tokenizer, train_tokenizer
    from k2.model import K2Config, K2ForCausalLM
    from serve_helpers import corpus

    tokenizer = train_tokenizer(corpus(), 400)
    if model_kind == "tiny":
        config = dataclasses.replace(K2Config.from_preset("tiny"), vocab_size=tokenizer.get_vocab_size(),
                                     max_position_embeddings=max_position)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from model_helpers import small_config

        config = small_config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=max_position,
                              rope_scaling=None)
    torch.manual_seed(0)
    model = K2ForCausalLM(config).eval()
    run = directory / "loadrun"
    run.mkdir()
    save_tokenizer(tokenizer, run)
    checkpoint.save(run / "checkpoints", model, tokenizer_dir=run, step=0)
    return run


def summarize(outcomes: list[Outcome], seconds: float) -> dict:
    answered = [o for o in outcomes if o.status == 200 and o.error is None]
    latencies = sorted(o.seconds for o in answered)

    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None

    by_kind = {}
    for kind in KINDS:
        mine = [o for o in outcomes if o.kind == kind]
        statuses: dict[str, int] = {}
        for o in mine:
            key = str(o.status) if o.error in (None, "cancelled") else f"{o.status}:{o.error}"
            statuses[key] = statuses.get(key, 0) + 1
        by_kind[kind] = statuses
    def failed(o: Outcome) -> bool:
        if o.error == "cancelled":  # closed by the client: before the answer, or after its first event
            return o.status not in (None, 200, 429)
        if o.error is not None or o.status is None:  # a hang, a reset, a 200 that is not an answer
            return True
        if o.kind == "malformed":
            return not 400 <= o.status < 500
        return o.status not in (200, 429)

    failures = [o for o in outcomes if failed(o)]
    return {
        "requests": len(outcomes), "requests_per_s": round(len(outcomes) / seconds, 2),
        "answered_200": len(answered), "answered_429": sum(o.status == 429 for o in outcomes),
        "generated_tokens": sum(o.tokens for o in answered),
        "tokens_per_s": round(sum(o.tokens for o in answered) / seconds, 1),
        "latency_p50_s": pct(0.5), "latency_p99_s": pct(0.99),
        "by_kind": by_kind, "failures": len(failures),
        "failure_examples": [dataclasses.asdict(o) for o in failures[:5]],
    }


async def _drive(port: int, model: str, clients: int, seconds: float, deadline: float, pid: int, context: int,
                 rss: list[tuple[float, float]], cap: int, backoff: float) -> list[Outcome]:
    from serve_helpers import TOOLS

    outcomes: list[Outcome] = []
    started = time.monotonic()
    stop_at = started + seconds
    bad = malformed_bodies(model, context)

    async def sample() -> None:
        while time.monotonic() < stop_at:
            rss.append((round(time.monotonic() - started, 2), _rss_mib(pid)))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(_client(i, port, model, stop_at, deadline, bad, TOOLS, outcomes, cap, backoff)
                           for i in range(clients)))
    sampler.cancel()
    rss.append((round(time.monotonic() - started, 2), _rss_mib(pid)))
    return outcomes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds after which a request counts as hung")
    parser.add_argument("--rss-from", type=float, default=10.0, help="RSS growth is measured from this second")
    parser.add_argument("--model", choices=("tiny", "test"), default="tiny",
                        help="the tiny preset, or the serve tests' smaller model (smoke test)")
    parser.add_argument("--max-tokens", type=int, default=64, help="cap on any request's max_tokens")
    parser.add_argument("--backoff", type=float, default=0.25,
                        help="seconds a client waits after a 429 before its next request (0: a flood)")
    args = parser.parse_args(argv)
    from serve_helpers import free_port

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="k2-serve-load-") as tmp:
        run = make_run(Path(tmp), args.model)
        path = os.pathsep.join(p for p in (str(ROOT / "python"), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path}
        log = open(Path(tmp) / "server.log", "w")  # noqa: SIM115 - closed below
        server = subprocess.Popen(
            [sys.executable, "-m", "k2", "serve", str(run / "checkpoints"), "--model-name", "loadrun",
             "--port", str(port), "--threads", str(args.threads),
             "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--log-level", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)  # a file: a full pipe would block it
        try:
            ready = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"k2 serve exited: {Path(log.name).read_text()}")
                try:
                    if _get(port, "/health")[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > ready:
                    raise RuntimeError("k2 serve did not start within 180 s")
                time.sleep(0.2)
            rss: list[tuple[float, float]] = []
            started = time.monotonic()
            outcomes = asyncio.run(_drive(port, "loadrun", args.clients, args.seconds, args.deadline, server.pid,
                                          512, rss, args.max_tokens, args.backoff))
            elapsed = time.monotonic() - started
            # afterwards: healthy, nothing left running or queued
            settle = time.monotonic() + 30
            while True:
                status, metrics = _get(port, "/metrics")
                values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
                          if line and not line.startswith("#")}
                idle = values.get("k2_serve_running_sequences") == 0 and values.get("k2_serve_queue_length") == 0
                if idle or time.monotonic() > settle:
                    break
                time.sleep(0.2)
            health = json.loads(_get(port, "/health")[1])
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
    result = summarize(outcomes, elapsed)
    base = next((mib for t, mib in rss if t >= args.rss_from), None)
    result.update(
        bench="serve_load", model=args.model, clients=args.clients, backoff=args.backoff,
        seconds=round(elapsed, 1), max_batch=args.max_batch,
        max_queue=args.max_queue, threads=args.threads, health=health["status"], idle_after=idle,
        rss_mib_start=rss[0][1] if rss else None, rss_mib_at_from=base, rss_mib_end=rss[-1][1] if rss else None,
        rss_growth=round(rss[-1][1] / base - 1, 4) if base else None,
        load_average=list(os.getloadavg()),
    )
    result["passed"] = (result["failures"] == 0 and health["status"] == "ok" and idle
                        and (result["rss_growth"] is None or result["rss_growth"] <= 0.05))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    raise SystemExit(0 if main()["passed"] else 1)
