"""``python/k2/_native.pyi`` matches the built extension: mypy's stubtest compares every name,
signature, property and class flag of the stub with the module ``k2._native`` that this test
run imports, so the stub cannot drift from the Rust bindings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import k2


@pytest.mark.slow  # mypy analyses the stub and its imports (numpy): several seconds
def test_the_native_stub_matches_the_extension(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "mypy.stubtest", "k2._native"]
    if sys.version_info < (3, 12):
        # Before Python 3.12 (PEP 688) a class with a buffer slot has no ``__buffer__``
        # attribute at runtime; the stub declares it so type checkers accept memoryview(lease).
        allowlist = tmp_path / "allowlist.txt"
        allowlist.write_text("k2._native.BucketLease.__buffer__\n")
        args += ["--allowlist", str(allowlist)]
    package_root = Path(k2.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")]),
           "MYPY_CACHE_DIR": str(tmp_path / "mypy-cache")}
    done = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
