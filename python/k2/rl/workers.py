"""Rollout workers (``k2 rl --rollout-workers N``): N processes, each with a model replica behind
a :class:`k2.broadcast.WeightSubscriber`, fed by the trainer's :class:`k2.broadcast.WeightPublisher`
(docs/rl.md, "Rollout workers").

The trainer calls :meth:`RolloutWorkers.sync` at the start of every RL step: it publishes the
weights once per optimizer step (``publish()`` returns only when every live worker has applied
them) and remembers which step they belong to. :meth:`RolloutWorkers.generate` then gives every
request an explicit seed (the one the colocated engine would derive from the call's seed and
the request's index, so the samples are the colocated ones), splits the requests among the live
workers (``torch.multiprocessing`` queues) and collects the completions. A worker generates only
after it has applied the published version, under the subscriber's lock, with its engine's
``weight_version`` set to the trainer's step, so no version published later can reach a sample.

A worker that dies is named in the log and its outstanding requests go to the workers still
alive, or to a colocated engine in the trainer's process when none is left.

How weights, requests and deaths travel is the *transport*: :class:`ShmTransport` (this host:
shared memory, queues, exit codes) or :class:`k2.rl.dist_workers.DistTransport`
(``torch.distributed`` gloo ranks and a TCP store, workers on any host). The dealing, collecting
and re-dealing above are :class:`RolloutWorkers`' own, the same for both.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from k2.errors import RLError
from k2.rl.rollout import Completion, Request, RolloutEngine
from k2.rl.sampling import request_seed

if TYPE_CHECKING:
    from k2.model.model import K2ForCausalLM

POLL_S = 0.2


def answer(name: str, engine: RolloutEngine, lock, held: Callable[[], int],  # noqa: ANN001
           applied: threading.Condition, message: tuple) -> list[Completion]:
    """A worker's reply to ``(tag, step, version, [(index, request)], max_steps)``: wait (up to
    60 s) until ``held()`` reaches ``version`` (``applied`` is notified at every new version),
    then generate under ``lock`` (so no version lands mid-batch) with the engine's
    ``weight_version`` set to the trainer's ``step``. Both transports' workers use it."""
    _, step, version, items, max_steps = message
    with applied:
        if not applied.wait_for(lambda: held() >= version, timeout=60.0):
            raise RLError(f"{name}: weight version {version} never arrived")
    with lock:
        if held() != version:
            raise RLError(f"{name}: holds weight version {held()}, asked for {version}")
        engine.weight_version = step
        completions = engine.generate([r for _, r in items], max_steps=max_steps)
    for (index, _), c in zip(items, completions):
        c.index = index
    return completions


def _worker_main(name: str, broadcast: str, hf_config: dict[str, Any], max_batch: int, pad: int,
                 inbox, outbox, threads: int) -> None:  # noqa: ANN001
    """A worker process: subscribe, then answer ``(tag, step, version, [(index, request)])``
    messages with ``(tag, name, [completion])`` until it receives None."""
    from k2.broadcast import WeightSubscriber
    from k2.errors import BroadcastError
    from k2.model import K2Config, K2ForCausalLM

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's: it finishes the step
    torch.set_num_threads(threads)
    model = K2ForCausalLM(K2Config.from_hf_dict(hf_config)).eval()
    subscriber = WeightSubscriber(model, worker=name, name=broadcast, timeout=60.0)
    engine = RolloutEngine(model, max_batch=max_batch, pad_token_id=pad)
    applied = threading.Condition()
    stop = threading.Event()

    def receive() -> None:  # apply every published version as it comes
        while not stop.is_set():
            try:
                version = subscriber.update(timeout=POLL_S)
            except BroadcastError:
                if stop.is_set():
                    return
                subscriber.rejoin()
                continue
            if version is not None:
                with applied:
                    applied.notify_all()

    thread = threading.Thread(target=receive, name=f"{name}-weights", daemon=True)
    thread.start()
    try:
        while True:
            message = inbox.get()
            if message is None:
                break
            completions = answer(name, engine, subscriber.lock, lambda: subscriber.version, applied, message)
            outbox.put((message[0], name, completions))
    finally:
        stop.set()
        thread.join(timeout=5)
        subscriber.close()


class ShmTransport:
    """Workers on this host: a shared-memory :class:`k2.broadcast.WeightPublisher` for the
    weights, ``torch.multiprocessing`` queues for requests and completions, process exit codes for
    deaths. :class:`RolloutWorkers` drives it (the dist transport, :mod:`k2.rl.dist_workers`,
    offers the same methods)."""

    kind = "shm"

    def __init__(self, model: K2ForCausalLM, hf_config: dict[str, Any], count: int, *, max_batch: int,
                 pad_token_id: int, threads: int) -> None:
        from k2.broadcast import WeightPublisher

        self.broadcast = f"k2-rl-{os.getpid()}-{id(self) & 0xffffff:x}"
        self.publisher = WeightPublisher(model, name=self.broadcast, timeout=30.0)
        context = torch.multiprocessing.get_context("spawn")
        self.outbox = context.Queue()
        self.inboxes: dict[str, Any] = {}
        self.processes: dict[str, Any] = {}
        for i in range(count):
            name = f"rollout-{i}"
            inbox = context.Queue()
            process = context.Process(
                target=_worker_main, name=name, daemon=True,
                args=(name, self.broadcast, hf_config, max_batch, pad_token_id, inbox, self.outbox, threads))
            process.start()
            self.inboxes[name], self.processes[name] = inbox, process
        self.names = list(self.processes)

    def describe(self) -> str:
        return f"shared-memory broadcast {self.broadcast}"

    def publish(self, step: int, alive: list[str]) -> tuple[int, dict[str, str]]:
        """Publish the weights (of trainer step ``step``) to every live worker; returns the version
        the workers must hold and the workers that failed, with why."""
        from k2.broadcast.shm import WorkersFailed

        try:
            return self.publisher.publish(), {}
        except WorkersFailed as failed:
            return failed.version, dict(failed.failures)

    def send(self, name: str, message: tuple) -> None:
        self.inboxes[name].put(message)

    def receive(self, timeout: float) -> tuple | None:
        try:
            return self.outbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def exited(self, name: str) -> str | None:
        process = self.processes[name]
        return None if process.is_alive() else f"exit code {process.exitcode}"

    def close(self, alive: list[str]) -> None:
        for name in alive:
            try:
                self.inboxes[name].put(None)
            except (OSError, ValueError):
                pass
        stop_processes(self.processes.values())
        self.publisher.close()


def stop_processes(processes: Iterable[Any]) -> None:
    """Wait for worker processes told to stop; terminate those still alive after 10 s."""
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)


class RolloutWorkers:
    """``count`` rollout processes behind one weight broadcast; the RL job's ``rollout``.

    Args:
        model: the trainer's policy (its state dict is what is published).
        hf_config: the model's configuration (``K2Config.to_hf_dict()`` form), to build replicas.
        count: worker processes.
        max_batch: each worker engine's rows.
        pad_token_id: the engines' padding id.
        log: where a dead worker is reported.
        threads: torch threads per worker.
        local: the engine used when no worker is left (default: a colocated one on ``model``).
        transport: ``"shm"`` (shared memory and queues, this host: :class:`ShmTransport`) or
            ``"dist"`` (``torch.distributed`` gloo ranks and a TCP store:
            :class:`k2.rl.dist_workers.DistTransport`).
        remote: (dist) workers started on other hosts, besides the ``count`` spawned here.
        address: (dist) ``HOST:PORT`` of the store (default: a free port on 127.0.0.1).
    """

    def __init__(self, model: K2ForCausalLM, hf_config: dict[str, Any], count: int, *, max_batch: int = 64,
                 pad_token_id: int = 0, log: Callable[[str], None] = print, threads: int = 1,
                 local: RolloutEngine | None = None, transport: str = "shm", remote: int = 0,
                 address: str = "") -> None:
        if count < 0 or remote < 0 or count + remote < 1:
            raise RLError(f"rollout workers: need at least one, got {count} here and {remote} remote")
        if remote and transport != "dist":
            raise RLError("rollout workers on other hosts need the dist transport")
        self.log = log
        self.local = local or RolloutEngine(model, max_batch=max_batch, pad_token_id=pad_token_id)
        options = dict(max_batch=max_batch, pad_token_id=pad_token_id, threads=threads)
        if transport == "shm":
            self.transport: Any = ShmTransport(model, hf_config, count, **options)
        elif transport == "dist":
            from k2.rl.dist_workers import DistTransport

            self.transport = DistTransport(model, hf_config, count, remote=remote, address=address,
                                           log=log, **options)
        else:
            raise RLError(f"rollout workers: unknown transport {transport!r} (shm or dist)")
        self.processes: dict[str, Any] = self.transport.processes  # those spawned here
        self.names: list[str] = list(self.transport.names)
        self.dead: list[str] = []
        self.weight_version = 0
        self.published = 0  # the publisher's version number of the weights of self.weight_version
        self.synced_step: int | None = None
        self.last_sync_s = 0.0
        self._message = 0

    @property
    def alive(self) -> list[str]:
        return [n for n in self.names if n not in self.dead]

    def _bury(self, name: str, why: str) -> None:
        if name not in self.dead:
            self.dead.append(name)
            self.log(f"rollout worker {name} died ({why}); its prompts go to "
                     f"{', '.join(self.alive) or 'the trainer process'}")

    def sync(self, step: int) -> float:
        """Publish the trainer's weights as those of ``step`` (once per step); the seconds spent."""
        if self.synced_step == step:
            return 0.0
        started = time.perf_counter()
        for name in self.alive:  # deaths noticed since the last step, before the weights go out
            why = self.transport.exited(name)
            if why is not None:
                self._bury(name, why)
        self.published, failures = self.transport.publish(step, self.alive)
        for name, reason in failures.items():
            self._bury(name, reason)
        self.synced_step, self.weight_version = step, step
        self.local.weight_version = step
        self.last_sync_s = time.perf_counter() - started
        return self.last_sync_s

    def generate(self, requests: Sequence[Request], *, seed: int = 0,
                 max_steps: int | None = None) -> list[Completion]:
        """The completions of ``requests`` in order, sampled by the workers with the weights of
        the last :meth:`sync` (the same samples as ``RolloutEngine.generate(requests, seed=seed)``
        on those weights). With ``max_steps`` each worker stops after that many decode steps of
        its share and the unfinished completions come back paused (partial rollouts)."""
        if self.synced_step is None or self.weight_version != self.synced_step:
            raise RLError("rollout workers: call sync(step) before generate (weights not published)")
        for index, request in enumerate(requests):
            self.local.check_request(index, request)
        seeded = [r if r.seed is not None or r.prefix is not None
                  else dataclasses.replace(r, seed=request_seed(seed, i)) for i, r in enumerate(requests)]
        results: dict[int, Completion] = {}
        owed: dict[int, tuple[str, list[tuple[int, Request]]]] = {}  # message id -> worker, items

        def assign(items: list[tuple[int, Request]]) -> None:
            alive = self.alive
            if not alive:  # nobody left: generate here
                done = self.local.generate([r for _, r in items], max_steps=max_steps)
                for (index, _), c in zip(items, done):
                    c.index = index
                    results[index] = c
                return
            for k, name in enumerate(alive):
                share = items[k::len(alive)]
                if share:
                    self._message += 1
                    owed[self._message] = (name, share)
                    self.transport.send(name, (self._message, self.weight_version, self.published, share,
                                               max_steps))

        assign(list(enumerate(seeded)))
        while owed:
            reply = self.transport.receive(POLL_S)
            if reply is None:
                for name in {n for n, _ in owed.values()}:
                    why = self.transport.exited(name)
                    if why is not None:
                        self._bury(name, why)
                        lost = [m for m, (n, _) in owed.items() if n == name]
                        for m in lost:
                            assign(owed.pop(m)[1])
                continue
            message, name, completions = reply
            if message not in owed:
                continue  # a reply to an earlier call, or from a worker already given up on
            for c in completions:
                results[c.index] = c
            owed.pop(message)
        return [results[i] for i in range(len(requests))]

    def close(self) -> None:
        """Stop the workers and remove the broadcast."""
        self.transport.close(self.alive)
