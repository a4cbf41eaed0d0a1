"""How the sandbox isolates a run: bubblewrap's command line, the unprivileged uid per slot, the
interpreter, and the probe behind ``k2 sandbox check``. The design is in docs/sandbox.md.

Two isolation modes exist:

* ``bwrap`` (the default): bubblewrap with fresh user, PID, network, IPC, UTS and cgroup
  namespaces, read-only system directories, a size-capped tmpfs at ``/work`` as the only
  writable place, no capabilities, ``--die-with-parent``, and rlimits set by ``prlimit`` inside.
* ``unsafe-rlimits-only``: rlimits, a cleaned environment, an unprivileged uid when k2 runs as
  root, and a fresh host directory as the working directory — nothing stops the program from
  reading the host's files or using the network. Only for machines where bubblewrap cannot run,
  and only when the caller names it.

When k2 runs as root, every run first drops to an unprivileged uid of its own slot
(``UID_BASE + slot``) so the program never holds uid 0, even inside its user namespace.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from k2.errors import ConfigError, IsolationUnavailableError, SandboxError

BWRAP = "bwrap"
UNSAFE_RLIMITS_ONLY = "unsafe-rlimits-only"
ISOLATIONS = (BWRAP, UNSAFE_RLIMITS_ONLY)

def _uid_base() -> int:
    text = os.environ.get("K2_SANDBOX_UID_BASE", "61000")
    if not text.isdigit() or not 1000 <= int(text) <= 2**31 - 1024:
        raise ConfigError(f"K2_SANDBOX_UID_BASE={text!r} must be a uid between 1000 and 2**31 - 1024")
    return int(text)


UID_BASE = _uid_base()
"""First uid (and gid) a root-run sandbox drops to; slot ``i`` uses ``UID_BASE + i``. These uids
must belong to no account on the machine (``K2_SANDBOX_UID_BASE`` moves the range)."""
UID_SLOTS = 256
"""How many slots (parallel runs per machine, across processes) exist."""

SCRATCH = "/work"
"""The sandbox's working directory, HOME and TMPDIR: a fresh tmpfs, the only writable place."""

# Top-level system directories bound read-only (or recreated as the same symlinks, as on a
# merged-/usr system). Nothing else of the host's file system is visible.
_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# The few files of /etc that the dynamic loader and the C library read.
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives")
# Each namespace spelled out (rather than --unshare-all) so that none is silently skipped.
_NAMESPACES = (
    "--unshare-user",
    "--unshare-pid",
    "--unshare-net",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-cgroup-try",
)


def running_as_root() -> bool:
    """Whether this process is uid 0 (then runs drop to a slot uid)."""
    return os.geteuid() == 0


def find_tool(name: str) -> str | None:
    """The absolute path of ``name`` on PATH or in the usual system directories, or None."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/bin", "/bin", "/usr/local/bin", "/usr/sbin"):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


def _reachable_by_others(path: str) -> bool:
    """Whether a uid that is neither owner nor in the group can reach and read ``path``: every
    directory above it searchable by others, the file itself readable and executable by them."""
    real = os.path.realpath(path)
    parts = real.split("/")
    for i in range(2, len(parts)):
        try:
            st = os.stat("/".join(parts[:i]))
        except OSError:
            return False
        if not st.st_mode & stat.S_IXOTH:
            return False
    try:
        st = os.stat(real)
    except OSError:
        return False
    return bool(st.st_mode & stat.S_IROTH and st.st_mode & stat.S_IXOTH)


def default_python() -> str:
    """The interpreter sandboxed Python code runs with.

    The Python running k2, resolved through symlinks (a virtual environment's ``python`` is one),
    when the sandbox can reach it: as root the sandbox runs as an unprivileged uid, which cannot
    enter a private directory such as ``/root`` (where pyenv puts its Pythons). Otherwise the
    system's ``/usr/bin/python3``. Sandboxed code gets only the interpreter's standard library,
    never k2's virtual environment. ``run(..., python=PATH)`` picks another interpreter.
    """
    real = os.path.realpath(sys.executable)
    if not running_as_root() or _reachable_by_others(real):
        return real
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and _reachable_by_others(candidate):
            return os.path.realpath(candidate)
    raise IsolationUnavailableError(
        f"no Python the sandbox's unprivileged uid can run: {real} sits in a directory other "
        "users cannot enter, and /usr/bin/python3 is missing; install python3 from your "
        "system's packages or pass python=PATH (k2 sandbox run --python PATH)"
    )


def check_python(python: str) -> str:
    """``python`` made absolute and checked to exist and be executable, for the messages."""
    path = shutil.which(python) if os.sep not in python else python
    if path is None or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise SandboxError(f"sandbox interpreter {python!r} is not an executable file")
    real = os.path.realpath(path)
    if running_as_root() and not _reachable_by_others(real):
        raise SandboxError(
            f"sandbox interpreter {real} is not reachable by other users (a directory above it "
            "is private), so the sandbox's unprivileged uid could not run it"
        )
    return real


@functools.lru_cache(maxsize=None)
def _system_binds() -> tuple[str, ...]:
    args: list[str] = []
    for name in _SYSTEM_DIRS:
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for name in _ETC_FILES:
        path = "/etc/" + name
        if os.path.lexists(path):
            args += ["--ro-bind-try", path, path]
    return tuple(args)


def _interpreter_binds(python: str) -> list[str]:
    """A read-only bind of the interpreter's installation when it lies outside /usr (pyenv,
    /opt), so that its standard library and shared libpython are there."""
    real = os.path.realpath(python)
    if any(real.startswith(f"/{name}/") for name in _SYSTEM_DIRS if os.path.isdir(f"/{name}")):
        return []
    prefix = os.path.dirname(os.path.dirname(real))
    if prefix in ("", "/"):
        raise SandboxError(f"sandbox interpreter {real} has no installation prefix to bind")
    return ["--ro-bind", prefix, prefix]


@dataclass(frozen=True)
class Limits:
    """The resource limits of one run (see :func:`k2.sandbox.run` for what each means)."""

    timeout_s: float
    cpu_s: int
    memory_mb: int
    max_procs: int
    max_output_bytes: int
    max_file_mb: int
    scratch_mb: int
    max_open_files: int = 256

    def prlimit_args(self, prlimit: str) -> list[str]:
        """``prlimit`` setting every rlimit, soft = hard (the program cannot raise them), except
        the CPU limit's hard one second above, so SIGXCPU arrives before SIGKILL."""
        mib = 1024 * 1024
        return [
            prlimit,
            f"--cpu={self.cpu_s}:{self.cpu_s + 1}",
            f"--as={self.memory_mb * mib}",
            f"--nproc={self.max_procs}",
            f"--fsize={self.max_file_mb * mib}",
            f"--nofile={self.max_open_files}",
            "--core=0",
            "--",
        ]


def bwrap_argv(
    bwrap: str,
    *,
    uid: int | None,
    python: str,
    env: dict[str, str],
    limits: Limits,
    files: list[tuple[int, str]],
    json_status_fd: int,
    command: list[str],
) -> list[str]:
    """The bubblewrap command line of one run.

    ``files`` are ``(fd, relative path)`` pairs copied into the scratch tmpfs; ``command`` (from
    :func:`wrap_command`) runs in ``/work``.
    """
    argv = [bwrap, *_NAMESPACES, "--disable-userns", "--die-with-parent", "--new-session"]
    argv += ["--as-pid-1"]  # the wrapper shell is init: see _WRAPPER
    argv += ["--cap-drop", "ALL"]
    if uid is not None:
        argv += ["--uid", str(uid), "--gid", str(uid)]
    argv += ["--hostname", "sandbox", "--clearenv"]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    argv += list(_system_binds())
    argv += _interpreter_binds(python)
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--size", str(limits.scratch_mb * 1024 * 1024), "--tmpfs", SCRATCH]
    made: set[str] = set()
    for fd, rel in files:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder not in made:
                made.add(folder)
                argv += ["--dir", f"{SCRATCH}/{folder}"]
        argv += ["--perms", "0644", "--file", str(fd), f"{SCRATCH}/{rel}"]
    argv += ["--symlink", SCRATCH, "/tmp", "--chdir", SCRATCH]
    # /dev's own tmpfs and the root are made read-only last: the only writable mount is /work.
    argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
    argv += ["--json-status-fd", str(json_status_fd), "--"]
    argv += command
    return argv


# The wrapper around every program: a shell that stays as the PID namespace's init (bwrap's
# --as-pid-1), so bwrap's monitor reaps it and the CPU time of the whole tree reaches our wait4;
# the program, exec'd from a subshell under prlimit, runs as an ordinary process (pid 2). The
# shell's exit status is the program's (128 + N when signal N ended it). The shell's own stderr
# goes to /dev/null (it would add "Killed" lines); the program gets the real stderr.
_WRAPPER = 'exec 9>&2 2>/dev/null; (exec 2>&9 9>&-; exec "$@"); exit $?'


def wrap_command(limits: Limits, prlimit: str, command: list[str]) -> list[str]:
    """``command`` under ``prlimit`` (the run's rlimits), started by ``/bin/sh``."""
    return ["/bin/sh", "-c", _WRAPPER, "k2-sandbox", *limits.prlimit_args(prlimit), *command]


class UidSlot:
    """An unprivileged uid held for one run, locked across threads and processes with
    ``flock`` on a file in a root-only directory, so no two live runs share a uid."""

    _dir: str | None = None

    def __init__(self) -> None:
        self.uid: int | None = None
        self._fd: int | None = None

    @classmethod
    def _lock_dir(cls) -> str:
        if cls._dir is None:
            path = os.path.join(tempfile.gettempdir(), "k2-sandbox-uids")
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
                raise SandboxError(
                    f"{path} (the sandbox's uid locks) is not a directory private to root; "
                    "remove it"
                )
            cls._dir = path
        return cls._dir

    def __enter__(self) -> UidSlot:
        if not running_as_root():
            return self
        folder = self._lock_dir()
        for slot in range(UID_SLOTS):
            fd = os.open(os.path.join(folder, str(UID_BASE + slot)), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = UID_BASE + slot, fd
            return self
        raise SandboxError(f"all {UID_SLOTS} sandbox uid slots are busy; run fewer in parallel")

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def kill_all_of_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (``kill -9 -1`` run as that uid): the unsafe mode's way
    of catching a program that left its process group."""
    kill = find_tool("kill") or "/bin/kill"
    subprocess.run(
        [*drop_argv(uid), kill, "-9", "-1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        env={},
        check=False,
    )


@dataclass(frozen=True)
class Probe:
    """What this machine supports, as :func:`probe` found it."""

    bwrap: str | None
    bwrap_version: str | None
    prlimit: str | None
    as_root: bool
    python: str | None
    bwrap_works: bool
    reason: str | None  # why bwrap isolation is unavailable, when it is


@functools.lru_cache(maxsize=1)
def probe() -> Probe:
    """Find bubblewrap and prlimit and run a trivial program under the full bwrap command line
    (with the uid drop when root). Cached for the process."""
    bwrap = find_tool("bwrap")
    prlimit = find_tool("prlimit")
    as_root = running_as_root()
    version = None
    python: str | None = None
    reason: str | None = None
    try:
        python = default_python()
    except IsolationUnavailableError as err:
        reason = str(err)
    if bwrap is None:
        reason = (
            "bubblewrap (bwrap) is not installed: install your system's 'bubblewrap' package "
            "(`make system-deps` does it on Debian as root)"
        )
    elif prlimit is None:
        reason = "prlimit (util-linux) is not installed; the sandbox sets its rlimits with it"
    elif as_root and find_tool("setpriv") is None:
        reason = "setpriv (util-linux) is not installed; as root the sandbox drops its uid with it"
    else:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, check=False)
        version = out.stdout.strip() or None
    if reason is None:
        assert bwrap is not None and prlimit is not None and python is not None
        reason = _trial_run(bwrap, prlimit, python)
    return Probe(bwrap, version, prlimit, as_root, python, reason is None, reason)


def _trial_run(bwrap: str, prlimit: str, python: str) -> str | None:
    limits = Limits(10, 10, 512, 16, 1 << 16, 1, 1)
    read_end, write_end = os.pipe()
    with UidSlot() as slot:
        argv = bwrap_argv(
            bwrap,
            uid=slot.uid,
            python=python,
            env={"PATH": "/usr/bin:/bin"},
            limits=limits,
            files=[],
            json_status_fd=write_end,
            command=wrap_command(limits, prlimit, [python, "-c", "print('ok')"]),
        )
        try:
            out = subprocess.run(
                drop_argv(slot.uid) + argv,
                capture_output=True,
                text=True,
                timeout=30,
                pass_fds=(write_end,),
                cwd="/",
                env={},
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"bubblewrap could not start a sandbox: {err}"
        finally:
            for fd in (write_end, read_end):
                os.close(fd)
    if out.returncode == 0 and out.stdout.strip() == "ok":
        return None
    detail = (out.stderr.strip() or out.stdout.strip() or f"exit {out.returncode}")[-500:]
    hint = ""
    if "namespace" in detail.lower() or "permission" in detail.lower():
        hint = (
            " (this kernel or container may forbid unprivileged user namespaces: check "
            "/proc/sys/user/max_user_namespaces and kernel.apparmor_restrict_unprivileged_userns)"
        )
    return f"bubblewrap could not start a sandbox: {detail}{hint}"


def drop_argv(uid: int | None) -> list[str]:
    """The prefix that starts a command as ``uid`` (gid the same, no supplementary groups, no
    capabilities, an empty bounding set): util-linux's ``setpriv``. An exec'd helper rather
    than ``subprocess``'s ``user=``, which forces a full ``fork`` of the calling process —
    tens of milliseconds for a trainer with torch loaded — where ``setpriv`` lets it use
    ``vfork``. Empty when not root (no uid to drop)."""
    if uid is None:
        return []
    setpriv = find_tool("setpriv")
    if setpriv is None:
        raise IsolationUnavailableError(
            "setpriv (util-linux) is not installed; as root the sandbox drops to an "
            "unprivileged uid with it"
        )
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]


def require_bwrap() -> Probe:
    """The probe, or :class:`IsolationUnavailableError` saying why bwrap cannot run here."""
    found = probe()
    if not found.bwrap_works:
        raise IsolationUnavailableError(
            f"{found.reason}. Without bubblewrap the sandbox refuses to run untrusted code; "
            f"run(..., isolation='{UNSAFE_RLIMITS_ONLY}') opts into a weaker mode that does NOT "
            "isolate the file system or the network (docs/sandbox.md)"
        )
    return found
