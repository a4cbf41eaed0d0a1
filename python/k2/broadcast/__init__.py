"""Weight broadcast: the "checkpoint engine" that feeds new weights to rollout workers (docs/broadcast.md).

After each training step the trainer publishes weight version ``v``; every rollout worker
receives it into its own model and applies it atomically. Tensors travel in fixed-size buckets
(``k2.broadcast.layout``) over one of two transports:

* same host — ``WeightPublisher`` / ``WeightSubscriber`` (``k2.broadcast.shm``): Rust-owned
  shared memory, double-buffered, zero-copy views, bounded waits, failed workers named and
  evicted, late or restarted workers caught up;
* across hosts — ``DistributedWeightPublisher`` / ``DistributedWeightSubscriber``
  (``k2.broadcast.distributed``): the same buckets over ``torch.distributed`` broadcast (gloo on
  CPU, NCCL on GPU) within a fixed process group.

See docs/broadcast.md for the protocol and its failure semantics.
"""

from __future__ import annotations

from k2.broadcast.distributed import DistributedWeightPublisher, DistributedWeightSubscriber
from k2.broadcast.shm import Bucket, WeightPublisher, WeightSubscriber, WorkersFailed, segment_path

__all__ = [
    "Bucket",
    "DistributedWeightPublisher",
    "DistributedWeightSubscriber",
    "WeightPublisher",
    "WeightSubscriber",
    "WorkersFailed",
    "segment_path",
]
