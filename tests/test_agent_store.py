"""The agent's key store, pure: backoff, sessions, held master keys, idle expiry.

A fake clock is injected, so every time-dependent rule is checked exactly and
without sleeping.
"""

from __future__ import annotations

import pytest

from cryptfs.keyagent.store import Store, VolumeRef
from cryptfs.secret import Secret

ALICE, BOB, CAROL = 1003, 1004, 1005
VOL_A = VolumeRef("64768:1001", "/srv/a", "aa" * 16)
VOL_B = VolumeRef("64768:2002", "/srv/b", "bb" * 16)
KEY_1 = bytes(range(32))
KEY_2 = bytes(range(32, 64))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def store(clock: Clock, idle: float = 0.0, base: float = 1.0, cap: float = 10.0) -> Store:
    return Store(idle_timeout=idle, backoff_base=base, backoff_max=cap, clock=clock)


class Watched:
    """A Secret plus a view of the buffer it holds now, to see that wiping overwrites it."""

    def __init__(self, value: bytes) -> None:
        self.secret = Secret(value)
        self.buf = self.secret._buf  # the very buffer the store will hold
        self.value = value

    @property
    def wiped(self) -> bool:
        return len(self.secret) == 0 and self.secret.reveal() == b"" and not any(self.buf)

    @property
    def intact(self) -> bool:
        return self.secret.reveal() == self.value and bytes(self.buf) == self.value


# -- backoff ---------------------------------------------------------------------------------

def test_backoff_doubles_from_base_and_caps(clock: Clock) -> None:
    s = store(clock, base=1.0, cap=10.0)
    assert s.retry_after(ALICE) == 0.0 and s.failure_count(ALICE) == 0
    delays = []
    for n in range(1, 8):
        count, delay = s.failed(ALICE)
        assert count == n == s.failure_count(ALICE)
        assert s.retry_after(ALICE) == delay
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_backoff_with_a_fractional_base(clock: Clock) -> None:
    s = store(clock, base=0.5, cap=2.0)
    assert [s.failed(BOB)[1] for _ in range(5)] == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_backoff_many_failures_do_not_overflow(clock: Clock) -> None:
    s = store(clock, base=1.0, cap=300.0)
    for _ in range(2000):
        count, delay = s.failed(ALICE)
    assert count == 2000 and delay == 300.0
    assert s.retry_after(ALICE) == 300.0


def test_backoff_wait_runs_down_with_the_clock(clock: Clock) -> None:
    s = store(clock, base=2.0, cap=60.0)
    s.failed(ALICE)
    s.failed(ALICE)  # 4 s from now
    assert s.retry_after(ALICE) == 4.0
    clock.advance(1.5)
    assert s.retry_after(ALICE) == pytest.approx(2.5)
    clock.advance(2.5)
    assert s.retry_after(ALICE) == 0.0
    clock.advance(100)
    assert s.retry_after(ALICE) == 0.0  # never negative
    # The count survives the wait: the next failure waits longer still.
    assert s.failure_count(ALICE) == 2
    assert s.failed(ALICE) == (3, 8.0)


def test_backoff_resets_on_success(clock: Clock) -> None:
    s = store(clock, base=1.0, cap=10.0)
    for _ in range(4):
        s.failed(ALICE)
    assert s.retry_after(ALICE) == 8.0
    s.succeeded(ALICE)
    assert s.failure_count(ALICE) == 0 and s.retry_after(ALICE) == 0.0
    assert s.failed(ALICE) == (1, 1.0)


def test_backoff_is_per_uid(clock: Clock) -> None:
    s = store(clock, base=1.0, cap=10.0)
    for _ in range(3):
        s.failed(ALICE)
    assert s.retry_after(BOB) == 0.0 and s.failure_count(BOB) == 0
    assert s.failed(BOB) == (1, 1.0)
    s.succeeded(BOB)
    assert s.failure_count(ALICE) == 3 and s.retry_after(ALICE) == 4.0
    s.succeeded(CAROL)  # no failures: harmless
    assert s.failure_count(ALICE) == 3


def test_backoff_zero_base_never_waits(clock: Clock) -> None:
    s = store(clock, base=0.0, cap=0.0)
    assert s.failed(ALICE) == (1, 0.0)
    assert s.failed(ALICE) == (2, 0.0)
    assert s.retry_after(ALICE) == 0.0


# -- sessions and held keys ------------------------------------------------------------------

def test_first_session_holds_the_master(clock: Clock) -> None:
    s = store(clock)
    m = Watched(KEY_1)
    assert s.open(ALICE, VOL_A, 1, m.secret, key_id=1)[0] is True  # new key: tell watchers
    held = s.master(VOL_A.key)
    assert held is not None and held[0] is m.secret and held[1] == 1
    assert m.intact
    assert s.uids(VOL_A.key) == [ALICE]
    assert s.master(VOL_B.key) is None
    [sess] = s.of_uid(ALICE)
    assert (sess.uid, sess.volume, sess.slot_id) == (ALICE, VOL_A, 1)
    assert sess.last_active == clock.now


def test_master_kept_while_any_session_is_open_and_wiped_with_the_last(clock: Clock) -> None:
    s = store(clock)
    m_alice, m_bob, m_carol = Watched(KEY_1), Watched(KEY_1), Watched(KEY_1)
    assert s.open(ALICE, VOL_A, 1, m_alice.secret, 1)[0] is True
    # Same key again: nothing new for watchers, and the duplicate copy is wiped at once.
    assert s.open(BOB, VOL_A, 2, m_bob.secret, 1)[0] is False
    assert m_bob.wiped
    assert s.open(CAROL, VOL_A, 3, m_carol.secret, 1)[0] is False
    assert m_carol.wiped
    assert s.uids(VOL_A.key) == [ALICE, BOB, CAROL]

    sess, wiped = s.close(BOB, VOL_A.key)
    assert sess is not None and sess.uid == BOB and wiped is False
    assert m_alice.intact and s.master(VOL_A.key) is not None
    sess, wiped = s.close(ALICE, VOL_A.key)
    assert sess is not None and wiped is False
    assert m_alice.intact  # carol still has a session: the key stays
    assert s.uids(VOL_A.key) == [CAROL]

    sess, wiped = s.close(CAROL, VOL_A.key)
    assert sess is not None and sess.uid == CAROL and wiped is True
    assert m_alice.wiped  # the held buffer itself was overwritten
    assert s.master(VOL_A.key) is None
    assert s.uids(VOL_A.key) == [] and s.of_uid(None) == []


def test_closing_what_is_not_open(clock: Clock) -> None:
    s = store(clock)
    assert s.close(ALICE, VOL_A.key) == (None, False)
    m = Watched(KEY_1)
    s.open(ALICE, VOL_A, 1, m.secret, 1)
    assert s.close(BOB, VOL_A.key) == (None, False)  # bob never unlocked
    assert s.close(ALICE, VOL_B.key) == (None, False)  # alice has no session there
    assert m.intact and s.uids(VOL_A.key) == [ALICE]
    assert s.close(ALICE, VOL_A.key)[1] is True
    assert s.close(ALICE, VOL_A.key) == (None, False)  # twice: nothing more to do


def test_volumes_are_held_apart(clock: Clock) -> None:
    s = store(clock)
    a, b = Watched(KEY_1), Watched(KEY_2)
    assert s.open(ALICE, VOL_A, 1, a.secret, 1)[0] is True
    assert s.open(ALICE, VOL_B, 4, b.secret, 1)[0] is True
    assert [x.volume for x in s.of_uid(ALICE)] == [VOL_A, VOL_B]
    assert s.close(ALICE, VOL_A.key)[1] is True
    assert a.wiped and b.intact
    held = s.master(VOL_B.key)
    assert held is not None and held[0].reveal() == KEY_2


def test_a_changed_key_is_reported_and_replaces_the_old(clock: Clock) -> None:
    s = store(clock)
    old, new = Watched(KEY_1), Watched(KEY_2)
    assert s.open(ALICE, VOL_A, 1, old.secret, 1)[0] is True
    # The volume's master changed (re-keyed on disk): bob's unlock brings the new key.
    changed, evicted = s.open(BOB, VOL_A, 2, new.secret, 1)
    assert changed is True
    assert old.wiped and new.intact
    held = s.master(VOL_A.key)
    assert held is not None and held[0] is new.secret
    # A session opened under the old key cannot stand beside the new one: it ends
    # (the caller tells the watchers); only bob is unlocked now.
    assert [e.uid for e in evicted] == [ALICE]
    assert s.uids(VOL_A.key) == [BOB]
    assert s.close(ALICE, VOL_A.key) == (None, False)
    assert new.intact
    assert s.close(BOB, VOL_A.key)[1] is True and new.wiped


def test_success_on_one_volume_does_not_reset_guesses_at_another(clock: Clock) -> None:
    s = store(clock, base=1.0, cap=100.0)
    for _ in range(3):
        s.failed(ALICE, VOL_A.key)
    assert s.failure_count(ALICE) == 3 and s.retry_after(ALICE) == 4.0
    s.succeeded(ALICE, VOL_B.key)  # she knows her passphrase of another volume
    assert s.failure_count(ALICE) == 3 and s.retry_after(ALICE) == 4.0
    clock.advance(4)
    assert s.failed(ALICE, VOL_A.key) == (4, 8.0)  # the count on A goes on
    s.succeeded(ALICE, VOL_A.key)
    assert s.failure_count(ALICE) == 0 and s.retry_after(ALICE) == 0.0


def test_a_changed_key_id_is_reported(clock: Clock) -> None:
    s = store(clock)
    first, second = Watched(KEY_1), Watched(KEY_1)
    assert s.open(ALICE, VOL_A, 1, first.secret, key_id=1)[0] is True
    assert s.open(ALICE, VOL_A, 1, second.secret, key_id=2)[0] is True
    held = s.master(VOL_A.key)
    assert held is not None and held[1] == 2 and held[0] is second.secret
    assert first.wiped and second.intact


def test_reopening_refreshes_the_session(clock: Clock) -> None:
    s = store(clock, idle=60)
    m1, m2 = Watched(KEY_1), Watched(KEY_1)
    s.open(ALICE, VOL_A, 1, m1.secret, 1)
    clock.advance(50)
    assert s.open(ALICE, VOL_A, 1, m2.secret, 1)[0] is False
    assert m2.wiped and m1.intact
    [sess] = s.of_uid(ALICE)
    assert sess.last_active == clock.now
    assert s.idle_left(sess) == 60
    # One session, so one close wipes.
    assert s.close(ALICE, VOL_A.key)[1] is True and m1.wiped


# -- idle expiry -------------------------------------------------------------------------------

def test_idle_expiry_and_touch(clock: Clock) -> None:
    s = store(clock, idle=10)
    s.open(ALICE, VOL_A, 1, Secret(KEY_1), 1)
    s.open(BOB, VOL_A, 2, Secret(KEY_1), 1)
    [a, b] = s.of_uid(None)
    assert s.idle_left(a) == 10
    clock.advance(9.5)
    assert s.expired() == []
    assert s.idle_left(a) == pytest.approx(0.5)
    s.touch(VOL_A.key, {ALICE})  # alice used the mount, bob did not
    clock.advance(0.5)
    assert [x.uid for x in s.expired()] == [BOB]  # exactly at the limit counts as expired
    assert s.idle_left(b) == 0.0
    assert s.idle_left(a) == pytest.approx(9.5)
    clock.advance(9.4)
    assert [x.uid for x in s.expired()] == [BOB]
    clock.advance(0.2)
    assert sorted(x.uid for x in s.expired()) == [ALICE, BOB]


def test_touch_ignores_other_volumes_and_unknown_uids(clock: Clock) -> None:
    s = store(clock, idle=10)
    s.open(ALICE, VOL_A, 1, Secret(KEY_1), 1)
    clock.advance(8)
    s.touch(VOL_B.key, {ALICE})  # activity on another volume
    s.touch(VOL_A.key, {BOB, CAROL})  # users without a session
    s.touch(VOL_A.key, set())
    clock.advance(2)
    assert [x.uid for x in s.expired()] == [ALICE]
    assert s.of_uid(BOB) == [] and s.of_uid(CAROL) == []


def test_expired_sessions_stay_until_closed(clock: Clock) -> None:
    """expired() only reports; the server locks them (and then the key is wiped)."""
    s = store(clock, idle=5)
    m = Watched(KEY_1)
    s.open(ALICE, VOL_A, 1, m.secret, 1)
    clock.advance(6)
    [sess] = s.expired()
    assert m.intact
    assert s.close(sess.uid, sess.volume.key) == (sess, True)
    assert m.wiped and s.expired() == []


def test_no_idle_timeout_means_never(clock: Clock) -> None:
    s = store(clock, idle=0)
    s.open(ALICE, VOL_A, 1, Secret(KEY_1), 1)
    clock.advance(10**9)
    assert s.expired() == []
    [sess] = s.of_uid(ALICE)
    assert s.idle_left(sess) is None


# -- listing and shutdown -----------------------------------------------------------------------

def test_of_uid_filters_and_sorts(clock: Clock) -> None:
    s = store(clock)
    s.open(CAROL, VOL_B, 3, Secret(KEY_2), 1)
    s.open(ALICE, VOL_B, 1, Secret(KEY_2), 1)
    s.open(CAROL, VOL_A, 3, Secret(KEY_1), 1)
    s.open(ALICE, VOL_A, 1, Secret(KEY_1), 1)
    assert [(x.uid, x.volume.path) for x in s.of_uid(None)] == [
        (ALICE, "/srv/a"), (ALICE, "/srv/b"), (CAROL, "/srv/a"), (CAROL, "/srv/b")]
    assert [(x.uid, x.volume.path) for x in s.of_uid(CAROL)] == [
        (CAROL, "/srv/a"), (CAROL, "/srv/b")]
    assert s.of_uid(BOB) == []


def test_close_all_wipes_every_key(clock: Clock) -> None:
    s = store(clock, idle=30)
    a, b = Watched(KEY_1), Watched(KEY_2)
    s.open(ALICE, VOL_A, 1, a.secret, 1)
    s.open(BOB, VOL_A, 2, Secret(KEY_1), 1)
    s.open(BOB, VOL_B, 5, b.secret, 1)
    closed = s.close_all()
    assert sorted((x.uid, x.volume.key) for x in closed) == [
        (ALICE, VOL_A.key), (BOB, VOL_A.key), (BOB, VOL_B.key)]
    assert a.wiped and b.wiped
    assert s.of_uid(None) == [] and s.master(VOL_A.key) is None and s.master(VOL_B.key) is None
    assert s.uids(VOL_A.key) == [] and s.expired() == []
    assert s.close_all() == []  # idempotent
    # The store is usable again afterwards.
    c = Watched(KEY_1)
    assert s.open(ALICE, VOL_A, 1, c.secret, 1)[0] is True and c.intact


def test_close_all_keeps_backoff(clock: Clock) -> None:
    """Locking everything is not a successful unlock: failure counts survive it."""
    s = store(clock, base=1, cap=10)
    s.failed(ALICE)
    s.failed(ALICE)
    s.close_all()
    assert s.failure_count(ALICE) == 2 and s.retry_after(ALICE) == 2.0


def test_secret_repr_never_shows_the_key() -> None:
    m = Secret(KEY_1)
    assert "redacted" in repr(m) and KEY_1.hex() not in repr(m) and str(KEY_1) not in str(m)
