"""Live weight updates for ``k2 serve --subscribe NAME`` (docs/serve.md, "Live weights").

:class:`WeightFollower` is the scheduler's ``between_steps`` hook. Before every forward of the
rollout engine, and every ``idle_poll`` seconds while nothing runs, it asks the
:class:`~k2.broadcast.WeightSubscriber` whether a version has begun (a poll that does not
wait). When one has, it is received and applied right there, in the scheduler thread, where no
forward runs, and the engine's ``weight_version`` becomes its number. Running requests go on
with the new weights from their next token (their cached keys and values keep what the old
weights computed); each token is tagged with the version that sampled it, so every response
lists every version that produced it. The scheduler thread is the model's only reader, so the
subscriber's lock is never contended.
"""

from __future__ import annotations

import logging
from typing import Any

from k2.errors import BroadcastError
from k2.rl.rollout import RolloutEngine

log = logging.getLogger("k2.serve")


class WeightFollower:
    """Applies published weight versions to ``engine``'s model between decoding steps.

    Args:
        subscriber: a joined :class:`~k2.broadcast.WeightSubscriber` on the engine's model.
        engine: the serving engine; its ``weight_version`` becomes each applied version.

    A broadcast failure (the publisher stalled or vanished, this worker was evicted) is logged;
    the model keeps the version it holds (a failed update never applies a partial version),
    the follower rejoins, and serving goes on.
    """

    def __init__(self, subscriber: Any, engine: RolloutEngine) -> None:
        self.subscriber = subscriber
        self.engine = engine
        self.applied: list[int] = []
        """Versions applied so far, in order."""
        self.failures = 0
        if subscriber.version:
            engine.weight_version = int(subscriber.version)

    def __call__(self) -> None:
        try:
            version = self.subscriber.update(timeout=0.0)
        except BroadcastError as err:
            self.failures += 1
            log.warning("k2 serve: weight update failed (%s); keeping version %d and rejoining",
                        err, self.engine.weight_version)
            try:
                self.subscriber.rejoin()
            except BroadcastError as again:
                log.warning("k2 serve: rejoining the broadcast failed (%s)", again)
            return
        if version is not None:
            self.engine.weight_version = int(version)
            self.applied.append(int(version))
