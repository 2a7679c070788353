"""Timing the other end of a connection, not one's own loop.

A deadline on a trio loop that was itself stalled (a long synchronous step,
CPU starvation) expires although the peer answered in time: its answer sat
in the socket while nothing read it.  :class:`LoopClock` measures how long
this loop could not run (a heartbeat task that notes how late it wakes),
and :class:`Silence` counts only the rest: the time the peer had to answer
while we were able to hear it.  Either side of the agent link ends it only
after ``limit`` seconds of such silence (docs/AGENT.md, "Liveness").
"""

from __future__ import annotations

import trio

TICK = 0.1  # seconds between heartbeats
SLACK = 0.05  # seconds late a heartbeat may be before the lateness counts as a stall


class LoopClock:
    """How many seconds this trio loop was stalled since it started (run :meth:`run`)."""

    def __init__(self) -> None:
        self._stalled = 0.0
        self._last: float | None = None  # when the heartbeat last ran (None: not running)

    async def run(self) -> None:
        while True:
            self._last = trio.current_time()
            await trio.sleep(TICK)
            self._stalled += self._late(trio.current_time())

    def _late(self, now: float) -> float:
        late = now - self._last - TICK if self._last is not None else 0.0
        return late if late > SLACK else 0.0

    def stalled(self) -> float:
        """Seconds stalled so far, a stall that just ended included (even if
        the heartbeat has not run since)."""
        return self._stalled + self._late(trio.current_time())


class Silence:
    """Time since the peer was last heard, less the time this loop was stalled."""

    def __init__(self, clock: LoopClock) -> None:
        self.clock = clock
        self.heard()

    def heard(self) -> None:
        self._since = trio.current_time()
        self._stalled_then = self.clock.stalled()

    def seconds(self) -> float:
        return (trio.current_time() - self._since) - (self.clock.stalled() - self._stalled_then)

    async def watch(self, limit: float) -> None:
        """Raise TooSlowError after ``limit`` seconds of silence (never returns)."""
        while True:
            left = limit - self.seconds()
            if left <= 0:
                raise trio.TooSlowError
            await trio.sleep(left)
