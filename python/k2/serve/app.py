"""The ``k2 serve`` Starlette application: OpenAI's chat-completions API over the rollout engine
(docs/serve.md).

:class:`ChatService` turns a validated request into engine requests (chat template, stop token,
schema constraints for tool calls), submits them to the :class:`~k2.serve.scheduler.Scheduler`
and builds the OpenAI response; :func:`create_app` wraps it in the HTTP routes
(``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from k2.agentic.calls import IM_END, StreamingToolCallParser
from k2.data.chat import render_chat
from k2.errors import AgenticError, K2Error, ServeError
from k2.optional import require
from k2.rl.rollout import Completion, Request, RolloutEngine
from k2.serve.scheduler import Job, QueueFull, Scheduler
from k2.serve.schemas import ChatRequest, choice_of, cut_at_stop, error_body, parse_chat_request


def _starlette():
    require("starlette", extra="serve", purpose="k2 serve")
    require("uvicorn", extra="serve", purpose="k2 serve")
    return require("prometheus_client", extra="serve", purpose="k2 serve's /metrics")


class _ForceCall:
    """Wraps a tool-call constraint so the turn must open with a tool-calls section
    (``tool_choice`` ``required`` or a named function)."""

    def __init__(self, inner: Any, section_begin: int) -> None:
        self.inner = inner
        self.section_begin = section_begin
        self.started = False

    def allowed_mask(self, vocab: int) -> torch.Tensor:
        if self.started:
            return self.inner.allowed_mask(vocab)
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[self.section_begin] = True
        return mask

    def advance(self, token: int) -> None:
        self.started = True
        self.inner.advance(token)


@dataclass
class _Choice:
    """One choice being generated: its tokens and text so far (updated in the scheduler thread)."""

    stop: list[str]
    decode: Any
    tokens: list[int] = field(default_factory=list)
    text: str = ""

    def add(self, token: int) -> bool:
        self.tokens.append(token)
        if self.stop:
            self.text = self.decode(self.tokens)
            return cut_at_stop(self.text.split(IM_END, 1)[0], self.stop)[1]
        return False


class Metrics:
    """Prometheus metrics of one server (its own registry)."""

    def __init__(self, scheduler: Scheduler, weight_version: Any) -> None:
        prom = _starlette()
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("k2_serve_requests", "Chat requests answered, by HTTP status", ["status"], registry=r)
        self.prompt_tokens = prom.Counter("k2_serve_prompt_tokens", "Prompt tokens of answered requests", registry=r)
        self.completion_tokens = prom.Counter("k2_serve_completion_tokens", "Generated tokens", registry=r)
        self.latency = prom.Histogram("k2_serve_request_seconds", "Time from arrival to the last token", registry=r,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        queue_length = prom.Gauge("k2_serve_queue_length", "Jobs waiting for the engine", registry=r)
        queue_length.set_function(lambda: scheduler.queued)
        rows = prom.Gauge("k2_serve_running_sequences", "Sequences in the running batch", registry=r)
        rows.set_function(lambda: scheduler.running_rows)
        version = prom.Gauge("k2_serve_weight_version", "Weight version the engine holds", registry=r)
        version.set_function(lambda: weight_version())

    def render(self) -> bytes:
        return self.prom.generate_latest(self.registry)


class ChatService:
    """Serves chat completions from a model and its tokenizer.

    Args:
        model: the K2 model.
        tokenizer: its ``tokenizers.Tokenizer`` (K2's special tokens).
        model_name: the name clients put in ``model``.
        max_batch: engine rows decoded together.
        max_queue: requests that may wait (more get 429).
        constrain: schema-constrained tool calls (needs the ``constrain`` extra); on by default.
        start: start the scheduler thread now.
        subscriber: a joined :class:`~k2.broadcast.WeightSubscriber` on ``model``: published
            versions are applied between decoding steps (:mod:`k2.serve.weights`), and every
            response lists the versions that produced its tokens.
    """

    def __init__(self, model: Any, tokenizer: Any, *, model_name: str = "k2", max_batch: int = 8,
                 max_queue: int = 64, constrain: bool = True, start: bool = True,
                 subscriber: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self.im_end = tokenizer.token_to_id(IM_END)
        if self.im_end is None:
            raise ServeError(f"the tokenizer has no {IM_END} token: it is not K2's")
        self.engine = RolloutEngine(model, max_batch=max_batch, pad_token_id=self.im_end)
        self.follower = None
        if subscriber is not None:
            from k2.serve.weights import WeightFollower

            self.follower = WeightFollower(subscriber, self.engine)
        self.scheduler = Scheduler(self.engine, max_queue=max_queue, between_steps=self.follower)
        self.metrics = Metrics(self.scheduler, lambda: self.weight_version)
        self.constrainer = None
        if constrain:
            from k2.agentic.constrain import ToolCallConstrainer

            self.constrainer = ToolCallConstrainer(tokenizer)
        self._lock = threading.Lock()  # grammar compilation from several handler threads
        if start:
            self.start()

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    @property
    def weight_version(self) -> int:
        """The weight version the model holds."""
        return self.engine.weight_version

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # ---------------------------------------------------------------- requests
    def prompt_ids(self, req: ChatRequest) -> list[int]:
        text = render_chat(req.messages, req.tools, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _constraint(self, req: ChatRequest, prompt: list[int]) -> Any:
        if self.constrainer is None:
            return None
        tools = req.tools if req.tool_choice != "none" else None
        if tools and req.forced_tool:
            tools = [t for t in tools if t["function"]["name"] == req.forced_tool]
        with self._lock:
            try:
                row = self.constrainer.row(tools, prompt)
                if tools:  # compile now, so a bad schema is this request's 400, not the engine's
                    self.constrainer.grammar(tools).matcher(row.counter)
            except AgenticError as err:
                raise ServeError(str(err), field="tools") from None
        if tools and req.tool_choice != "auto":
            return _ForceCall(row, self.constrainer.section_begin)
        return row

    def engine_requests(self, req: ChatRequest) -> tuple[list[int], list[Request]]:
        """The prompt and one engine request per choice. Raises ServeError (context overflow)."""
        prompt = self.prompt_ids(req)
        limit = self.model.config.max_position_embeddings
        room = limit - len(prompt)
        if room < 1:
            raise ServeError(f"the prompt is {len(prompt)} tokens; this model's context is {limit} tokens",
                             field="messages", code="context_length_exceeded")
        budget = req.max_tokens if req.max_tokens is not None else room
        if budget > room:
            raise ServeError(f"max_tokens={budget} plus the prompt's {len(prompt)} tokens exceeds the context of "
                             f"{limit} tokens", field="max_tokens", code="context_length_exceeded")
        base = req.seed if req.seed is not None else secrets.randbits(62)
        requests = [
            Request(prompt, budget, temperature=req.temperature, top_p=req.top_p, stop_ids=(self.im_end,),
                    seed=(base + i) % (1 << 63), constraint=self._constraint(req, prompt))
            for i in range(req.n)
        ]
        for i, r in enumerate(requests):
            try:
                self.engine.check_request(i, r)
            except K2Error as err:
                raise ServeError(str(err), field="messages") from None
        return prompt, requests

    def submit(self, req: ChatRequest, on_event: Any = None) -> tuple[list[int], Job, list[_Choice]]:
        if self.scheduler.full:  # answer 429 before templating, tokenizing and compiling grammars
            raise ServeError(f"the request queue is full ({self.scheduler.queue.maxsize} waiting)", status=429,
                             code="rate_limit_exceeded")
        prompt, requests = self.engine_requests(req)
        choices = [_Choice(req.stop, self.decode) for _ in requests]

        def on_token(choice: int, token: int) -> bool:
            done = choices[choice].add(token)
            if on_event is not None:
                on_event(choice)
            return done

        job = Job(requests, on_token)
        try:
            self.scheduler.submit(job)
        except QueueFull as err:
            raise ServeError(str(err), status=429, code="rate_limit_exceeded") from None
        return prompt, job, choices

    def response(self, req: ChatRequest, rid: str, prompt: list[int], completions: list[Completion]) -> dict[str, Any]:
        tools_on = bool(req.tools) and req.tool_choice != "none"
        choices = [choice_of(i, self.decode(c.token_ids), c.finish_reason, req.stop, tools_on)
                   for i, c in enumerate(completions)]
        generated = sum(len(c.token_ids) for c in completions)
        self.metrics.prompt_tokens.inc(len(prompt))
        self.metrics.completion_tokens.inc(generated)
        return {
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
            "choices": choices, "system_fingerprint": f"k2-v{self.weight_version}",
            "weight_versions": sorted({v for c in completions for v in c.versions}),
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": generated,
                      "total_tokens": len(prompt) + generated},
        }


def _chunk(rid: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> str:
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(service: ChatService, req: ChatRequest, rid: str, include_usage: bool,
                  started: float) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[int | None] = asyncio.Queue()
    # templating, tokenizing and compiling grammars off the event loop, as for plain requests
    prompt, job, states = await asyncio.to_thread(
        service.submit, req, lambda choice: loop.call_soon_threadsafe(events.put_nowait, choice))
    job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
    tools_on = bool(req.tools) and req.tool_choice != "none"
    hold = max((len(s) for s in req.stop), default=1) - 1
    sent_content = [""] * req.n
    sent_calls = [0] * req.n
    model = service.model_name
    try:
        yield _chunk(rid, model, [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                                  for i in range(req.n)])
        while (choice := await events.get()) is not None:
            text = service.decode(states[choice].tokens)
            parser = StreamingToolCallParser()
            calls = parser.feed(text) if tools_on else []
            content = parser.content if tools_on else text.split(IM_END, 1)[0]
            content = cut_at_stop(content, req.stop)[0]
            content = content[: max(0, len(content) - hold)].rstrip("\ufffd")
            delta: dict[str, Any] = {}
            if content.startswith(sent_content[choice]) and len(content) > len(sent_content[choice]):
                delta["content"] = content[len(sent_content[choice]):]
                sent_content[choice] = content
            good = [c for c in calls if c.error is None and c.name]
            if len(good) > sent_calls[choice]:
                delta["tool_calls"] = [{"index": k, **c.to_openai()} for k, c in enumerate(good)
                                       if k >= sent_calls[choice]]
                sent_calls[choice] = len(good)
            if delta:
                yield _chunk(rid, model, [{"index": choice, "delta": delta, "finish_reason": None}])
        completions = job.future.result()
        final = service.response(req, rid, prompt, completions)
        for c in final["choices"]:
            i, message = c["index"], c["message"]
            delta = {}
            content = message.get("content") or ""
            if content.startswith(sent_content[i]) and len(content) > len(sent_content[i]):
                delta["content"] = content[len(sent_content[i]):]
            calls = message.get("tool_calls") or []
            if len(calls) > sent_calls[i]:
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls) if k >= sent_calls[i]]
            yield _chunk(rid, model, [{"index": i, "delta": delta, "finish_reason": c["finish_reason"]}],
                         weight_versions=final["weight_versions"])
        if include_usage:
            yield _chunk(rid, model, [], usage=final["usage"], weight_versions=final["weight_versions"])
        yield "data: [DONE]\n\n"
        service.metrics.requests.labels("200").inc()
        service.metrics.latency.observe(time.perf_counter() - started)
    finally:  # a client that went away frees its rows at the next token (no-op once finished)
        job.cancel()


def create_app(service: ChatService) -> Any:
    """The Starlette application serving ``service``."""
    _starlette()
    from starlette.applications import Starlette
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error(err: ServeError) -> JSONResponse:
        service.metrics.requests.labels(str(err.status)).inc()
        return JSONResponse(error_body(str(err), err.field, err.code), status_code=err.status)

    async def chat(request: HTTPRequest) -> Response:
        started = time.perf_counter()
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ServeError(f"the body is not valid JSON: {err}") from None
            req = parse_chat_request(body, service.model_name)
            options = body.get("stream_options") or {}
            if not isinstance(options, dict):
                raise ServeError("'stream_options' must be an object", field="stream_options")
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            if req.stream:
                stream = _stream(service, req, rid, bool(options.get("include_usage")), started)
                first = await anext(stream)  # submits: a full queue or a bad request answers here
                return StreamingResponse(_prepend(first, stream), media_type="text/event-stream",
                                         headers={"x-k2-weight-version": str(service.weight_version)})  # at the start
            prompt, job, _ = await asyncio.to_thread(service.submit, req)
            completions = await _wait_or_cancel(request, job)
        except ServeError as err:
            return error(err)
        except Exception as err:  # noqa: BLE001 - an engine failure is this request's 500, not the server's end
            service.metrics.requests.labels("500").inc()
            return JSONResponse(error_body(f"generation failed: {err}", None, "server_error"), status_code=500)
        body = service.response(req, rid, prompt, completions)
        service.metrics.requests.labels("200").inc()
        service.metrics.latency.observe(time.perf_counter() - started)
        versions = ",".join(str(v) for v in body["weight_versions"])
        return JSONResponse(body, headers={"x-k2-weight-versions": versions})

    async def models(request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "k2"}]})

    async def health(request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", "weight_version": service.weight_version,
                             "queued": service.scheduler.queued})

    async def metrics(request: HTTPRequest) -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.prom.CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        service.stop()

    app = Starlette(lifespan=lifespan, routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ])
    app.state.service = service
    return app


async def _wait_or_cancel(request: Any, job: Job, poll_s: float = 0.1) -> list[Completion]:
    """The job's completions; a client that disconnects meanwhile has its choices ended at the next token."""
    future = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=poll_s)
        if done:
            return future.result()
        if await request.is_disconnected():
            job.cancel()
            return await future


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item
