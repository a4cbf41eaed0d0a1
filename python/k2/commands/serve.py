"""``k2 serve RUN_OR_CHECKPOINT``: an OpenAI-compatible chat server (docs/serve.md).

Loads a k2 run, checkpoint root or checkpoint directory (as ``k2 sft --init`` resolves it) and
serves ``/v1/chat/completions`` (tool calls, streaming, ``n``, ``seed``, stop strings),
``/v1/models``, ``/health`` and ``/metrics`` on uvicorn; concurrent requests share the rollout
engine's continuous batch and a full queue answers 429. With ``--subscribe NAME`` it follows a
weight broadcast (``k2.broadcast``, same host): each version published under NAME is applied
between decoding steps, and every response lists the weight versions that produced it. Needs
the ``serve`` extra.
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from k2.optional import require

    uvicorn = require("uvicorn", extra="serve", purpose="k2 serve")
    import os

    import torch

    from k2.agentic.evaluate import load_model
    from k2.serve.app import ChatService, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, checkpoint = load_model(args.init)
    name = args.model_name or (checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints"
                               else checkpoint.name)
    subscriber = None
    if args.subscribe:
        from k2.broadcast import WeightSubscriber

        # Checks the model against the published tensors (a mismatch lists every difference).
        subscriber = WeightSubscriber(model, worker=args.worker_name or f"serve-{os.getpid()}",
                                      name=args.subscribe, timeout=args.subscribe_timeout)
    try:
        service = ChatService(model, tokenizer, model_name=name, max_batch=args.max_batch,
                              max_queue=args.max_queue, constrain=not args.no_constrain, subscriber=subscriber)
        following = f", following weight broadcast {args.subscribe!r}" if subscriber is not None else ""
        print(f"k2 serve: {checkpoint} as model {service.model_name!r} on http://{args.host}:{args.port}/v1"
              f"{following}")
        try:
            uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level)
        finally:
            service.stop()
    finally:
        if subscriber is not None:
            subscriber.close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over OpenAI's chat-completions API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("init", metavar="RUN_OR_CHECKPOINT", help="a k2 run, checkpoint root or checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: the run's name)")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default: 8)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait for the engine; more are answered 429 (default: 64)")
    parser.add_argument("--no-constrain", action="store_true",
                        help="sample tool calls without schema constraints (default: constrained)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--subscribe", default=None, metavar="NAME",
                        help="apply the weight versions published under NAME (k2.broadcast, same host) "
                             "between decoding steps")
    parser.add_argument("--worker-name", default=None,
                        help="this server's name among the broadcast's workers (default: serve-PID)")
    parser.add_argument("--subscribe-timeout", type=float, default=30.0,
                        help="seconds to wait for the publisher: to appear, and per bucket (default: 30)")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (default: info)")
    parser.set_defaults(handler=run)
