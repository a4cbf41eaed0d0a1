"""One thread owns the rollout engine and batches the requests of concurrent clients (docs/serve.md).

HTTP handlers :meth:`Scheduler.submit` a :class:`Job` (the engine requests of one chat request,
one per choice) into a bounded queue; a full queue raises :class:`QueueFull` (answered 429). The
scheduler thread takes every job waiting, runs them through one
:meth:`~k2.rl.rollout.RolloutEngine.generate` call (continuous batching over ``max_batch``
rows), tells each job's ``on_token`` as tokens are sampled (streaming, stop strings) and
resolves its future with its completions. Jobs arriving during a call wait for the next call.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from k2.rl.rollout import Completion, Request, RolloutEngine


class QueueFull(Exception):
    """The scheduler's queue holds ``max_queue`` jobs already."""


@dataclass
class Job:
    """The engine requests of one chat request and where their results go.

    ``on_token(choice, token)`` is called from the scheduler thread; a true return ends that
    choice. ``future`` gets the completions (in choice order) or the exception.
    """

    requests: Sequence[Request]
    on_token: Callable[[int, int], bool | None] | None = None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


class Scheduler:
    """Runs jobs on ``engine`` in a background thread.

    Args:
        engine: the rollout engine (used only by the scheduler thread).
        max_queue: jobs that may wait; one more raises :class:`QueueFull`.
        max_rows: most engine requests started in one generate call (later jobs wait).
    """

    def __init__(self, engine: RolloutEngine, *, max_queue: int = 64, max_rows: int | None = None) -> None:
        self.engine = engine
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.max_rows = max_rows or 4 * engine.max_batch
        self.running_rows = 0
        self._thread: threading.Thread | None = None
        self._held: Job | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="k2-serve-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self.queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    @property
    def queued(self) -> int:
        return self.queue.qsize()

    def submit(self, job: Job) -> Future:
        """Queue ``job``; returns its future. Raises :class:`QueueFull`."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self.queue.maxsize} waiting)") from None
        return job.future

    def _take(self) -> list[Job] | None:
        first = self._held or self.queue.get()
        self._held = None
        if first is None:
            return None
        jobs, rows = [first], len(first.requests)
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # stop after this batch
                break
            if rows + len(job.requests) > self.max_rows:
                self._held = job
                break
            jobs.append(job)
            rows += len(job.requests)
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            owners: list[tuple[Job, int]] = [(job, i) for job in jobs for i in range(len(job.requests))]
            requests = [r for job in jobs for r in job.requests]

            def on_token(index: int, token: int) -> bool | None:
                job, choice = owners[index]
                return job.on_token(choice, token) if job.on_token is not None else None

            self.running_rows = len(requests)
            try:
                completions: list[Completion] = self.engine.generate(requests, on_token=on_token)
            except BaseException as err:  # noqa: BLE001 - every job of the batch learns the failure
                for job in jobs:
                    job.future.set_exception(err)
                continue
            finally:
                self.running_rows = 0
            at = 0
            for job in jobs:
                job.future.set_result(completions[at : at + len(job.requests)])
                at += len(job.requests)
