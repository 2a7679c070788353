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
from dataclasses import dataclass

from cryptfs.secret import Secret


@dataclass(frozen=True)
class VolumeRef:
    """A volume as the agent knows it: its backing directory's device and inode
    plus the volume id of its config.  Two paths (or a symlink) to one
    directory are one volume; another directory at a path, or another volume
    later made in the same directory (or at a reused inode), is never
    mistaken for it."""

    key: str  # "dev:ino:volume_id"
    path: str  # real path when first seen
    volume_id: str  # hex, from the config

    @property
    def directory(self) -> str:
        """The "dev:ino" part."""
        return self.key.rsplit(":", 1)[0]


@dataclass
class Session:
    uid: int
    volume: VolumeRef
    slot_id: int
    unlocked_at: float  # wall clock (for display)
    last_active: float  # monotonic
    private: Secret | None = None  # the user's X25519 key (v2 slots): hybrid files, rotation


@dataclass
class _Failures:
    count: int = 0
    until: float = 0.0  # monotonic time before which no attempt is accepted


@dataclass
class _Held:
    master: Secret
    key_id: int


class Store:
    def __init__(self, idle_timeout: float, backoff_base: float, backoff_max: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_timeout = idle_timeout  # seconds; 0 = never
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.clock = clock
        self.sessions: dict[tuple[int, str], Session] = {}
        self._held: dict[str, _Held] = {}
        self._failures: dict[tuple[int, str], _Failures] = {}  # (uid, volume key)

    # -- backoff -------------------------------------------------------------------
    def retry_after(self, uid: int) -> float:
        """Seconds until ``uid`` may try again, on any volume (0: now)."""
        now = self.clock()
        waits = [f.until - now for (u, _), f in self._failures.items() if u == uid]
        return max(0.0, *waits) if waits else 0.0

    def failed(self, uid: int, vol_key: str = "") -> tuple[int, float]:
        """Count a failed unlock; returns (failures in a row, seconds until the next try).

        The delay doubles with each failure in a row on that volume: base,
        2 base, 4 base ... up to the maximum; while it runs, the uid may try
        no volume at all.
        """
        f = self._failures.setdefault((uid, vol_key), _Failures())
        f.count += 1
        delay = min(self.backoff_max, self.backoff_base * 2 ** min(f.count - 1, 62))
        f.until = self.clock() + delay
        return f.count, delay

    def failure_count(self, uid: int) -> int:
        return max((f.count for (u, _), f in self._failures.items() if u == uid), default=0)

    def succeeded(self, uid: int, vol_key: str = "") -> None:
        """A success resets the count of that volume only (knowing the
        passphrase of one volume says nothing about guesses at another)."""
        self._failures.pop((uid, vol_key), None)

    # -- sessions --------------------------------------------------------------------
    def open(self, uid: int, vol: VolumeRef, slot_id: int, master: Secret, key_id: int,
             private: Secret | None = None) -> tuple[bool, list[Session]]:
        """Start (or refresh) a session; takes ownership of ``master`` and ``private``.

        Returns whether the volume's held key is new or changed (watchers must
        be sent it), and the other sessions that this ended: sessions opened
        with another key (the config was replaced since) cannot stand beside
        one with this key.
        """
        held = self._held.get(vol.key)
        changed = (held is None or held.key_id != key_id
                   or not hmac.compare_digest(held.master.reveal(), master.reveal()))
        evicted: list[Session] = []
        if held is not None and changed:
            evicted = [s for (u, key), s in self.sessions.items() if key == vol.key and u != uid]
            for s in evicted:
                del self.sessions[(s.uid, vol.key)]
                _wipe(s)
            held.master.wipe()
            held = None
        if held is None:
            held = _Held(master, key_id)
            self._held[vol.key] = held
        else:
            master.wipe()
        old = self.sessions.get((uid, vol.key))
        if old is not None:
            _wipe(old)
        self.sessions[(uid, vol.key)] = Session(uid, vol, slot_id, time.time(), self.clock(),
                                                private)
        return changed, evicted

    def rekey(self, vol_key: str, master: Secret, key_id: int) -> None:
        """The volume's key was rotated: hold the new one (takes ownership)."""
        held = self._held.get(vol_key)
        if held is None:
            master.wipe()
            return
        held.master.wipe()
        self._held[vol_key] = _Held(master, key_id)

    def close(self, uid: int, vol_key: str) -> tuple[Session | None, bool]:
        """End a session; returns it and whether the volume's key was wiped."""
        s = self.sessions.pop((uid, vol_key), None)
        if s is not None:
            _wipe(s)
        held = self._held.get(vol_key)
        if s is None or held is None or any(key == vol_key for _, key in self.sessions):
            return s, False
        held.master.wipe()
        del self._held[vol_key]
        return s, True

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

    def held_volumes(self) -> list[VolumeRef]:
        """One VolumeRef per volume whose key is held."""
        seen: dict[str, VolumeRef] = {}
        for s in self.sessions.values():
            seen.setdefault(s.volume.key, s.volume)
        return list(seen.values())

    def master(self, vol_key: str) -> tuple[Secret, int] | None:
        held = self._held.get(vol_key)
        return (held.master, held.key_id) if held else None

    def of_uid(self, uid: int | None) -> list[Session]:
        return sorted((s for s in self.sessions.values() if uid is None or s.uid == uid),
                      key=lambda s: (s.uid, s.volume.path))

    def close_all(self) -> list[Session]:
        closed = list(self.sessions.values())
        for s in closed:
            _wipe(s)
        self.sessions.clear()
        for held in self._held.values():
            held.master.wipe()
        self._held.clear()
        return closed


def _wipe(s: Session) -> None:
    if s.private is not None:
        s.private.wipe()
