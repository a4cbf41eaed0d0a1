"""The shared-memory broadcast's life cycle: no segment is left behind by a publisher that was
never closed, and a worker facing a dead or missing publisher gets a prompt message naming it."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from k2.broadcast import WeightPublisher, WeightSubscriber, segment_path, shm
from k2.errors import BroadcastError


def unique_name() -> str:
    return f"test-life-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env=os.environ)


PUBLISH = """
import sys, torch
from k2.broadcast import WeightPublisher
publisher = WeightPublisher({"w": torch.arange(8.0)}, name=sys.argv[1], bucket_bytes=256)
publisher.publish()
assert publisher.path.exists()
print(publisher.path)
"""


@pytest.mark.parametrize("catch_up", [True, False], ids=["catch-up", "ring"])
def test_a_publisher_never_closed_removes_its_segment_when_the_interpreter_exits(catch_up: bool) -> None:
    name = unique_name()
    done = run_python(PUBLISH.replace("bucket_bytes=256", f"bucket_bytes=256, catch_up={catch_up}"), name)
    assert done.returncode == 0, done.stderr
    path = segment_path(name)
    assert done.stdout.strip() == str(path)
    leftover = path.exists()
    path.unlink(missing_ok=True)
    assert not leftover, f"{path} was left behind"


def test_a_dropped_publisher_is_collected_and_removes_its_segment() -> None:
    name = unique_name()
    publisher = WeightPublisher({"w": torch.zeros(8)}, name=name, bucket_bytes=256)
    path = publisher.path
    assert path.exists()
    del publisher  # the catch-up thread must not keep it alive
    deadline = time.monotonic() + 5.0
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    leftover = path.exists()
    path.unlink(missing_ok=True)
    assert not leftover, f"{path} outlived its publisher"


def test_a_worker_fails_at_once_naming_itself_on_a_segment_whose_publisher_was_killed() -> None:
    name = unique_name()
    path = segment_path(name)
    proc = subprocess.Popen([sys.executable, "-c", PUBLISH + "sys.stdout.flush()\nimport time; time.sleep(600)\n",
                             name], stdout=subprocess.PIPE, text=True, env=os.environ)
    try:
        assert proc.stdout.readline().strip() == str(path)
        proc.send_signal(signal.SIGKILL)  # no exit hook runs: the segment stays behind
        proc.wait(timeout=30)
        assert path.exists()
        started = time.monotonic()
        with pytest.raises(BroadcastError) as info:
            WeightSubscriber({"w": torch.zeros(8)}, worker="rollout-7", name=name, timeout=20.0)
        waited = time.monotonic() - started
        message = str(info.value)
        assert f"worker rollout-7: the publisher of {path} (process {proc.pid}) exited" in message, message
        assert waited < 5.0, f"waited {waited:.1f} s of a 20 s timeout on a dead publisher"
    finally:
        proc.kill()
        proc.wait()
        path.unlink(missing_ok=True)


def test_a_worker_with_no_publisher_times_out_naming_itself_and_the_segment() -> None:
    name = unique_name()
    with pytest.raises(BroadcastError) as info:
        WeightSubscriber({"w": torch.zeros(8)}, worker="rollout-8", name=name, timeout=0.2)
    message = str(info.value)
    assert message.startswith(f"worker rollout-8: no live publisher at {segment_path(name)} within 0.2 s"), message


def test_a_forked_child_exiting_leaves_its_parents_segment_open() -> None:
    name = unique_name()
    publisher = WeightPublisher({"w": torch.arange(8.0)}, name=name, bucket_bytes=256)
    path = publisher.path
    try:
        pid = os.fork()
        if pid == 0:  # the child: run the exit hook and free its copy of the publisher
            code = 1
            try:
                shm._close_open_publishers()
                del publisher  # the last reference: the native publisher is dropped here
                gc.collect()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert path.exists()
        # Still open and served: a worker can join (it would fail on a closed segment).
        with WeightSubscriber({"w": torch.zeros(8)}, worker="after-fork", name=name, timeout=10.0):
            assert [(w.worker, w.alive) for w in publisher.workers()] == [("after-fork", True)]
    finally:
        publisher.close()
        path.unlink(missing_ok=True)
