"""The agent's key store: sessions, held master keys, failed-unlock backoff.

Pure and synchronous (the clock comes in as a function), so it is tested
without a socket.  A *session* is one uid's unlock of one volume.  The master
key of a volume is held while at least one session of that volume is open,
and wiped when its last session ends.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptfs.secret import Secret


@dataclass(frozen=True)
class VolumeRef:
    """A backing directory as the agent knows it: identified by device and inode,
    so two paths (or a symlink) to one directory are one volume, and a
    different directory at a path is never mistaken for it."""

    key: str  # "dev:ino"
    path: str  # real path when first seen
    volume_id: str  # hex, from the config


@dataclass
class Session:
    uid: int
    volume: VolumeRef
    slot_id: int
    unlocked_at: float  # wall clock (for display)
    last_active: float  # monotonic


@dataclass
class _Failures:
    count: int = 0
    until: float = 0.0  # monotonic time before which no attempt is accepted


@dataclass
class _Held:
    master: Secret
    key_id: int
    sessions: set[int] = field(default_factory=set)  # uids


class Store:
    def __init__(self, idle_timeout: float, backoff_base: float, backoff_max: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_timeout = idle_timeout  # seconds; 0 = never
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.clock = clock
        self.sessions: dict[tuple[int, str], Session] = {}
        self._held: dict[str, _Held] = {}
        self._failures: dict[int, _Failures] = {}

    # -- backoff -------------------------------------------------------------------
    def retry_after(self, uid: int) -> float:
        """Seconds until ``uid`` may try again (0: now)."""
        f = self._failures.get(uid)
        return max(0.0, f.until - self.clock()) if f else 0.0

    def failed(self, uid: int) -> tuple[int, float]:
        """Count a failed unlock; returns (failures in a row, seconds until the next try).

        The delay doubles with each failure in a row: base, 2 base, 4 base ...
        up to the maximum.
        """
        f = self._failures.setdefault(uid, _Failures())
        f.count += 1
        delay = min(self.backoff_max, self.backoff_base * 2 ** min(f.count - 1, 62))
        f.until = self.clock() + delay
        return f.count, delay

    def failure_count(self, uid: int) -> int:
        f = self._failures.get(uid)
        return f.count if f else 0

    def succeeded(self, uid: int) -> None:
        self._failures.pop(uid, None)

    # -- sessions --------------------------------------------------------------------
    def open(self, uid: int, vol: VolumeRef, slot_id: int, master: Secret, key_id: int) -> bool:
        """Start (or refresh) a session; takes ownership of ``master``.

        Returns True if the volume's held key is new or changed (watchers must
        be sent it), False if the same key was already held.
        """
        now = self.clock()
        self.sessions[(uid, vol.key)] = Session(uid, vol, slot_id, time.time(), now)
        held = self._held.get(vol.key)
        changed = (held is None or held.key_id != key_id
                   or not hmac.compare_digest(held.master.reveal(), master.reveal()))
        if held is None or changed:
            if held is not None:
                held.master.wipe()
                sessions = held.sessions
            else:
                sessions = set()
            held = _Held(master, key_id, sessions)
            self._held[vol.key] = held
        else:
            master.wipe()
        held.sessions.add(uid)
        return changed

    def close(self, uid: int, vol_key: str) -> tuple[Session | None, bool]:
        """End a session; returns it and whether the volume's key was wiped."""
        s = self.sessions.pop((uid, vol_key), None)
        held = self._held.get(vol_key)
        if s is None or held is None:
            return s, False
        held.sessions.discard(uid)
        if not held.sessions:
            held.master.wipe()
            del self._held[vol_key]
            return s, True
        return s, False

    def touch(self, vol_key: str, uids: set[int]) -> None:
        now = self.clock()
        for uid in uids:
            s = self.sessions.get((uid, vol_key))
            if s is not None:
                s.last_active = now

    def idle_left(self, s: Session) -> float | None:
        if not self.idle_timeout:
            return None
        return max(0.0, s.last_active + self.idle_timeout - self.clock())

    def expired(self) -> list[Session]:
        if not self.idle_timeout:
            return []
        now = self.clock()
        return [s for s in self.sessions.values() if now - s.last_active >= self.idle_timeout]

    def uids(self, vol_key: str) -> list[int]:
        return sorted(uid for uid, key in self.sessions if key == vol_key)

    def master(self, vol_key: str) -> tuple[Secret, int] | None:
        held = self._held.get(vol_key)
        return (held.master, held.key_id) if held else None

    def of_uid(self, uid: int | None) -> list[Session]:
        return sorted((s for s in self.sessions.values() if uid is None or s.uid == uid),
                      key=lambda s: (s.uid, s.volume.path))

    def close_all(self) -> list[Session]:
        closed = list(self.sessions.values())
        self.sessions.clear()
        for held in self._held.values():
            held.master.wipe()
        self._held.clear()
        return closed
