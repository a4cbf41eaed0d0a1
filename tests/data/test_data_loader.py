"""TokenLoader: sample content, shuffling, rank lockstep, exact resume, GIL-free prefetch.

The shards of `counting_shards` hold token id == stream position, so each sample names itself
and its expected content comes straight from numpy slicing of the stream."""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from k2.data import TokenLoader
from k2.errors import ConfigError, DataError

from conftest import write_shard

SEQ = 8  # the counting stream has 777 tokens: (777 - 1) // 8 = 97 samples


def sample_ids(batch, seq_len: int = SEQ) -> list[int]:
    return [int(row[0]) // seq_len for row in batch.inputs]


def reference_sample(stream: np.ndarray, doc_starts: np.ndarray, s: int, seq_len: int = SEQ):
    """(inputs, targets, positions) of sample s, computed directly from the stream."""
    t = np.arange(s * seq_len, (s + 1) * seq_len)
    doc_of_token = np.searchsorted(doc_starts, t, side="right") - 1
    return stream[t], stream[t + 1], t - doc_starts[doc_of_token]


def test_batches_hold_shifted_windows_with_document_positions(counting_shards) -> None:
    paths, stream, doc_starts = counting_shards
    loader = TokenLoader(paths, SEQ, 5, seed=1)
    assert loader.num_samples == 97 and len(loader) == 97 // 5
    for _ in range(len(loader)):
        batch = loader.next_batch()
        assert batch.inputs.shape == batch.targets.shape == batch.positions.shape == (5, SEQ)
        assert batch.inputs.dtype == batch.targets.dtype == batch.positions.dtype == np.int64
        for row, s in enumerate(sample_ids(batch)):
            x, y, p = reference_sample(stream, doc_starts, s)
            np.testing.assert_array_equal(batch.inputs[row], x)
            np.testing.assert_array_equal(batch.targets[row], y)
            np.testing.assert_array_equal(batch.positions[row], p)


def epoch_orders(paths, seed: int, epochs: int, batch_size: int = 5) -> list[list[int]]:
    loader = TokenLoader(paths, SEQ, batch_size, seed=seed)
    return [[s for batch in loader for s in sample_ids(batch)] for _ in range(epochs)]


def test_same_seed_same_order_other_seed_or_epoch_other_order(counting_shards) -> None:
    paths = counting_shards[0]
    first = epoch_orders(paths, seed=7, epochs=2)
    assert epoch_orders(paths, seed=7, epochs=2) == first
    assert epoch_orders(paths, seed=8, epochs=2) != first
    assert first[0] != first[1], "each epoch has its own order"
    assert first[0] != sorted(first[0]), "the order is shuffled"


def test_an_epoch_visits_each_sample_once_except_the_dropped_remainder(counting_shards) -> None:
    paths = counting_shards[0]
    for order in epoch_orders(paths, seed=3, epochs=3, batch_size=5):
        assert len(order) == len(set(order)) == (97 // 5) * 5
        assert set(order) <= set(range(97))
        assert 97 - len(set(order)) == 97 % 5


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_step_in_lockstep_and_form_the_global_batch(counting_shards, world_size) -> None:
    paths = counting_shards[0]
    batch = 4
    single = TokenLoader(paths, SEQ, batch * world_size, seed=11)
    ranks = [
        TokenLoader(paths, SEQ, batch, seed=11, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    assert {len(r) for r in ranks} == {len(single)} == {97 // (batch * world_size)}
    for _ in range(len(single) + 3):  # into the second epoch
        expected = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        ids = [sample_ids(p) for p in parts]
        flat = [s for part in ids for s in part]
        assert len(set(flat)) == len(flat), "ranks read disjoint samples"
        np.testing.assert_array_equal(np.concatenate([p.inputs for p in parts]), expected.inputs)
        np.testing.assert_array_equal(np.concatenate([p.targets for p in parts]), expected.targets)
        assert {(p.epoch, p.step) for p in parts} == {(expected.epoch, expected.step)}


def wait_until_read_ahead(loader: TokenLoader, depth: int) -> None:
    deadline = time.monotonic() + 10
    while loader.buffered < depth:
        assert time.monotonic() < deadline, "the prefetch threads never filled their queue"
        time.sleep(0.001)


def assert_same_batches(got, expected) -> None:
    for g, e in zip(got, expected, strict=True):
        for a, b in zip(g, e, strict=True):
            np.testing.assert_array_equal(a, b)


def test_restored_state_resumes_exactly_across_the_epoch_boundary(counting_shards) -> None:
    paths = counting_shards[0]
    original = TokenLoader(paths, SEQ, 5, seed=2, prefetch=4)
    for _ in range(len(original) - 2):
        original.next_batch()
    wait_until_read_ahead(original, 4)  # the threads are 4 batches past the saved position
    state = json.loads(json.dumps(original.state_dict()))
    assert (state["epoch"], state["step"]) == (0, len(original) - 2)
    expected = [original.next_batch() for _ in range(5)]
    assert [b.epoch for b in expected] == [0, 0, 1, 1, 1]

    restored = TokenLoader(paths, SEQ, 5, seed=2, prefetch=4)
    wait_until_read_ahead(restored, 4)
    restored.load_state_dict(state)
    assert (restored.epoch, restored.step) == (0, len(original) - 2)
    assert_same_batches([restored.next_batch() for _ in range(5)], expected)

    # Going back on the same loader discards what it had read ahead.
    original.load_state_dict(state)
    assert_same_batches([original.next_batch() for _ in range(5)], expected)


def test_a_state_from_other_data_or_settings_is_refused(counting_shards, tmp_path: Path) -> None:
    paths, _, _ = counting_shards
    state = TokenLoader(paths, SEQ, 5, seed=2).state_dict()
    with pytest.raises(DataError, match="seed is 2 in the state but 3 here"):
        TokenLoader(paths, SEQ, 5, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="global batch size"):
        TokenLoader(paths, SEQ, 4, seed=2).load_state_dict(state)
    other = tmp_path / "other.k2tok"
    write_shard(other, [np.arange(777) % 1000], vocab_size=100_000)
    with pytest.raises(DataError, match="fingerprint"):
        TokenLoader([other], SEQ, 5, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="version"):
        TokenLoader(paths, SEQ, 5, seed=2).load_state_dict({"epoch": 0})


def test_batches_are_fresh_arrays_that_torch_wraps_without_copying(counting_shards) -> None:
    paths, stream, doc_starts = counting_shards
    loader = TokenLoader(paths, SEQ, 5, seed=4)
    first, second = loader.next_batch(), loader.next_batch()
    tensor = torch.from_numpy(first.inputs)
    assert tensor.data_ptr() == first.inputs.ctypes.data
    arrays = [*first[:3], *second[:3]]
    for i, a in enumerate(arrays):
        assert a.flags.c_contiguous and a.flags.writeable
        assert not any(np.shares_memory(a, b) for b in arrays[i + 1 :])
    s = sample_ids(first)[0]
    del loader
    gc.collect()
    first.inputs[0, 0] += 0  # still valid memory after the loader is gone
    np.testing.assert_array_equal(tensor[0].numpy(), reference_sample(stream, doc_starts, s)[0])


def test_prefetch_threads_run_while_python_holds_the_gil(counting_shards) -> None:
    loader = TokenLoader(counting_shards[0], SEQ, 5, prefetch=3)
    deadline = time.monotonic() + 10
    while loader.buffered < 3:  # a pure-Python spin: this thread never lets go of the GIL
        assert time.monotonic() < deadline, "prefetch made no progress while Python held the GIL"


def test_other_python_threads_run_while_next_batch_waits(tmp_path: Path) -> None:
    # Batches of 8M tokens (three 64 MB int64 arrays) take tens of milliseconds to produce even
    # on a quiet machine.
    path = tmp_path / "big.k2tok"
    write_shard(path, [np.arange(1 << 24) % 60_000], vocab_size=60_000)
    loader = TokenLoader(path, 1 << 21, 4, prefetch=1, threads=1, verify=False)
    start = loader.state_dict()
    ticks: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())

    spinner = threading.Thread(target=spin)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.001)  # hand the GIL back and forth quickly
    spinner.start()
    windows = []
    try:
        for _ in range(6):
            loader.load_state_dict(start)  # drop the read-ahead batch: next_batch must wait
            t0 = time.perf_counter()
            loader.next_batch()
            windows.append((t0, time.perf_counter()))
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(interval)
    # Had next_batch kept the GIL, the spinner would stall for the whole production of a batch
    # (all of a window but a switch interval or two around entering and leaving the call);
    # without it, the spinner's ticks cover the window with only scheduling-sized gaps.
    long_waits = [(a, b) for a, b in windows if b - a > 0.015]
    assert len(long_waits) >= 3, f"batches came too fast to test: {windows}"
    stalls = []
    for a, b in long_waits:
        inside = [a, *(t for t in ticks if a < t < b), b]
        stalls.append(max(np.diff(inside)) / (b - a))
    assert float(np.median(stalls)) < 0.5, f"the spinner stalled for {stalls} of the waits"


def test_bad_arguments_are_config_errors(counting_shards) -> None:
    paths = counting_shards[0]
    with pytest.raises(ConfigError, match="rank 2"):
        TokenLoader(paths, SEQ, 5, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="seq_len"):
        TokenLoader(paths, 0, 5)
    with pytest.raises(DataError, match="fewer than one global batch"):
        TokenLoader(paths, SEQ, 50, world_size=2)


def test_held_batches_stay_intact_while_freed_ones_are_recycled(counting_shards) -> None:
    paths, stream, doc_starts = counting_shards
    loader = TokenLoader(paths, SEQ, 5, seed=6, prefetch=2)
    kept = []
    for i in range(3 * len(loader)):
        batch = loader.next_batch()
        if i % 2 == 0:
            kept.append(batch)  # the odd ones are freed at once and their buffers reused
    for batch in kept:
        for row, s in enumerate(sample_ids(batch)):
            x, y, p = reference_sample(stream, doc_starts, s)
            np.testing.assert_array_equal(batch.inputs[row], x)
            np.testing.assert_array_equal(batch.targets[row], y)
            np.testing.assert_array_equal(batch.positions[row], p)
