"""The adversarial suite: every attack in tests/sandbox_hostile.py is contained, reported with
the right status, and leaves the host as it was (files, network, processes, hostname). As root
(CI) this includes the root-specific attacks: remount, mount, capabilities, setuid."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import tempfile
import threading

import pytest
from sandbox_helpers import assert_clean
from sandbox_hostile import ATTACKS

from k2.sandbox import isolation, run

SECRET = "K2_HOST_SECRET_7f3a"


class Host:
    """A world-readable host directory with a secret and a victim file, a TCP server on
    127.0.0.1 counting connections, and a sentinel process; ``snapshot`` is what must not
    change."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="k2-hostile-host-")
        os.chmod(self.dir, 0o755)  # reachable by any uid: only the sandbox stands in the way
        for name in ("secret.txt", "victim.txt"):
            with open(os.path.join(self.dir, name), "w") as fh:
                fh.write(SECRET + "\n")
            os.chmod(os.path.join(self.dir, name), 0o644)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.unix = socket.socket(socket.AF_UNIX)  # abstract: no file, scoped by network namespace
        self.unix.bind(f"\0k2-hostile-{os.getpid()}")
        self.unix.listen()
        self.unix.setblocking(False)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        self.sentinel = subprocess.Popen(["sleep", "300"])

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def _unix_connections(self) -> int:
        count = 0
        while True:
            try:
                conn, _ = self.unix.accept()
            except BlockingIOError:
                return count
            count += 1
            conn.close()

    def snapshot(self) -> dict:
        files = {}
        for path in [os.path.join(self.dir, n) for n in sorted(os.listdir(self.dir))] + ["/usr/bin/env"]:
            st = os.lstat(path)
            with open(path, "rb") as fh:
                files[path] = (stat.S_IMODE(st.st_mode), st.st_uid, fh.read()[:64])
        return {
            "files": files,
            "planted": [p for p in ("/usr/planted.txt", "/planted.txt", "/usr/remounted") if os.path.exists(p)],
            "hostname": socket.gethostname(),
            "connections": self.connections + self._unix_connections(),
            "sentinel alive": self.sentinel.poll() is None,
        }

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()
        self.unix.close()
        self.sentinel.kill()
        self.sentinel.wait()
        for name in os.listdir(self.dir):
            os.remove(os.path.join(self.dir, name))
        os.rmdir(self.dir)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("K2_HOST_SECRET", SECRET)  # for /proc/<pid>/environ snooping
    h = Host()
    yield h
    h.close()
    assert_clean()


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_contained(attack, host: Host) -> None:
    if attack.root_only and not isolation.running_as_root():
        pytest.skip("a root-specific attack: CI runs it as root")
    before = host.snapshot()
    code = attack.code.format(host=host.dir, port=host.port, pid=os.getpid())
    r = run(code, **attack.limits)
    assert r.status in attack.statuses, (r.status, r.stdout[-2000:], r.stderr[-2000:])
    if attack.stderr_has:
        assert any(s in r.stderr for s in attack.stderr_has), r.stderr[-2000:]
    assert "ESCAPED" not in r.stdout, r.stdout[-2000:]
    assert SECRET not in r.stdout and SECRET not in r.stderr
    assert r.isolation == "bwrap"
    assert host.snapshot() == before
    # and the machine is still responsive: a trivial run right after is quick
    after = run("print('fine')")
    assert after.status == "ok" and after.wall_s < 5


def test_unsafe_mode_really_is_unsafe(host: Host) -> None:
    """The same secret read that bwrap stops succeeds without it: the hostile tests would
    notice an isolation that does not isolate."""
    r = run(f"print(open('{host.dir}/secret.txt').read())", isolation="unsafe-rlimits-only")
    assert r.status == "ok" and SECRET in r.stdout


def test_daemon_does_not_outlive_its_run(host: Host) -> None:
    # A daemon that would write into the host-visible tmp after 1 s if it survived.
    marker = os.path.join(host.dir, "daemon-was-here")
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(1)\n"
        f"        open({marker!r}, 'w').write('x')\n"
        "    os._exit(0)\n"
    )
    assert run(code).status == "ok"
    assert_clean(wait_s=0.3, ignore=(host.sentinel.pid,))  # nothing of it remains, at once
    assert not os.path.exists(marker)
