"""The Rust extension seen from Python, checked against the `xxhash` package."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import xxhash

import k2
from k2 import _native


def test_native_version_is_the_package_version() -> None:
    assert _native.__version__ == k2.__version__
    assert k2.__version__.count(".") == 2


@pytest.mark.parametrize("size", [0, 1, 15, 16, 240, 241, 4096, 1 << 20])
def test_xxh3_matches_reference_implementation(size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert _native.xxh3_64(data) == xxhash.xxh3_64_intdigest(data)


def test_xxh3_accepts_any_contiguous_buffer() -> None:
    array = np.arange(1000, dtype=np.float32)
    expected = xxhash.xxh3_64_intdigest(array.tobytes())
    assert _native.xxh3_64(array) == expected
    assert _native.xxh3_64(memoryview(array.tobytes())) == expected
    assert _native.xxh3_64(bytearray(array.tobytes())) == expected


def test_xxh3_rejects_strided_buffer() -> None:
    with pytest.raises((ValueError, BufferError)):
        _native.xxh3_64(np.arange(100, dtype=np.uint8)[::2])


def test_file_hash_equals_bytes_hash(tmp_path) -> None:
    data = np.random.default_rng(0).integers(0, 256, (3 << 20) + 5, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert _native.xxh3_64_file(path) == xxhash.xxh3_64_intdigest(data)
    assert _native.xxh3_64_file(str(path)) == xxhash.xxh3_64_intdigest(data)


def test_missing_file_raises_k2_io_error_naming_the_file(tmp_path) -> None:
    missing = tmp_path / "does-not-exist.bin"
    with pytest.raises(k2.K2IOError, match="does-not-exist.bin") as info:
        _native.xxh3_64_file(missing)
    # The hierarchy lets callers catch it as k2's error or as an OSError.
    assert isinstance(info.value, k2.K2Error)
    assert isinstance(info.value, OSError)


def test_hashing_releases_the_gil() -> None:
    """Another Python thread makes progress while the native hash runs."""
    data = np.ones(256 << 20, dtype=np.uint8)  # ~25-100 ms of hashing
    ticks = 0
    done = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0)

    thread = threading.Thread(target=count)
    thread.start()
    time.sleep(0.01)
    before = ticks
    for _ in range(4):
        _native.xxh3_64(data)
    during = ticks - before
    done.set()
    thread.join()
    assert during > 10, f"the counting thread advanced only {during} times during the hash"
