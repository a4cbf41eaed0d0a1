"""The hostile programs the sandbox is tested against (tests/test_sandbox_hostile.py), and the
table of what each tried and what happened in docs/sandbox.md:
``python tests/sandbox_hostile.py`` runs them all and prints that table.

Each program gets the host's layout through ``str.format``: ``{host}`` a world-readable host
directory holding ``secret.txt`` and ``victim.txt``, ``{port}`` a TCP server on 127.0.0.1,
``{pid}`` the test process's host pid (which also names an abstract UNIX socket the host
listens on, ``@k2-hostile-{pid}``). A program prints ``ESCAPED`` if an attack works.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Attack:
    name: str
    tried: str  # for the docs table
    code: str
    statuses: tuple[str, ...]  # the acceptable statuses
    stderr_has: tuple[str, ...] = ()  # one of these must be in stderr (why it failed)
    limits: dict = field(default_factory=dict)  # run() keyword arguments
    root_only: bool = False


ATTACKS = [
    Attack(
        "write-outside",
        "create a file in a host directory, /usr and /",
        "import os\n"
        "for path in ('{host}/planted.txt', '/usr/planted.txt', '/planted.txt'):\n"
        "    try:\n"
        "        open(path, 'w').write('x'); print('ESCAPED', path)\n"
        "    except OSError as e: print(path, e)\n"
        "open('{host}/planted.txt', 'w')\n",
        ("error",),
        ("FileNotFoundError",),
    ),
    Attack(
        "delete-outside",
        "delete a host file and a system binary",
        "import os\n"
        "for path in ('/usr/bin/env', '{host}/victim.txt'):\n"
        "    try:\n"
        "        os.remove(path); print('ESCAPED', path)\n"
        "    except OSError as e: print(path, e)\n"
        "os.remove('/usr/bin/env')\n",
        ("error",),
        ("Read-only file system", "PermissionError"),
    ),
    Attack(
        "chmod-outside",
        "chmod a system binary and a host file",
        "import os\n"
        "os.chmod('/usr/bin/env', 0o4777)\n",
        ("error",),
        ("Read-only file system", "PermissionError", "Operation not permitted"),
    ),
    Attack(
        "read-secret",
        "read a world-readable secret planted in a host directory, and /etc/shadow",
        "for path in ('/etc/shadow', '{host}/secret.txt'):\n"
        "    try: print('ESCAPED', open(path).read())\n"
        "    except OSError as e: print(path, e)\n"
        "open('{host}/secret.txt').read()\n",
        ("error",),
        ("FileNotFoundError",),
    ),
    Attack(
        "symlink-escape",
        "symlink from the scratch directory to the host secret and to /proc/1/root, then read",
        "import os\n"
        "os.symlink('{host}/secret.txt', 'link')\n"
        "os.symlink('/proc/1/root/{host}/secret.txt', 'link2')\n"
        "for p in ('link2', 'link'):\n"
        "    try: print('ESCAPED', open(p).read())\n"
        "    except OSError as e: print(p, e)\n"
        "open('link').read()\n",
        ("error",),
        ("FileNotFoundError",),
    ),
    Attack(
        "network-localhost",
        "connect to a TCP server listening on the host's 127.0.0.1",
        "import socket\n"
        "s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "print('ESCAPED connected')\n",
        ("error",),
        ("ConnectionRefusedError", "OSError", "Network is unreachable"),
    ),
    Attack(
        "unix-socket",
        "connect to an abstract UNIX socket a host process listens on (as X11 and D-Bus do)",
        "import socket\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect('\\0k2-hostile-{pid}')\n"
        "print('ESCAPED connected')\n",
        ("error",),
        ("ConnectionRefusedError",),
    ),
    Attack(
        "dns",
        "resolve a host name (and reach a public address)",
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=2); print('ESCAPED tcp')\n"
        "except OSError as e: print('1.1.1.1', e)\n"
        "print('ESCAPED', socket.getaddrinfo('pypi.org', 443))\n",
        ("error",),
        ("gaierror",),
    ),
    Attack(
        "fork-bomb",
        "fork without end, ignoring failures",
        "import os\n"
        "while True:\n"
        "    try: os.fork()\n"
        "    except OSError: pass\n",
        ("timeout",),
        limits={"timeout_s": 2, "max_procs": 32},
    ),
    Attack(
        "memory-bomb",
        "allocate 100 MB blocks until something gives",
        "blocks = []\nwhile True: blocks.append(bytearray(100 * 1024 * 1024))\n",
        ("memory",),
        ("MemoryError",),
        limits={"memory_mb": 512},
    ),
    Attack(
        "tmpfs-fill",
        "fill the scratch directory (RAM-backed) with files under the file-size cap",
        "i = 0\nwhile True:\n    open(f'f{{i}}', 'wb').write(b'x' * 8 * 1024 * 1024); i += 1\n",
        ("error",),
        ("No space left on device",),
        limits={"scratch_mb": 32},
    ),
    Attack(
        "infinite-loop",
        "spin forever",
        "while True: pass\n",
        ("timeout",),
        limits={"timeout_s": 2},
    ),
    Attack(
        "sleep",
        "sleep forever",
        "import time\ntime.sleep(10**6)\n",
        ("timeout",),
        limits={"timeout_s": 1},
    ),
    Attack(
        "huge-output",
        "write gigabytes to stdout",
        "import os\nb = b'x' * (1 << 20)\nwhile True: os.write(1, b)\n",
        ("output_limit",),
        limits={"max_output_bytes": 1 << 20, "timeout_s": 20},
    ),
    Attack(
        "huge-file",
        "write a 1 GB file",
        "f = open('big', 'wb')\nfor _ in range(1024): f.write(b'x' * (1 << 20))\n",
        ("error",),
        ("File too large",),
    ),
    Attack(
        "raise-rlimits",
        "raise its own address-space, process and CPU limits",
        "import resource\n"
        "for r in (resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_CPU):\n"
        "    try:\n"
        "        resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)); print('ESCAPED', r)\n"
        "    except (ValueError, OSError) as e: print(r, e)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)\n",
        ("error",),
        ("not allowed to raise maximum limit",),
    ),
    Attack(
        "kill-parent",
        "SIGKILL its parent (the namespace's init), every process it may signal (kill -1), and "
        "the host pid; then check that it is still running",
        "import os, signal\n"
        "os.kill(os.getppid(), signal.SIGKILL)\n"
        "for target in (-1, {pid}):\n"
        "    try: os.kill(target, signal.SIGKILL)\n"
        "    except OSError as e: print(target, e)\n"
        "print('parent', os.getppid(), 'still alive')\n",
        ("ok",),
    ),
    Attack(
        "daemonize",
        "double-fork, setsid and close its output to outlive the run",
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.close(1); os.close(2)\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "print('parent done')\n",
        ("ok",),
    ),
    Attack(
        "proc-snoop",
        "list /proc, read every process's environ and cmdline, and the host pid's",
        "import os\n"
        "seen = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "print('pids', seen)\n"
        "for pid in seen + [{pid}]:\n"
        "    try:\n"
        "        data = open(f'/proc/{{pid}}/environ', 'rb').read() + open(f'/proc/{{pid}}/cmdline', 'rb').read()\n"
        "        if b'K2_HOST_SECRET' in data or b'pytest' in data: print('ESCAPED', pid)\n"
        "    except OSError as e: print(pid, e)\n"
        "open('/proc/{pid}/environ')\n",
        ("error",),
        ("FileNotFoundError",),
    ),
    Attack(
        "ptrace",
        "PTRACE_ATTACH (via ctypes) to the host test process's pid",
        "import ctypes, ctypes.util, os\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)\n"
        "rc = libc.ptrace(16, {pid}, None, None)  # PTRACE_ATTACH\n"
        "print({pid}, rc, os.strerror(ctypes.get_errno()))\n"
        "if rc == 0: print('ESCAPED')\n"
        "raise SystemExit(3)\n",
        ("error",),
    ),
    Attack(
        "ctypes-syscalls",
        "through ctypes: setuid(0), mount a tmpfs, unshare a new user namespace, kill the host pid",
        "import ctypes, ctypes.util, os\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)\n"
        "def call(name, *args):\n"
        "    rc = getattr(libc, name)(*args)\n"
        "    print(name, rc, os.strerror(ctypes.get_errno()))\n"
        "    return rc\n"
        "ok = [call('setuid', 0) == 0, call('mount', b'none', b'/usr', b'tmpfs', 0, None) == 0,\n"
        "      call('unshare', 0x10000000) == 0, call('kill', {pid}, 9) == 0]\n"
        "if any(ok): print('ESCAPED', ok)\n"
        "raise SystemExit(4)\n",
        ("error",),
    ),
    # Root-specific: under bwrap as root a sandbox would keep every capability. The run drops to
    # an unprivileged uid with --cap-drop ALL first, so these all fail.
    Attack(
        "remount-rw",
        "remount / and /usr read-write (mount -o remount,rw, and mount(2) with MS_REMOUNT)",
        "import ctypes, ctypes.util, os, subprocess\n"
        "for target in ('/', '/usr'):\n"
        "    r = subprocess.run(['mount', '-o', 'remount,rw', target], capture_output=True, text=True)\n"
        "    print(target, r.returncode, r.stderr.strip())\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)\n"
        "rc = libc.mount(None, b'/usr', None, 32, None)  # MS_REMOUNT\n"
        "print('mount(2)', rc, os.strerror(ctypes.get_errno()))\n"
        "open('/usr/remounted', 'w')\n",
        ("error",),
        ("Read-only file system",),
        root_only=True,
    ),
    Attack(
        "mount",
        "mount a tmpfs and bind-mount / with the setuid-root mount(8), and unshare -r",
        "import subprocess\n"
        "for argv in (['mount', '-t', 'tmpfs', 'none', '/work'], ['mount', '--bind', '/', '/work'],\n"
        "             ['unshare', '-r', 'id']):\n"
        "    r = subprocess.run(argv, capture_output=True, text=True)\n"
        "    print(argv, r.returncode, r.stdout.strip(), r.stderr.strip())\n"
        "    if r.returncode == 0: print('ESCAPED')\n"
        "raise SystemExit(5)\n",
        ("error",),
        root_only=True,
    ),
    Attack(
        "capabilities",
        "use capabilities: chown to root and to another uid, bind port 80, set the hostname, "
        "open a raw socket, mknod a device, write /proc/sys and /proc/sysrq-trigger",
        "import os, socket\n"
        "open('f', 'w').close()\n"
        "tries = [lambda: os.chown('f', 1000, 1000), lambda: socket.socket().bind(('127.0.0.1', 80)),\n"
        "         lambda: socket.sethostname('owned'), lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1),\n"
        "         lambda: os.mknod('dev', 0o600 | 0o20000, os.makedev(1, 3)),\n"
        "         lambda: open('/proc/sys/kernel/hostname', 'w').write('owned'),\n"
        "         lambda: open('/proc/sysrq-trigger', 'w').write('h')]\n"
        "for t in tries:\n"
        "    try: t(); print('ESCAPED', t)\n"
        "    except OSError as e: print(e)\n"
        "print(open('/proc/self/status').read())\n"
        "os.chown('f', 0, 0)\n",
        ("error",),
        ("Invalid argument",),  # uid 0 does not exist in the sandbox's user namespace
        root_only=True,
    ),
    Attack(
        "setuid",
        "setuid(0)/setresuid(0), then gain root through the setuid-root mount(8)",
        "import os, subprocess\n"
        "r = subprocess.run(['mount', '-t', 'tmpfs', 'none', '/work'], capture_output=True, text=True)\n"
        "print('setuid-root mount:', r.returncode, r.stderr.strip())\n"
        "print([l for l in open('/proc/self/status') if l.startswith('NoNewPrivs')])\n"
        "try: os.setresuid(0, 0, 0); print('ESCAPED')\n"
        "except OSError as e: print('setresuid', e)\n"
        "os.setuid(0)\n",
        ("error",),
        ("Invalid argument", "PermissionError"),
        root_only=True,
    ),
]


def main() -> None:
    """Run every attack in the sandbox and print the markdown table for docs/sandbox.md."""
    import os
    import socket
    import tempfile

    from k2.sandbox import run

    host = tempfile.mkdtemp(prefix="hostile-host-")
    os.chmod(host, 0o755)
    for name in ("secret.txt", "victim.txt"):
        with open(os.path.join(host, name), "w") as fh:
            fh.write("K2_HOST_SECRET\n")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(f"\0k2-hostile-{os.getpid()}")
    unix.listen()
    print("| attempt | what it tried | status | how it failed |")
    print("| --- | --- | --- | --- |")
    for attack in ATTACKS:
        code = attack.code.format(host=host, port=port, pid=os.getpid())
        r = run(code, **attack.limits)
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else (r.stdout.strip().splitlines() or [""])[-1]
        if r.status in ("timeout", "output_limit", "killed", "memory") and not lines:
            why = r.describe().split(",")[0]
        why = why.replace("|", "\\|")[:110]
        print(f"| {attack.name} | {attack.tried} | `{r.status}` | {why} |")
    server.close()
    unix.close()
    for name in os.listdir(host):
        os.remove(os.path.join(host, name))
    os.rmdir(host)


if __name__ == "__main__":
    main()
