"""The CPU buffer pool (``k2.model.speedups.reusable_empty``): a released buffer is handed out
again, a held one never, and the pool keeps a bounded number of shapes per role, so batches
whose width changes every step do not pile up buffers."""

from __future__ import annotations

import pytest
import torch

from k2.model import speedups

pytestmark = pytest.mark.skipif(speedups._use_count is None, reason="this torch hides storage use counts")

CPU = torch.device("cpu")


def test_a_released_buffer_is_reused_and_a_held_one_is_not() -> None:
    a = speedups.reusable_empty("t-reuse", (3, 5), torch.float32, CPU)
    pointer = a.data_ptr()
    del a
    b = speedups.reusable_empty("t-reuse", (3, 5), torch.float32, CPU)
    assert b.data_ptr() == pointer  # released: handed out again
    c = speedups.reusable_empty("t-reuse", (3, 5), torch.float32, CPU)
    assert c.data_ptr() != b.data_ptr()  # b is held: a fresh buffer


def test_the_pool_keeps_a_bounded_number_of_shapes_per_role() -> None:
    for width in range(1, 40):  # a batch right-padded to a new width every step
        x = speedups.reusable_empty("t-widths", (2, width, 7), torch.float32, CPU)
        x.fill_(1.0)
        del x
    kept = [k for k in speedups._POOL.buffers if k[0] == "t-widths"]
    assert len(kept) == speedups._MAX_SHAPES_PER_ROLE
    assert [k[1][1] for k in kept] == list(range(40 - speedups._MAX_SHAPES_PER_ROLE, 40))  # the newest
    # another role's buffers are not evicted by this one's
    y = speedups.reusable_empty("t-keep", (4,), torch.float32, CPU)
    del y
    for width in range(50, 60):
        speedups.reusable_empty("t-widths", (width,), torch.float32, CPU)
    assert any(k[0] == "t-keep" for k in speedups._POOL.buffers)
    # a held buffer outlives its eviction from the pool, unchanged
    held = speedups.reusable_empty("t-held", (8,), torch.float32, CPU)
    held.fill_(3.0)
    for width in range(1, 10):
        speedups.reusable_empty("t-held", (width, 3), torch.float32, CPU)
    assert not any(k[0] == "t-held" and k[1] == (8,) for k in speedups._POOL.buffers)
    assert torch.equal(held, torch.full((8,), 3.0))
