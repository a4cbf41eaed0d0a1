"""Naming the rank that stopped: when a collective fails, say which rank is gone.

A rank that crashes or is killed mid-step leaves the others inside a collective. Gloo and NCCL
then fail with a transport error ("Connection closed by peer [127.0.0.1]:41234", or a timeout
after the process group's ``timeout``) that names an address, not a rank. Inside
:func:`named_failures`, such an error makes every surviving rank check in under a key of the
rendezvous store (which lives in the ``torchrun`` agent, or in rank 0's process for a ``tcp://``
init method) and wait a few seconds for the others; the ranks that never check in are the lost
ones, and each survivor raises :class:`~k2.errors.RankLostError` naming them. The run's last
checkpoint is untouched: checkpoints are committed atomically (docs/checkpoints.md).

Errors that are not communication failures pass through unchanged (the rank that raised one
exits, and the others then name it).

A survivor should then leave through :func:`exit_after_rank_lost`: once a peer's sockets are gone,
the process group's C++ transport threads can abort the process during the interpreter's normal
teardown ("terminate called without an active exception", SIGABRT, about one run in ten with
gloo on CPU), which would replace the exit code the error deserves.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from k2.errors import K2Error, RankLostError

_TRANSPORT_MARKERS = ("connection closed", "connection reset", "read error", "write error",
                      "timed out", "timeout", "broken pipe", "nccl", "gloo")
CHECK_IN_S = 5.0
"""How long a survivor waits for the others to check in."""


def is_transport_error(err: BaseException) -> bool:
    """Whether ``err`` is a failed collective (a peer gone or silent) rather than a local bug."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _TRANSPORT_MARKERS)


def lost_ranks(wait_s: float = CHECK_IN_S, tag: str = "step") -> list[int] | None:
    """The ranks that do not check in within ``wait_s`` seconds (this rank checks in), or None
    when the rendezvous store cannot be reached (its host is gone: rank 0 under ``tcp://``)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"k2/alive/{tag}/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            present = {r for r in range(world) if store.check([f"k2/alive/{tag}/{r}"])}
            if len(present) == world or time.monotonic() > deadline:
                return sorted(set(range(world)) - present)
            time.sleep(0.05)
    except (RuntimeError, dist.DistError, ValueError):
        return None


def raise_if_rank_lost(err: BaseException, what: str, wait_s: float = CHECK_IN_S) -> None:
    """If ``err`` is a failed collective of a distributed run and a rank is gone, raise
    :class:`~k2.errors.RankLostError` naming it (every survivor does); otherwise return, and the
    caller re-raises ``err``.

    Args:
        err: the exception caught.
        what: what was running, for the message (e.g. ``"step 12"``).
        wait_s: how long survivors wait for each other to check in.
    """
    if isinstance(err, K2Error) or not dist.is_initialized() or not is_transport_error(err):
        return
    rank = dist.get_rank()
    lost = lost_ranks(wait_s, tag=what.replace(" ", "_"))
    if lost is None:
        who = "the rendezvous store's host (rank 0 under a tcp:// init, or the torchrun agent)"
    elif lost:
        who = "rank " + ", ".join(map(str, lost))
    else:  # every rank is still there: not a lost rank, the original error stands
        return
    raise RankLostError(f"rank {rank}: {what} failed: {who} stopped responding "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); the last "
                        "checkpoint is intact, continue with --resume") from err


@contextmanager
def named_failures(what: str, wait_s: float = CHECK_IN_S) -> Iterator[None]:
    """Run a block of collectives; if one fails because a rank is gone, raise
    :class:`~k2.errors.RankLostError` naming it (see :func:`raise_if_rank_lost`)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only transport errors are translated
        raise_if_rank_lost(err, what, wait_s)
        raise


def exit_after_rank_lost(code: int) -> None:
    """Leave the process with ``code`` at once, after flushing Python's output streams: skips
    the teardown of a process group whose peer is gone, which can abort (see the module doc).
    Call it only after the error has been reported."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
