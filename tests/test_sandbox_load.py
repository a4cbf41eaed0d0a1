"""Load: 1,000 runs through run_many with a mix of good, failing and hostile programs — every
result right, no leaked process, file or descriptor, and the machine still responsive."""

from __future__ import annotations

import os
import time

import pytest
from sandbox_helpers import assert_clean

from k2.sandbox import run, run_many

N = 1000


def _job(i: int) -> tuple[dict, str, str | None]:
    """Job ``i``: its run() arguments, the status it must get and (when known) its stdout."""
    if i % 50 == 0:
        return {"code_or_argv": "while True: pass", "timeout_s": 0.5}, "timeout", None
    kind = i % 10
    if kind <= 4:
        return {"code_or_argv": f"print({i} * {i})"}, "ok", f"{i * i}\n"
    if kind == 5:
        return {"code_or_argv": f"raise ValueError({i})"}, "error", ""
    if kind == 6:
        code = "import os\nwhile True: os.write(1, b'x' * 65536)"
        return {"code_or_argv": code, "max_output_bytes": 4096}, "output_limit", None
    if kind == 7:
        code = "b = []\nwhile True: b.append(bytearray(50 * 1024 * 1024))"
        return {"code_or_argv": code, "memory_mb": 256}, "memory", ""
    if kind == 8:  # a fork storm that stops when the process limit bites
        code = "import os\nfor _ in range(64):\n    try: os.fork()\n    except OSError: break\n"
        return {"code_or_argv": code, "max_procs": 16}, "ok", ""
    code = f"open('/usr/pwned-{i}', 'w')"
    return {"code_or_argv": code}, "error", ""


@pytest.mark.slow
def test_thousand_mixed_runs() -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    jobs, expected = [], []
    for i in range(N):
        job, status, stdout = _job(i)
        jobs.append(job)
        expected.append((status, stdout))
    start = time.monotonic()
    results = run_many(jobs, workers=os.cpu_count() or 2, timeout_s=10)
    seconds = time.monotonic() - start
    wrong = [
        (i, r.status, r.stdout[:80], r.stderr[-200:])
        for i, (r, (status, stdout)) in enumerate(zip(results, expected, strict=True))
        if r.status != status or (stdout is not None and r.stdout != stdout)
    ]
    assert not wrong, wrong[:10]
    assert not any(os.path.exists(f"/usr/pwned-{i}") for i in range(N))
    assert_clean()
    assert len(os.listdir("/proc/self/fd")) == fds_before
    # responsive: a trivial run right after the storm is quick
    t = time.monotonic()
    assert run("print('ok')").stdout == "ok\n"
    assert time.monotonic() - t < 2
    print(f"{N} runs in {seconds:.1f} s ({N / seconds:.1f} runs/s)")
