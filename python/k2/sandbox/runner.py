"""Run untrusted programs: :func:`run` for one, :func:`run_many` for a batch in parallel.

One run: validate the request, take an unprivileged uid slot (when k2 is root), put the files
into memfds that bubblewrap copies into the sandbox's fresh tmpfs, start bwrap, then watch the
program's stdout, stderr, exit and clock in one ``select`` loop until it exits or breaks a limit.
At a limit the sandbox SIGKILLs the PID namespace's init, which takes every process of the run
with it. The design and what each hostile attempt meets are in docs/sandbox.md.
"""

from __future__ import annotations

import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from k2.errors import SandboxError
from k2.sandbox import isolation as iso
from k2.sandbox.result import (
    ERROR,
    KILLED,
    MEMORY,
    OK,
    OUTPUT_LIMIT,
    TIMEOUT,
    Result,
    looks_like_memory_error,
)

MAIN = "main.py"
"""The file a code string is written to inside the scratch directory."""
TRUNCATION_MARK = "\n[... truncated by the k2 sandbox at {cap} bytes ...]\n"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CHILD_PID = re.compile(rb'"child-pid"\s*:\s*(\d+)')
_DRAIN_S = 2.0  # after the program ends, how long its pipes may take to reach end of file


@dataclass
class _Request:
    command: list[str]
    files: dict[str, bytes]
    stdin: bytes | None
    env: dict[str, str]
    limits: iso.Limits
    isolation: str
    python: str


def _as_bytes(value: str | bytes, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise SandboxError(f"sandbox {what} must be str or bytes, not {type(value).__name__}")


def _check_name(name: str) -> str:
    parts = name.split("/") if isinstance(name, str) else []
    if (
        not parts
        or name.startswith("/")
        or "\0" in name
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise SandboxError(
            f"sandbox file name {name!r} must be a relative path without '..', '.' or empty parts"
        )
    return name


def _positive(name: str, value: float | int) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise SandboxError(f"sandbox limit {name} must be a positive number, got {value!r}")


def _request(
    code_or_argv: str | Sequence[str],
    *,
    files: Mapping[str, str | bytes] | None,
    stdin: str | bytes | None,
    timeout_s: float,
    cpu_s: float | None,
    memory_mb: int,
    max_procs: int,
    max_output_bytes: int,
    max_file_mb: int,
    scratch_mb: int,
    env: Mapping[str, str] | None,
    isolation: str,
    python: str | None,
) -> _Request:
    if isolation not in iso.ISOLATIONS:
        raise SandboxError(
            f"sandbox isolation {isolation!r} is unknown; choose one of {', '.join(iso.ISOLATIONS)}"
        )
    for name, value in (
        ("timeout_s", timeout_s),
        ("memory_mb", memory_mb),
        ("max_procs", max_procs),
        ("max_output_bytes", max_output_bytes),
        ("max_file_mb", max_file_mb),
        ("scratch_mb", scratch_mb),
    ):
        _positive(name, value)
    if cpu_s is not None:
        _positive("cpu_s", cpu_s)
    limits = iso.Limits(
        timeout_s=float(timeout_s),
        cpu_s=max(1, math.ceil(cpu_s if cpu_s is not None else timeout_s)),
        memory_mb=int(memory_mb),
        max_procs=int(max_procs),
        max_output_bytes=int(max_output_bytes),
        max_file_mb=int(max_file_mb),
        scratch_mb=int(scratch_mb),
    )
    interpreter = iso.check_python(python) if python is not None else iso.default_python()
    blobs = {_check_name(name): _as_bytes(body, f"file {name!r}") for name, body in (files or {}).items()}
    if isinstance(code_or_argv, str):
        if MAIN in blobs:
            raise SandboxError(f"sandbox files may not hold {MAIN!r} when code is given as a string")
        blobs[MAIN] = code_or_argv.encode()
        command = [interpreter, MAIN]
    elif isinstance(code_or_argv, Sequence) and code_or_argv and all(
        isinstance(arg, str) and "\0" not in arg for arg in code_or_argv
    ):
        command = list(code_or_argv)
        if command[0] in ("python", "python3"):
            command[0] = interpreter
    else:
        raise SandboxError(
            "sandbox code_or_argv must be Python source (str) or a non-empty argv list of str"
        )
    clean_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    for key, text in (env or {}).items():
        if not isinstance(key, str) or not _ENV_NAME.match(key) or not isinstance(text, str) or "\0" in text:
            raise SandboxError(f"sandbox env entry {key!r} is not a valid variable name and str value")
        clean_env[key] = text
    return _Request(
        command=command,
        files=blobs,
        stdin=None if stdin is None else _as_bytes(stdin, "stdin"),
        env=clean_env,
        limits=limits,
        isolation=isolation,
        python=interpreter,
    )


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(f"k2-sandbox-{name}", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@dataclass
class _Watch:
    """What the supervision loop saw."""

    out: dict[int, bytearray] = field(default_factory=lambda: {1: bytearray(), 2: bytearray()})
    truncated: dict[int, bool] = field(default_factory=lambda: {1: False, 2: False})
    reason: str | None = None  # TIMEOUT or OUTPUT_LIMIT when the sandbox ended the run
    status_bytes: bytearray = field(default_factory=bytearray)  # bwrap's --json-status-fd
    cpu_at_kill: float = 0.0  # CPU seconds of the tree, read from /proc just before a kill


def _kill_pidfd(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _supervise(
    watch: _Watch,
    proc: subprocess.Popen,
    limits: iso.Limits,
    start: float,
    status_fd: int | None,
    kill_tree: Callable[[], None],
    *,
    kill_after_exit: bool,
) -> tuple[int, Any]:
    """Pump stdout/stderr (and bwrap's status fd) into ``watch``, enforce the wall clock and the
    output cap, and reap the process. Returns the wait status and the rusage.

    ``kill_after_exit``: run ``kill_tree`` once the main process exits (the unsafe mode, where
    its children are not tied to it); under bwrap they already died with the PID namespace.
    """
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): 1, proc.stderr.fileno(): 2}
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    side = {}
    if status_fd is not None:
        side[status_fd] = watch.status_bytes
    for fd in side:
        sel.register(fd, selectors.EVENT_READ)
    pidfd = os.pidfd_open(proc.pid)
    sel.register(pidfd, selectors.EVENT_READ)
    deadline = start + limits.timeout_s
    cap = limits.max_output_bytes
    exited = False
    killed_at: float | None = None  # when the sandbox sent its SIGKILL
    drain_until = math.inf  # after the exit: how long the pipes may take to close

    def stop(reason: str) -> None:
        nonlocal killed_at
        if watch.reason is None:
            watch.reason = reason
        if killed_at is None:
            killed_at = time.monotonic()
            kill_tree()

    try:
        while len(sel.get_map()) > 0:
            now = time.monotonic()
            if exited:
                if now >= drain_until:
                    break
                timeout = drain_until - now
            elif killed_at is not None:
                if now >= killed_at + _DRAIN_S:  # the SIGKILL did not end it: hit its group too
                    _killpg(proc.pid)
                    killed_at = now
                timeout = killed_at + _DRAIN_S - now
            else:
                if now >= deadline:
                    stop(TIMEOUT)
                    continue
                timeout = deadline - now
            for key, _ in sel.select(timeout):
                fd = key.fd
                if fd == pidfd:
                    sel.unregister(pidfd)
                    exited = True
                    drain_until = time.monotonic() + _DRAIN_S
                    if kill_after_exit:
                        kill_tree()
                    continue
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                elif fd in side:
                    side[fd] += chunk[: 4096 - len(side[fd])]
                else:
                    buf = watch.out[streams[fd]]
                    room = cap - len(buf)
                    if len(chunk) > room:
                        buf += chunk[: max(room, 0)]
                        watch.truncated[streams[fd]] = True
                        stop(OUTPUT_LIMIT)
                    else:
                        buf += chunk
    finally:
        if not exited:  # an exception in the loop: never leave the program running
            kill_tree()
            _killpg(proc.pid)
        sel.close()
    _, wait_status, rusage = os.wait4(proc.pid, 0)
    os.close(pidfd)
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    return wait_status, rusage


def _close_pipes(proc: subprocess.Popen) -> None:
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _decode(buf: bytearray, truncated: bool, cap: int) -> str:
    text = bytes(buf).decode("utf-8", errors="replace")
    return text + TRUNCATION_MARK.format(cap=cap) if truncated else text


def _classify(
    watch: _Watch, exit_code: int | None, sig: int | None, cpu: float, limits: iso.Limits, stderr: str
) -> str:
    if watch.reason is not None:
        return watch.reason
    if sig is not None:
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= limits.cpu_s):
            return TIMEOUT  # the kernel's CPU-time limit
        return MEMORY if looks_like_memory_error(stderr) else KILLED
    if exit_code == 0:
        return OK
    return MEMORY if looks_like_memory_error(stderr) else ERROR


def _run_bwrap(req: _Request, probe: iso.Probe) -> Result:
    assert probe.bwrap is not None and probe.prlimit is not None
    start = time.monotonic()
    opened: list[int] = []  # every fd this run opened, closed at the end
    try:
        files = []
        for name, data in req.files.items():
            opened.append(_memfd(name.replace("/", "_"), data))
            files.append((opened[-1], name))
        status_r, status_w = os.pipe()
        opened += [status_r, status_w]
        stdin_fd = _memfd("stdin", req.stdin) if req.stdin is not None else None
        if stdin_fd is not None:
            opened.append(stdin_fd)
        env = dict(req.env, HOME=iso.SCRATCH, TMPDIR=iso.SCRATCH)
        with iso.UidSlot() as slot:
            argv = iso.bwrap_argv(
                probe.bwrap,
                uid=slot.uid,
                python=req.python,
                env=env,
                limits=req.limits,
                files=files,
                json_status_fd=status_w,
                command=iso.wrap_command(req.limits, probe.prlimit, req.command),
            )
            proc = _spawn(argv, stdin_fd, (*(fd for fd, _ in files), status_w), slot.uid)
            opened.remove(status_w)  # only bwrap holds the write end now
            os.close(status_w)
            watch = _Watch()
            ns_init: list[int] = []  # a pidfd of the PID namespace's init, once known

            def kill_tree() -> None:
                # SIGKILL to the namespace's init ends every process in it at once.
                if not ns_init:
                    pid = _child_pid(watch)
                    if pid is not None and _parent_of(pid) == proc.pid:
                        try:
                            ns_init.append(os.pidfd_open(pid))
                            opened.append(ns_init[0])
                        except OSError:
                            pass
                        watch.cpu_at_kill = _tree_cpu(pid)
                if ns_init:
                    # bwrap's monitor then reaps the init and exits: no orphan, no zombie.
                    _kill_pidfd(ns_init[0])
                else:
                    _killpg(proc.pid)  # before the namespace exists: bwrap itself

            wait_status, rusage = _supervise(
                watch, proc, req.limits, start, status_r, kill_tree, kill_after_exit=False
            )
            _close_pipes(proc)
    finally:
        for fd in opened:
            os.close(fd)
    if _child_pid(watch) is None and watch.reason is None:
        raise SandboxError(
            "bubblewrap failed to set up the sandbox: "
            + bytes(watch.out[2]).decode("utf-8", "replace").strip()[-500:]
        )
    # bwrap exits with the wrapper shell's status: the program's, or 128 + N when signal N
    # ended it (docs/sandbox.md: a program exiting with 129..192 itself reads as a signal).
    code = os.waitstatus_to_exitcode(wait_status)
    exit_code: int | None
    sig: int | None
    if code < 0:
        exit_code, sig = None, -code
    elif code > 128 and code - 128 < signal.NSIG:
        exit_code, sig = None, code - 128
    else:
        exit_code, sig = code, None
    return _result(watch, exit_code, sig, rusage, req.limits, start, iso.BWRAP)


def _spawn(
    argv: list[str],
    stdin_fd: int | None,
    pass_fds: tuple[int, ...],
    uid: int | None,
    cwd: str = "/",
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start ``argv`` as ``uid`` (via setpriv) in its own session, stdout/stderr piped."""
    return subprocess.Popen(
        iso.drop_argv(uid) + argv,
        stdin=stdin_fd if stdin_fd is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
        cwd=cwd,
        env=env or {},
        start_new_session=True,
    )


def _child_pid(watch: _Watch) -> int | None:
    match = _CHILD_PID.search(watch.status_bytes)
    return int(match.group(1)) if match else None


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read()
    except OSError:
        return None
    return int(fields[fields.rindex(b")") + 2 :].split()[1])


_TICK = os.sysconf("SC_CLK_TCK")


def _tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its descendants (their own and their reaped children's),
    read from /proc: the CPU time of a run the sandbox is about to kill, whose accounting the
    kernel drops when the PID namespace is torn down."""
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read()
            total += sum(int(x) for x in fields[fields.rindex(b")") + 2 :].split()[11:15])
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                    todo += [int(x) for x in fh.read().split()]
        except (OSError, ValueError):
            continue
    return total / _TICK


def _result(watch, exit_code, sig, rusage, limits, start, isolation) -> Result:
    # bwrap's monitor reaps the namespace's init, which reaped everything under it: the
    # rusage of our wait4 covers the whole tree, except at a kill (then the /proc reading).
    cpu = max(rusage.ru_utime + rusage.ru_stime, watch.cpu_at_kill)
    stderr = _decode(watch.out[2], watch.truncated[2], limits.max_output_bytes)
    return Result(
        status=_classify(watch, exit_code, sig, cpu, limits, stderr),
        exit_code=exit_code,
        signal=sig,
        stdout=_decode(watch.out[1], watch.truncated[1], limits.max_output_bytes),
        stderr=stderr,
        stdout_truncated=watch.truncated[1],
        stderr_truncated=watch.truncated[2],
        wall_s=time.monotonic() - start,
        cpu_s=cpu,
        isolation=isolation,
    )


def _run_unsafe(req: _Request, prlimit: str) -> Result:
    start = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="k2-sandbox-")
    opened: list[int] = []
    try:
        with iso.UidSlot() as slot:
            for name, data in req.files.items():
                path = os.path.join(scratch, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as fh:
                    fh.write(data)
            if slot.uid is not None:
                for folder, dirs, names in os.walk(scratch):
                    os.chown(folder, slot.uid, slot.uid)
                    for entry in names:
                        os.chown(os.path.join(folder, entry), slot.uid, slot.uid)
            stdin_fd = _memfd("stdin", req.stdin) if req.stdin is not None else None
            if stdin_fd is not None:
                opened.append(stdin_fd)
            env = dict(req.env, HOME=scratch, TMPDIR=scratch)
            argv = iso.wrap_command(req.limits, prlimit, req.command)
            proc = _spawn(argv, stdin_fd, (), slot.uid, cwd=scratch, env=env)
            watch = _Watch()

            def kill_tree() -> None:
                if not watch.cpu_at_kill:
                    watch.cpu_at_kill = _tree_cpu(proc.pid)
                _killpg(proc.pid)
                if slot.uid is not None:
                    iso.kill_all_of_uid(slot.uid)

            wait_status, rusage = _supervise(
                watch, proc, req.limits, start, None, kill_tree, kill_after_exit=True
            )
            _close_pipes(proc)
    finally:
        for fd in opened:
            os.close(fd)
        _remove_tree(scratch)
    code = os.waitstatus_to_exitcode(wait_status)
    exit_code: int | None = code if code >= 0 else None
    sig: int | None = -code if code < 0 else None
    if code > 128 and code - 128 < signal.NSIG:
        exit_code, sig = None, code - 128
    return _result(watch, exit_code, sig, rusage, req.limits, start, iso.UNSAFE_RLIMITS_ONLY)


def _remove_tree(path: str) -> None:
    def fix(func, target, _exc):  # a program may have taken away its own directory's write bit
        os.chmod(os.path.dirname(target), 0o700)
        func(target)

    shutil.rmtree(path, onerror=fix)


def run(
    code_or_argv: str | Sequence[str],
    *,
    files: Mapping[str, str | bytes] | None = None,
    stdin: str | bytes | None = None,
    timeout_s: float = 10.0,
    cpu_s: float | None = None,
    memory_mb: int = 1024,
    max_procs: int = 32,
    max_output_bytes: int = 1 << 20,
    max_file_mb: int = 16,
    scratch_mb: int = 64,
    env: Mapping[str, str] | None = None,
    isolation: str = iso.BWRAP,
    python: str | None = None,
) -> Result:
    """Run untrusted code in the sandbox and report how it ended (docs/sandbox.md).

    Args:
        code_or_argv: Python source (written to ``/work/main.py`` and run with the sandbox's
            interpreter) or an argv list; an argv starting with ``python``/``python3`` gets the
            sandbox's interpreter, any other program must be a path visible inside (``/bin/sh``).
        files: relative path -> content, written into the scratch directory ``/work`` first.
        stdin: what the program reads on standard input (none: ``/dev/null``).
        timeout_s: wall-clock limit; at it the sandbox kills the whole process tree.
        cpu_s: CPU-time limit (``RLIMIT_CPU``, whole seconds, rounded up); default ``timeout_s``.
        memory_mb: address-space limit of each process (``RLIMIT_AS``).
        max_procs: processes and threads the program may have at once (``RLIMIT_NPROC``).
        max_output_bytes: cap on stdout and on stderr; past it the run ends as ``output_limit``.
        max_file_mb: largest file the program may write (``RLIMIT_FSIZE``).
        scratch_mb: size of the ``/work`` tmpfs, the only writable place (bwrap only).
        env: extra environment variables; the host's environment is never passed on.
        isolation: ``"bwrap"`` (default), or ``"unsafe-rlimits-only"`` to opt into a mode that
            does NOT isolate the file system or network, for machines without bubblewrap.
        python: the interpreter inside the sandbox (default: :func:`~k2.sandbox.isolation.default_python`).

    Raises:
        SandboxError: the request is malformed (the message names the field), or bubblewrap
            failed to set up the sandbox.
        IsolationUnavailableError: bubblewrap cannot run here (the message says why) and
            ``isolation`` is ``"bwrap"``.
    """
    req = _request(
        code_or_argv,
        files=files,
        stdin=stdin,
        timeout_s=timeout_s,
        cpu_s=cpu_s,
        memory_mb=memory_mb,
        max_procs=max_procs,
        max_output_bytes=max_output_bytes,
        max_file_mb=max_file_mb,
        scratch_mb=scratch_mb,
        env=env,
        isolation=isolation,
        python=python,
    )
    return _execute(req)


def _execute(req: _Request) -> Result:
    if req.isolation == iso.BWRAP:
        return _run_bwrap(req, iso.require_bwrap())
    prlimit = iso.find_tool("prlimit")
    if prlimit is None:
        raise SandboxError("prlimit (util-linux) is not installed; the sandbox sets rlimits with it")
    return _run_unsafe(req, prlimit)


Job = str | Sequence[str] | Mapping[str, Any]
"""One job of :func:`run_many`: code or argv, or a mapping of :func:`run`'s keyword arguments
with the code under ``"code_or_argv"``."""


def run_many(jobs: Iterable[Job], *, workers: int | None = None, **defaults: Any) -> list[Result]:
    """Run ``jobs`` in parallel, ``workers`` at a time (default: the CPU count), and return
    their results in the jobs' order. ``defaults`` are :func:`run` keyword arguments for every
    job; a mapping job overrides them. Every job is validated before any starts."""
    if workers is None:
        workers = os.cpu_count() or 1
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise SandboxError(f"run_many workers must be a positive int, got {workers!r}")
    requests = []
    for index, job in enumerate(jobs):
        kwargs = dict(defaults)
        if isinstance(job, Mapping):
            kwargs.update(job)
            if "code_or_argv" not in kwargs:
                raise SandboxError(f"run_many job {index} has no 'code_or_argv'")
            code = kwargs.pop("code_or_argv")
        else:
            code = job
        try:
            requests.append(_request(code, **_with_run_defaults(kwargs)))
        except TypeError as err:
            raise SandboxError(f"run_many job {index}: {err}") from None
        except SandboxError as err:
            raise SandboxError(f"run_many job {index}: {err}") from None
    if not requests:
        return []
    if any(req.isolation == iso.BWRAP for req in requests):
        iso.require_bwrap()
    with ThreadPoolExecutor(max_workers=min(workers, len(requests))) as pool:
        return list(pool.map(_execute, requests))


_RUN_DEFAULTS = {
    "files": None,
    "stdin": None,
    "timeout_s": 10.0,
    "cpu_s": None,
    "memory_mb": 1024,
    "max_procs": 32,
    "max_output_bytes": 1 << 20,
    "max_file_mb": 16,
    "scratch_mb": 64,
    "env": None,
    "isolation": iso.BWRAP,
    "python": None,
}


def _with_run_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = set(kwargs) - set(_RUN_DEFAULTS)
    if unknown:
        raise SandboxError(f"unknown sandbox argument(s): {', '.join(sorted(unknown))}")
    return {**_RUN_DEFAULTS, **kwargs}
