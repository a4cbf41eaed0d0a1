"""One thread owns the rollout engine and batches the requests of concurrent clients (docs/serve.md).

HTTP handlers :meth:`Scheduler.submit` a :class:`Job` (the engine requests of one chat request,
one per choice) into a bounded queue; a full queue raises :class:`QueueFull` (answered 429).
The scheduler thread keeps one :meth:`~k2.rl.rollout.RolloutEngine.generate` call running for
as long as anything runs or waits: before every decoding step the engine asks it (``admit``)
for as many requests as it has free rows, so a request that arrives mid-generation joins the
running batch at the next step instead of waiting for the others to finish. Each finished
choice comes back through ``on_finish``, and a job's future is resolved as soon as all its
choices are done. A cancelled job (its client went away) ends its running choices at their
next token and is never started if it is still waiting.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from k2.errors import ServeError
from k2.rl.rollout import Completion, Request, RolloutEngine

log = logging.getLogger("k2.serve")


class QueueFull(Exception):
    """The scheduler's queue holds ``max_queue`` jobs already."""


@dataclass
class Job:
    """The engine requests of one chat request and where their results go.

    ``on_token(choice, token)`` is called from the scheduler thread; a true return ends that
    choice. ``future`` gets the completions (in choice order) or the exception. :meth:`cancel`
    (the client went away) ends the running choices at their next token and skips the others.
    """

    requests: Sequence[Request]
    on_token: Callable[[int, int], bool | None] | None = None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    completions: list[Completion | None] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled = True

    def finish(self, choice: int, completion: Completion) -> None:
        """Record a finished choice; the future resolves with the last one."""
        if not self.completions:
            self.completions = [None] * len(self.requests)
        completion.index = choice
        self.completions[choice] = completion
        if all(c is not None for c in self.completions) and not self.future.done():
            self.future.set_result(list(self.completions))

    def fail(self, err: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(err)


class Scheduler:
    """Runs jobs on ``engine`` in a background thread, all in one continuous batch.

    Args:
        engine: the rollout engine (used only by the scheduler thread).
        max_queue: jobs that may wait for a row; one more raises :class:`QueueFull`.
        between_steps: called in the scheduler thread before every forward and, while idle,
            every ``idle_poll`` seconds (live weight updates, :mod:`k2.serve.weights`).
        idle_poll: seconds between idle calls of ``between_steps`` (and checks for stop).
    """

    def __init__(self, engine: RolloutEngine, *, max_queue: int = 64,
                 between_steps: Callable[[], None] | None = None, idle_poll: float = 0.05) -> None:
        self.engine = engine
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.between_steps = between_steps
        self.idle_poll = idle_poll
        self.calls = 0
        """``generate`` calls so far: one serves every request that overlaps a running one."""
        self._pending: deque[tuple[Job, int]] = deque()  # choices of a job taken from the queue
        self._owners: dict[int, tuple[Job, int]] = {}  # engine index (this call) -> job, choice
        self._admitted = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="k2-serve-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End every running choice at its next token, fail the waiting jobs, stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queued(self) -> int:
        """Jobs waiting for the engine."""
        return self.queue.qsize()

    @property
    def full(self) -> bool:
        """Whether a job submitted now would be refused (a cheap check before preparing one)."""
        return self.queue.full()

    @property
    def running_rows(self) -> int:
        """Sequences admitted into the engine and not finished."""
        return len(self._owners)

    def submit(self, job: Job) -> Future:
        """Queue ``job``; returns its future. Raises :class:`QueueFull`."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self.queue.maxsize} waiting)") from None
        return job.future

    # ---------------------------------------------------------------- the thread
    def _pull(self, block: bool) -> bool:
        """Move one job from the queue to the pending choices; False when none came."""
        try:
            job = self.queue.get(timeout=self.idle_poll) if block else self.queue.get_nowait()
        except queue.Empty:
            if block and self.between_steps is not None:
                try:
                    self.between_steps()  # idle: new weights still arrive
                except Exception:  # noqa: BLE001 - the thread must outlive a failed hook
                    log.exception("k2 serve: between_steps failed while idle")
            return False
        if not job.future.set_running_or_notify_cancel():
            return False
        self._pending.extend((job, i) for i in range(len(job.requests)))
        return True

    def _admit(self, room: int) -> list[Request]:
        """The engine's ``admit``: up to ``room`` waiting choices, in arrival order."""
        out: list[Request] = []
        while len(out) < room and not self._stop.is_set():
            if not self._pending and not self._pull(block=False):
                break
            job, choice = self._pending.popleft()
            if job.cancelled:  # its client left before it started
                job.finish(choice, Completion(choice, list(job.requests[choice].prompt_ids), finish_reason="stop"))
                continue
            self._owners[self._admitted] = (job, choice)
            self._admitted += 1
            out.append(job.requests[choice])
        return out

    def _on_token(self, index: int, token: int) -> bool:
        job, choice = self._owners[index]
        if job.cancelled or self._stop.is_set():
            return True
        return bool(job.on_token(choice, token)) if job.on_token is not None else False

    def _on_finish(self, completion: Completion) -> None:
        job, choice = self._owners.pop(completion.index)
        job.finish(choice, completion)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._pending and not self._pull(block=True):
                continue
            self.calls += 1
            self._admitted = 0
            try:
                self.engine.generate([], admit=self._admit, on_token=self._on_token, on_finish=self._on_finish,
                                     between_steps=self.between_steps)
            except BaseException as err:  # noqa: BLE001 - every job in the batch learns the failure
                for job, _ in list(self._owners.values()) + list(self._pending):
                    job.fail(err)
                self._pending.clear()
            finally:
                self._owners.clear()
        gone = ServeError("the server is shutting down", status=503, code="server_shutting_down")
        for job, _ in list(self._pending):
            job.fail(gone)
        self._pending.clear()
        while True:
            try:
                self.queue.get_nowait().fail(gone)
            except queue.Empty:
                break
