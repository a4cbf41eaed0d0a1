"""What one sandboxed run returns: :class:`Result` and its statuses (docs/sandbox.md)."""

from __future__ import annotations

import signal
from dataclasses import dataclass

OK = "ok"
"""The program exited with status 0."""
ERROR = "error"
"""The program exited with a non-zero status (an exception, a failed assert, ``sys.exit(1)``)."""
TIMEOUT = "timeout"
"""The wall-clock limit passed (the sandbox killed it) or the CPU-time limit did (the kernel)."""
MEMORY = "memory"
"""The program ran out of its address-space limit (a ``MemoryError`` or failed allocation)."""
OUTPUT_LIMIT = "output_limit"
"""stdout or stderr went past ``max_output_bytes``; the sandbox killed it."""
KILLED = "killed"
"""A signal ended the program (its own ``kill -9``, a segfault, ``SIGXFSZ``...)."""

STATUSES = (OK, ERROR, TIMEOUT, MEMORY, OUTPUT_LIMIT, KILLED)

# What a program prints when it runs out of address space: Python's MemoryError traceback, C's
# strerror(ENOMEM) and the C++ runtime's bad_alloc. Checked in the last lines of stderr only.
_MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")


def looks_like_memory_error(stderr: str) -> bool:
    """Whether the tail of ``stderr`` says the program ran out of memory."""
    tail = stderr[-2000:].strip().splitlines()[-3:]
    return any(marker in line for line in tail for marker in _MEMORY_MARKERS)


@dataclass(frozen=True)
class Result:
    """The outcome of one sandboxed run.

    Attributes:
        status: one of ``ok``, ``error``, ``timeout``, ``memory``, ``output_limit``, ``killed``.
        exit_code: the program's exit status, or None when a signal ended it.
        signal: the number of the signal that ended it, or None.
        stdout, stderr: what it wrote, decoded as UTF-8 (invalid bytes replaced), cut at the
            output cap.
        stdout_truncated, stderr_truncated: True when the stream was cut at the cap; the text
            then ends with a ``[... truncated by the k2 sandbox ...]`` line.
        wall_s: wall-clock seconds from start to the end of cleanup.
        cpu_s: user + system CPU seconds of the process tree, as the kernel accounted them.
        isolation: ``bwrap`` or ``unsafe-rlimits-only`` (see docs/sandbox.md).
    """

    status: str
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    wall_s: float
    cpu_s: float
    isolation: str

    @property
    def ok(self) -> bool:
        """True when the program exited with status 0."""
        return self.status == OK

    def describe(self) -> str:
        """One line for a person: the status and how the program ended."""
        if self.signal is not None:
            try:
                how = signal.Signals(self.signal).name
            except ValueError:
                how = f"signal {self.signal}"
        else:
            how = f"exit {self.exit_code}"
        return (
            f"{self.status} ({how}), {self.wall_s:.3f} s wall, {self.cpu_s:.3f} s CPU, "
            f"isolation {self.isolation}"
        )
