"""``k2 sandbox``: run a file in the sandbox, and report which isolation this machine supports."""

from __future__ import annotations

import argparse
import sys


def run_file(args: argparse.Namespace) -> int:
    from k2.errors import K2IOError
    from k2.sandbox import run

    try:
        with open(args.file, encoding="utf-8") as fh:
            code = fh.read()
        stdin = None
        if args.stdin is not None:
            with open(args.stdin, "rb") as fh:
                stdin = fh.read()
    except OSError as err:
        raise K2IOError(f"cannot read {err.filename}: {err.strerror}") from err
    result = run(
        code,
        stdin=stdin,
        timeout_s=args.timeout,
        cpu_s=args.cpu,
        memory_mb=args.memory_mb,
        max_procs=args.max_procs,
        max_output_bytes=args.max_output_bytes,
        isolation=args.isolation,
        python=args.python,
    )
    sys.stdout.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.write(result.stderr)
    print(f"k2 sandbox: {result.describe()}", file=sys.stderr)
    return 0 if result.ok else 1


def check(args: argparse.Namespace) -> int:
    from k2.sandbox import isolation

    found = isolation.probe()
    print(f"bubblewrap   {found.bwrap or 'not found'}" + (f" ({found.bwrap_version})" if found.bwrap_version else ""))
    print(f"prlimit      {found.prlimit or 'not found'}")
    print(f"interpreter  {found.python or 'none usable'}")
    if found.as_root:
        print(
            f"running as   root: each run drops to its own uid "
            f"{isolation.UID_BASE}..{isolation.UID_BASE + isolation.UID_SLOTS - 1}, no capabilities"
        )
    else:
        print("running as   an unprivileged user: runs keep this uid, with no capabilities")
    if found.bwrap_works:
        print(
            "isolation    bwrap: user, PID, network, IPC, UTS and cgroup namespaces, read-only "
            "system directories, a private tmpfs at /work, rlimits (docs/sandbox.md)"
        )
        return 0
    print(f"isolation    NONE available: {found.reason}")
    print(
        f"             run(..., isolation='{isolation.UNSAFE_RLIMITS_ONLY}') opts into rlimits "
        "without file-system or network isolation"
    )
    return 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sandbox",
        help="run untrusted code isolated with bubblewrap; check the isolation",
        description="Run untrusted (model-written) code contained: bubblewrap namespaces, an "
        "unprivileged uid, rlimits, a private scratch directory. docs/sandbox.md has the design.",
    )
    commands = parser.add_subparsers(dest="sandbox_command", metavar="ACTION", required=True)

    p = commands.add_parser(
        "run",
        help="run a Python file in the sandbox and print its output and status",
        description="Run FILE.py in the sandbox (it sees only itself in /work). Its stdout and "
        "stderr are printed, then a status line (ok, error, timeout, memory, output_limit, "
        "killed) on stderr. Exit status 0 when the program exited 0, else 1.",
    )
    p.add_argument("file", metavar="FILE.py")
    p.add_argument("--timeout", type=float, default=10.0, help="wall-clock limit, seconds (default 10)")
    p.add_argument("--cpu", type=float, default=None, help="CPU-time limit, seconds (default: the timeout)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per process (default 1024)")
    p.add_argument("--max-procs", type=int, default=32, help="processes + threads at once (default 32)")
    p.add_argument(
        "--max-output-bytes", type=int, default=1 << 20, help="cap on stdout and on stderr (default 1 MiB)"
    )
    p.add_argument("--stdin", metavar="FILE", help="feed this file to the program's standard input")
    p.add_argument(
        "--isolation",
        choices=("bwrap", "unsafe-rlimits-only"),
        default="bwrap",
        help="bwrap (default); unsafe-rlimits-only does NOT isolate files or network",
    )
    p.add_argument("--python", metavar="PATH", help="interpreter inside the sandbox (default: see k2 sandbox check)")
    p.set_defaults(handler=run_file)

    p = commands.add_parser(
        "check",
        help="report which isolation this machine supports",
        description="Find bubblewrap and prlimit, start a trial sandbox and report what works. "
        "Exit status 0 when bwrap isolation works, 1 (with the reason) when it does not.",
    )
    p.set_defaults(handler=check)
