"""The weight-broadcast pipeline: bit-identical delivery, slices, whole versions, failures.

Workers run as separate processes (spawn); the reference for every received tensor is the
trainer's tensor (or plain torch indexing of it for slices), compared bit for bit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import uuid

import pytest
import torch

import broadcast_workers as workers
from k2 import _native
from k2.broadcast import WeightPublisher, WeightSubscriber, WorkersFailed
from k2.broadcast.layout import row_ranges
from k2.errors import BroadcastError

SPAWN = mp.get_context("spawn")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(got: dict, want: dict[str, torch.Tensor], who: str) -> None:
    got = workers.restored(got)
    assert got.keys() == want.keys(), who
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, (who, name)
        assert torch.equal(bits(got[name]), bits(want[name])), f"{who}: {name} differs"


def unique_name() -> str:
    return f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def wait_for_workers(publisher: WeightPublisher, count: int, procs, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(publisher.workers()) < count:
        assert all(p.exitcode in (None, 0) for p in procs), "a worker process failed to start"
        assert time.monotonic() < deadline, f"only {publisher.workers()} joined"
        time.sleep(0.02)


def set_weights(source: dict[str, torch.Tensor], version: int) -> None:
    for name, value in workers.weights(version).items():
        source[name].copy_(value)


def test_plan_packs_aligned_buckets_and_small_tensors_do_not_straddle() -> None:
    # 40 B at 0; 500 B at 256; 500 B would straddle bucket 0 -> 1024; 3000 B at 1536 onwards.
    plan = _native.BucketPlan([("a", "float32", [10], 4), ("b", "float32", [125], 4),
                               ("c", "float32", [125], 4), ("d", "float32", [750], 4)], 1024)
    assert plan.offsets() == [0, 256, 1024, 1536]
    assert plan.num_buckets == 5 and plan.arena_bytes == 4536
    assert plan.chunks(1) == [_native.Chunk(2, 0, 0, 500), _native.Chunk(3, 0, 512, 512)]
    with pytest.raises(BroadcastError, match="multiple of 256"):
        _native.BucketPlan([("a", "float32", [10], 4)], 1000)


def test_plan_values_cross_the_seam_as_typed_records_that_print_and_pickle() -> None:
    spec = _native.TensorSpec("w", "bfloat16", [4, 64], 2)
    plan = _native.BucketPlan([spec, ("b", "float32", [3], 4)], 256)
    assert plan.tensors() == [spec, _native.TensorSpec("b", "float32", [3], 4)]
    assert repr(spec) == "TensorSpec(name='w', dtype='bfloat16', shape=[4, 64], itemsize=2)"
    assert pickle.loads(pickle.dumps(spec)) == spec  # torch.distributed ships specs pickled
    # 512 bytes of w fill buckets 0 and 1; b starts bucket 2, which ends with the arena (512 + 12).
    assert repr(plan.chunks(1)[0]) == "Chunk(tensor=0, tensor_offset=256, bucket_offset=0, nbytes=256)"
    assert (plan.bucket_range(2).start, plan.bucket_range(2).end) == (512, 524)
    received = plan.receive_plan([(0, [(1, 2)]), (1, None)])
    # Row 1 of w (128 bytes) lands at 0; b lands whole at the next 256-aligned offset.
    assert received.landing_bytes == 256 + 12
    assert received.targets == [_native.Target(0, 0, 128), _native.Target(1, 256, 12)]
    assert received.pieces == [[_native.Piece(128, 0, 128)], [], [_native.Piece(0, 256, 12)]]


def test_row_selections_become_merged_ranges() -> None:
    assert row_ranges(slice(2, 5), 8, "w") == [(2, 5)]
    assert row_ranges(slice(None), 8, "w") == [(0, 8)]
    assert row_ranges([5, 1, 2, 3, 7], 8, "w") == [(5, 6), (1, 4), (7, 8)]
    with pytest.raises(BroadcastError, match="w: row 9"):
        row_ranges([9], 8, "w")


@pytest.mark.slow
@pytest.mark.parametrize("catch_up", [True, False], ids=["retained", "ring"])
def test_every_worker_gets_the_trainers_bits_and_slices_get_exactly_their_rows(catch_up: bool) -> None:
    name = unique_name()
    source = workers.weights(0)
    out = SPAWN.Queue()
    # (worker, slices, verify, swap, in_place asked, in_place expected): every way to apply
    setups = [
        ("swap", None, True, True, None, False),
        ("landed-copy", None, False, False, False, False),
        ("auto", None, True, False, None, catch_up),
        ("sliced", workers.SLICES, False, False, None, catch_up),
    ]
    with WeightPublisher(source, name=name, bucket_bytes=1024, timeout=30.0, checksums=True,
                         catch_up=catch_up) as pub:
        assert pub.plan.num_buckets > 5  # small buckets: tensors straddle, ring slots are reused
        procs = [SPAWN.Process(target=workers.receive_versions,
                               args=(name, worker, slices, 2, verify, out, swap, in_place))
                 for worker, slices, verify, swap, in_place, _ in setups]
        for p in procs:
            p.start()
        wait_for_workers(pub, len(procs), procs)
        for version in (1, 2):
            set_weights(source, version)
            assert pub.publish() == version
        results = [out.get(timeout=60) for _ in range(2 * len(procs))]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    expected_in_place = {worker: expected for worker, *_, expected in setups}
    for worker, version, model, in_place in results:
        assert in_place == expected_in_place[worker], worker
        want = workers.weights(version)
        if worker == "sliced":
            want = workers.sliced(want, workers.SLICES)
        assert_bit_identical(model, want, f"{worker} v{version}")
    assert sorted((w, v) for w, v, *_ in results) == sorted((w, v) for w, *_ in setups for v in (1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "landed-copy"])
def test_a_reader_only_ever_sees_whole_versions(in_place: bool) -> None:
    name = unique_name()
    source = workers.fingerprint_model(48)
    out = SPAWN.Queue()
    last = 25
    with WeightPublisher(source, name=name, bucket_bytes=4096, timeout=30.0) as pub:
        proc = SPAWN.Process(target=workers.read_while_updating,
                             args=(name, "reader", 48, last, out, in_place))
        proc.start()
        wait_for_workers(pub, 1, [proc])
        for version in range(1, last + 1):
            for t in source.values():
                t.fill_(float(version))
            pub.publish()
        reads, torn, seen = out.get(timeout=60)
        proc.join(30)
    assert torn == 0, f"{torn} of {reads} reads saw a mix of versions"
    assert reads > 10 and len(seen) >= 3, (reads, seen)
    assert set(seen) <= set(map(float, range(last + 1)))


@pytest.mark.slow
def test_a_killed_worker_is_named_the_others_complete_and_a_restart_catches_up() -> None:
    name = unique_name()
    timeout = 8.0
    source = workers.weights(0)
    out = SPAWN.Queue()
    holding = SPAWN.Event()
    with WeightPublisher(source, name=name, bucket_bytes=1024, timeout=timeout) as pub:
        healthy = SPAWN.Process(target=workers.receive_versions, args=(name, "healthy", None, 1, False, out))
        victim = SPAWN.Process(target=workers.stall_holding_a_bucket, args=(name, "victim", holding))
        healthy.start()
        victim.start()
        wait_for_workers(pub, 2, [healthy, victim])
        set_weights(source, 1)
        outcome: list = []
        publishing = threading.Thread(target=lambda: outcome.append(_capture(pub.publish)))
        publishing.start()
        assert holding.wait(60), "the victim never took a bucket"
        os.kill(victim.pid, signal.SIGKILL)  # not reaped until join(): a zombie counts as dead
        killed_at = time.monotonic()
        publishing.join(timeout + 10)
        reported_after = time.monotonic() - killed_at
        error = outcome[0]
        assert isinstance(error, WorkersFailed), error
        assert error.version == 1 and list(error.failures) == ["victim"]
        assert "exited" in error.failures["victim"] and "version 1" in error.failures["victim"]
        assert reported_after < timeout, f"reported {reported_after:.1f} s after the kill"
        worker, version, model, _ = out.get(timeout=60)
        assert (worker, version) == ("healthy", 1)
        assert_bit_identical(model, workers.weights(1), "healthy")
        victim.join()

        # Restarted under the same name, it is sent the current version without a new publish.
        restarted = SPAWN.Process(target=workers.receive_versions, args=(name, "victim", None, 1, True, out))
        restarted.start()
        worker, version, model, _ = out.get(timeout=60)
        restarted.join(30)
        healthy.join(30)
    assert (worker, version) == ("victim", 1)
    assert_bit_identical(model, workers.weights(1), "restarted victim")


def _capture(fn):
    try:
        return fn()
    except BaseException as err:  # noqa: BLE001 - handed back to the test thread
        return err


def test_a_mismatched_model_is_refused_listing_every_difference_before_joining() -> None:
    name = unique_name()
    with WeightPublisher(workers.weights(1), name=name, bucket_bytes=1024, timeout=5.0) as pub:
        model = workers.empty_model(None)
        del model["norm.weight"]  # missing
        model["extra.bias"] = torch.zeros(3)  # not published
        model["embed.weight"] = torch.zeros(37, 25)  # wrong shape
        model["layers.0.mlp.gate.e_score_correction_bias"] = torch.zeros(8, dtype=torch.float64)
        before = {k: v.clone() for k, v in model.items()}
        with pytest.raises(BroadcastError) as info:
            WeightSubscriber(model, worker="odd-one", name=name, timeout=5.0,
                             slices={"layers.0.mlp.experts.gate_proj": [1, 9]})
        message = str(info.value)
        for expected in ("worker odd-one", "norm.weight: published but not in the model",
                         "extra.bias: in the model but not published",
                         "embed.weight: shape (37, 25) in the model, (37, 24) published",
                         "e_score_correction_bias: dtype float64 in the model, float32 published",
                         "gate_proj: row 9 is outside its 8 rows"):
            assert expected in message, message
        assert pub.workers() == []  # it never joined
        assert all(torch.equal(model[k], before[k]) for k in model)


def test_in_place_is_refused_with_the_reason_when_it_cannot_work() -> None:
    name = unique_name()
    with WeightPublisher(workers.weights(1), name=name, bucket_bytes=1024, timeout=5.0, catch_up=False):
        with pytest.raises(BroadcastError, match="worker ringed: cannot apply versions in place: .*ring"):
            WeightSubscriber(workers.empty_model(None), worker="ringed", name=name, timeout=5.0, in_place=True)
        sub = WeightSubscriber(workers.empty_model(None), worker="landing", name=name, timeout=5.0)
        assert not sub.applies_in_place  # a ring cannot hold a whole version
        sub.close()
    name = unique_name()
    with WeightPublisher(workers.weights(1), name=name, bucket_bytes=1024, timeout=5.0):
        model = workers.empty_model(None)
        model["embed.weight"] = torch.zeros(24, 37).t()  # right shape, not contiguous
        with pytest.raises(BroadcastError, match="embed.weight is not contiguous"):
            WeightSubscriber(model, worker="strided", name=name, timeout=5.0, in_place=True)
        sub = WeightSubscriber(model, worker="strided", name=name, timeout=5.0)
        assert not sub.applies_in_place
        sub.close()


@pytest.mark.parametrize("by_bucket", [False, True], ids=["native-staging", "torch-staging"])
def test_strided_model_tensors_and_both_staging_paths_deliver_exact_bits(monkeypatch, by_bucket: bool) -> None:
    name = unique_name()
    source = workers.weights(3)
    with WeightPublisher(source, name=name, bucket_bytes=1024, timeout=10.0) as pub:
        if by_bucket:  # the path a GPU trainer takes, forced on the CPU
            monkeypatch.setattr(pub, "_stage", pub._stage_by_bucket)
        model = workers.empty_model(None)
        model["embed.weight"] = torch.zeros(24, 37).t()  # not contiguous: landed, then copied
        sub = WeightSubscriber(model, worker="strided", name=name, timeout=10.0)
        assert not sub.applies_in_place
        receiver = threading.Thread(target=sub.update, kwargs={"timeout": 10.0})
        receiver.start()
        assert pub.publish() == 1
        receiver.join(10)
        assert sub.version == 1
        assert_bit_identical(workers.portable(model), source, "strided")
        sub.close()


def test_a_slow_reader_in_the_publishers_process_is_not_evicted() -> None:
    # The publisher waits for this reader to free slots; its catch-up thread, polling meanwhile,
    # used to block on the busy publisher while holding the GIL, which the reader needs: the
    # reader stalled until the publisher evicted it (seen in CI under load).
    name = unique_name()
    with WeightPublisher(workers.weights(1), name=name, bucket_bytes=1024, timeout=5.0) as pub:
        sub = WeightSubscriber(workers.empty_model(None), worker="slow", name=name, timeout=5.0)
        errors: list[BaseException] = []

        def publish() -> None:
            try:
                pub.publish()
            except BaseException as err:  # noqa: BLE001 - reported by the assertion below
                errors.append(err)

        publishing = threading.Thread(target=publish)
        publishing.start()
        read = 0
        for bucket in sub.buckets(timeout=5.0):
            with bucket:
                time.sleep(0.05)  # slower than the publisher fills the ring of slots
            read += 1
        publishing.join()
        assert not errors and read == pub.plan.num_buckets > 2


def test_views_are_valid_only_until_their_bucket_is_released() -> None:
    name = unique_name()
    source = workers.weights(1)
    with WeightPublisher(source, name=name, bucket_bytes=1024, timeout=10.0) as pub:
        sub = WeightSubscriber(workers.empty_model(None), worker="viewer", name=name, timeout=10.0)
        publishing = threading.Thread(target=pub.publish)
        publishing.start()
        buckets = sub.buckets(timeout=10.0)
        bucket = next(buckets)
        first = bucket.names()[0]
        view = bucket.view(first)
        assert torch.equal(bits(view), bits(source[first])[: bits(view).numel()])
        with pytest.raises(BroadcastError, match="still alive"):
            bucket.release()
        del view
        bucket.release()
        with pytest.raises(BroadcastError, match="was released"):
            bucket.view()
        for rest in buckets:
            with rest:
                pass
        publishing.join(10)
        sub.mark_applied(1)
        assert pub.workers()[0].applied == 1
        sub.close()


@pytest.mark.slow
def test_the_gloo_path_gives_the_same_bits_to_three_processes_and_refuses_a_mismatch(tmp_path) -> None:
    out = SPAWN.Queue()
    store = str(tmp_path / "gloo-store")
    slices = {1: None, 2: workers.SLICES}
    procs = [SPAWN.Process(target=workers.distributed_member,
                           args=(rank, 3, store, 2, slices.get(rank), out)) for rank in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=90) for _ in range(9)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    refusals = {rank: message for kind, rank, message in results if kind == "mismatch"}
    assert sorted(refusals) == [0, 1, 2]
    for message in refusals.values():
        assert "worker rank-2" in message and "norm.weight: shape (25,) in the model, (24,) published" in message
    results = [r for r in results if r[0] != "mismatch"]
    received = sorted((w, v) for w, v, _ in results)
    assert received == [("publisher", 1), ("publisher", 2), ("rank-1", 1), ("rank-1", 2),
                        ("rank-2", 1), ("rank-2", 2)]
    for worker, version, model in results:
        if worker == "publisher":
            continue
        want = workers.weights(version)
        if worker == "rank-2":
            want = workers.sliced(want, workers.SLICES)
        assert_bit_identical(model, want, f"{worker} v{version}")


@pytest.mark.slow
def test_a_dead_gloo_member_is_reported_by_the_publisher_not_waited_on_forever(tmp_path) -> None:
    out = SPAWN.Queue()
    store = str(tmp_path / "gloo-store")
    procs = [SPAWN.Process(target=workers.distributed_member_that_loses_a_rank, args=(rank, 3, store, out))
             for rank in range(3)]
    for p in procs:
        p.start()
    outcomes = {rank: (kind, detail, seconds) for rank, kind, detail, seconds in
                (out.get(timeout=120) for _ in range(2))}
    for p in procs:
        p.join(60)
    kind, message, seconds = outcomes[0]
    assert kind == "error", message
    assert "publisher" in message and "version 1" in message and "broken" in message, message
    assert "rank-2" in message  # the group's roster is named
    assert seconds < 60, f"the publisher took {seconds:.0f} s to report the dead member"
