"""Live weight updates for ``k2 serve --subscribe NAME`` (docs/serve.md, "Live weights").

:class:`WeightFollower` is the scheduler's ``between_steps`` hook: before every forward of the
rollout engine (and every ``idle_poll`` seconds while idle) it polls a
:class:`~k2.broadcast.WeightSubscriber`; a version that has begun is received and applied right
there, in the scheduler thread, where no forward is running, and the engine's
``weight_version`` is set to it. Running requests carry on with the new weights from their
next token (their KV cache keeps what the old weights computed), and every response lists
every version that produced its tokens.
"""

from __future__ import annotations

from typing import Any, Callable

from k2.errors import BroadcastError
from k2.rl.rollout import RolloutEngine


class WeightFollower:
    """Applies published weight versions to ``engine``'s model between decoding steps.

    Args:
        subscriber: a joined :class:`~k2.broadcast.WeightSubscriber` on the engine's model.
        engine: the serving engine; its ``weight_version`` becomes each applied version.
        log: where a broadcast failure is reported (the follower rejoins and carries on).
    """

    def __init__(self, subscriber: Any, engine: RolloutEngine, log: Callable[[str], None] = print) -> None:
        self.subscriber = subscriber
        self.engine = engine
        self.log = log
        self.applied = 0

    def __call__(self) -> None:
        try:
            version = self.subscriber.update(timeout=0.0)
        except BroadcastError as err:  # evicted or the publisher stalled: keep serving the old weights
            self.log(f"k2 serve: weight update failed ({err}); rejoining")
            try:
                self.subscriber.rejoin()
            except BroadcastError as again:
                self.log(f"k2 serve: rejoin failed ({again})")
            return
        if version is not None:
            self.engine.weight_version = int(version)
            self.applied += 1
