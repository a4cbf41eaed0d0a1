"""`k2 sandbox run FILE.py` and `k2 sandbox check`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sandbox_helpers import assert_clean


def k2(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "k2", "sandbox", *args], capture_output=True, text=True, timeout=120)


def test_run_prints_output_and_status(tmp_path: Path) -> None:
    script = tmp_path / "hello.py"
    script.write_text("import sys, os\nprint('hello', sys.stdin.read(), os.listdir('.'))\n")
    data = tmp_path / "in.txt"
    data.write_text("world")
    r = k2("run", str(script), "--stdin", str(data))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello world ['main.py']\n"
    assert "k2 sandbox: ok (exit 0)" in r.stderr and "isolation bwrap" in r.stderr
    assert_clean()


def test_run_timeout_and_error_exit_one(tmp_path: Path) -> None:
    script = tmp_path / "loop.py"
    script.write_text("while True: pass\n")
    r = k2("run", str(script), "--timeout", "1")
    # A busy loop meets the wall-clock watchdog (SIGKILL) and the kernel's CPU-time limit
    # (SIGXCPU) at the same second; on a loaded machine either can fire first. Both are a timeout.
    assert r.returncode == 1, r.stderr
    assert "k2 sandbox: timeout (SIGKILL)" in r.stderr or "k2 sandbox: timeout (SIGXCPU)" in r.stderr, r.stderr
    script.write_text("raise SystemExit(4)\n")
    r = k2("run", str(script))
    assert r.returncode == 1 and "k2 sandbox: error (exit 4)" in r.stderr


def test_run_missing_file_names_it(tmp_path: Path) -> None:
    r = k2("run", str(tmp_path / "absent.py"))
    assert r.returncode == 1 and "absent.py" in r.stderr and "Traceback" not in r.stderr


def test_bad_limit_is_a_clear_error(tmp_path: Path) -> None:
    script = tmp_path / "a.py"
    script.write_text("pass\n")
    r = k2("run", str(script), "--memory-mb", "0")
    assert r.returncode == 1 and "memory_mb" in r.stderr and "Traceback" not in r.stderr


def test_check_reports_bwrap() -> None:
    r = k2("check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "isolation    bwrap" in r.stdout and "bubblewrap" in r.stdout
