"""How many refusals of one requester a log shows one by one.

A user (or a script) that keeps asking would otherwise write a log line, or
an access-log record, per request: one wrote 680 KB of the agent's log in
8 s, and one with no key slot 19 MB of a mount's access log in 3 s (a full
log disk stops a fail-closed mount for everyone).  Per key (the agent: a
uid; the mount: a uid and an event), the first :data:`FIRST` refusals of a
window of :data:`WINDOW` seconds are logged as they come; the rest are
counted, and when the window ends one line says how many more there were.
Pure bookkeeping: the caller logs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

FIRST = 5  # refusals per uid and window logged one by one
WINDOW = 60.0  # seconds


@dataclass
class _Window:
    start: float
    logged: int = 0
    held: int = 0  # refusals counted, not logged


K = TypeVar("K", bound=Hashable)


class RefusalLog(Generic[K]):
    def __init__(self, first: int = FIRST, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first = first
        self.window = window
        self.clock = clock
        self._windows: dict[K, _Window] = {}

    def admit(self, uid: K) -> tuple[bool, tuple[int, float] | None]:
        """Count one refusal of ``uid``: whether to log it, and the summary
        (refusals held back, over how many seconds) of its window that has
        just ended, to log first (None if nothing was held back)."""
        now = self.clock()
        w = self._windows.get(uid)
        summary = None
        if w is not None and now - w.start >= self.window:
            summary = (w.held, now - w.start) if w.held else None
            w = None
        if w is None:
            w = self._windows[uid] = _Window(now)
        if w.logged < self.first:
            w.logged += 1
            return True, summary
        w.held += 1
        return False, summary

    def ended(self, everything: bool = False) -> list[tuple[K, int, float]]:
        """(uid, refusals held back, seconds) of every window that is over
        (``everything``: of every window, as the agent stops); those are
        forgotten.  Called by a timer, so that a flood that stops is
        summarised too."""
        now = self.clock()
        out = []
        for uid, w in list(self._windows.items()):
            if everything or now - w.start >= self.window:
                del self._windows[uid]
                if w.held:
                    out.append((uid, w.held, min(now - w.start, self.window)))
        return out
