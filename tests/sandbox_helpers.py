"""Checks the sandbox tests share: no stray process, zombie or scratch directory is left."""

from __future__ import annotations

import glob
import os
import tempfile
import time

from k2.sandbox import isolation


def _status_fields(pid: str) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def slot_uid_processes() -> list[str]:
    """Processes (anywhere on the machine) running as one of the sandbox's slot uids."""
    low, high = isolation.UID_BASE, isolation.UID_BASE + isolation.UID_SLOTS
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = _status_fields(pid)
        except OSError:
            continue
        uids = [int(u) for u in fields.get("Uid", "").split()]
        if any(low <= u < high for u in uids):
            found.append(f"{pid} {fields.get('Name')} uid {uids[0]} state {fields.get('State')}")
    return found


# Helper processes Python's multiprocessing starts once and keeps for the life of the process
# (another test may have started one): not something a sandbox run left behind.
_PYTHON_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _is_python_helper(parent: int, child: int) -> bool:
    if parent != os.getpid():
        return False
    try:
        with open(f"/proc/{child}/cmdline", "rb") as fh:
            cmdline = fh.read().decode(errors="replace")
    except OSError:
        return False
    return any(name in cmdline for name in _PYTHON_HELPERS)


def descendants(pid: int | None = None, ignore: tuple[int, ...] = ()) -> list[str]:
    """Every live or zombie descendant of ``pid`` (default: this process), except ``ignore``
    and multiprocessing's own long-lived helper processes (direct children of this process)."""
    todo, found = [pid or os.getpid()], []
    while todo:
        current = todo.pop()
        try:
            tids = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as fh:
                    children = [int(c) for c in fh.read().split()]
            except OSError:
                continue
            for child in children:
                if child in ignore or _is_python_helper(current, child):
                    continue
                try:
                    fields = _status_fields(str(child))
                except OSError:
                    continue
                found.append(f"{child} {fields.get('Name')} state {fields.get('State')}")
                todo.append(child)
    return found


def scratch_dirs() -> list[str]:
    """Host scratch directories of the unsafe mode (bwrap runs use a tmpfs, never the host)."""
    pattern = os.path.join(tempfile.gettempdir(), "k2-sandbox-*")
    return [p for p in glob.glob(pattern) if not p.endswith("k2-sandbox-uids")]


def leftovers(wait_s: float = 5.0, ignore: tuple[int, ...] = ()) -> dict[str, list[str]]:
    """What a finished batch of runs left behind (empty lists when clean). Waits up to
    ``wait_s`` for the kernel to finish tearing down namespaces (and, for the unsafe mode,
    for the machine's init to reap a killed daemon)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = {
            "slot-uid processes": slot_uid_processes() if isolation.running_as_root() else [],
            "descendants": descendants(ignore=ignore),
            "scratch dirs": scratch_dirs(),
        }
        if not any(found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def assert_clean(wait_s: float = 5.0, ignore: tuple[int, ...] = ()) -> None:
    found = leftovers(wait_s, ignore)
    assert not any(found.values()), found
