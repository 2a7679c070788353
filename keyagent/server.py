"""The agent daemon: one trio task per connection, the key store in the middle.

Every connection is authenticated by the kernel (SO_PEERCRED): a caller acts
for its own uid only, unless it is root or the configured service user, who
may act for any uid and may *watch* a volume (receive its master key and the
set of unlocked uids; this is what a mount in agent mode does).

A connection that misbehaves (garbage, an oversize frame, a request that
does not arrive in time) gets one error reply and is closed; nothing it does
reaches another connection.  Every request must arrive whole within
``request_timeout`` seconds.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import math
import os
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass
from typing import Any

import trio

from cryptfs import follow
from cryptfs.audit import Auditor
from cryptfs.config import CONFIG_NAME, VolumeConfig, load_config_at, user_authority
from cryptfs.errors import CryptfsError, NotAVolume
from cryptfs.keyagent import protocol as p
from cryptfs.keyagent.liveness import LoopClock, Silence
from cryptfs.keyagent.store import Session, Store, VolumeRef
from cryptfs.keys import VolumeKeys
from cryptfs.refusals import RefusalLog
from cryptfs.secret import Secret
from cryptfs.users import record_unlock, slot_for_uid, user_name_of

log = logging.getLogger("cryptfs.agent")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid
CONFIRM_WITHIN = 2.0  # seconds to wait for the mounts to apply an unlock or lock
CONFIG_CHECK_EVERY = follow.CHECK_EVERY  # seconds between checks of held volumes' configs
FS_TIMEOUT = 10.0  # seconds a backing file system has to answer the agent
FS_PER_UID = 4  # file-system calls one uid's requests may have running at a time


@dataclass
class AgentOptions:
    idle_timeout: float = 900.0  # seconds without use before a session locks; 0: never
    request_timeout: float = 10.0  # seconds for a whole request to arrive
    backoff_base: float = 1.0  # seconds after the first failed unlock, doubling
    backoff_max: float = 300.0
    max_connections: int = 4096
    max_per_uid: int = 64  # connections of one uid at a time (root and the service user: any)
    service_uid: int | None = None
    argon2_parallel: int = 2  # concurrent Argon2id runs (each takes its memory cost)


class Denied(Exception):
    pass


def _commitment(master: Secret) -> bytes:
    """A one-way commitment to a master key: tells the same key again, opens nothing."""
    return hashlib.sha256(b"cryptfs agent: a generation it verified\0" + master.reveal()).digest()


def _no_slot(uid: int, real: str, has_no: str = "has no") -> dict[str, Any]:
    return p.error(p.NO_SLOT, f"{user_name_of(uid)} (uid {uid}) {has_no} key slot in the "
                              f"volume at {real}")


def leaf(e: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups, e.g. from a nursery."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


class Conn:
    """One client connection: exact-size frame reads, serialised writes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sock = stream.socket
        self.pid, self.uid, self.gid = peer_credentials(self.sock)
        self._send_lock = trio.Lock()

    async def _exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = await self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise EOFError
            got += k
        return buf

    async def read_frame(self) -> tuple[int, bytearray]:
        n = p.frame_length(bytes(await self._exact(p.LEN_BYTES)))
        kind = (await self._exact(1))[0]
        return kind, await self._exact(n - 1)

    async def read_message(self) -> tuple[dict[str, Any], Secret | None]:
        """One request, and the secret frame that follows it if it announces one."""
        kind, body = await self.read_frame()
        msg = p.decode(kind, body)
        if msg.get("secret") is not True:
            return msg, None
        kind, body = await self.read_frame()
        try:
            if kind != p.FRAME_SECRET:
                raise p.ProtocolError(p.BAD_REQUEST, "expected a secret frame")
            if not 0 < len(body) <= p.MAX_SECRET:
                raise p.ProtocolError(p.TOO_LARGE, "secret is empty or too long")
            return msg, Secret(body)
        finally:
            body[:] = bytes(len(body))

    async def send(self, msg: dict[str, Any], secret: Secret | None = None) -> None:
        data = p.encode(msg)
        if secret is not None:
            data += p.frame(p.FRAME_SECRET, secret.reveal())
        async with self._send_lock:
            await self.stream.send_all(data)


_Event = tuple[dict[str, Any], "Secret | None"]


class _Watcher:
    """A mount watching one volume: its event queue and the last event it confirmed."""

    def __init__(self, send: trio.MemorySendChannel[_Event], acked: int) -> None:
        self.send = send
        self.acked = acked


class Agent:
    def __init__(self, opts: AgentOptions, audit: Auditor | None = None) -> None:
        self.opts = opts
        self.audit = audit  # the access log of unlocks and locks, if the agent keeps one
        self.store = Store(opts.idle_timeout, opts.backoff_base, opts.backoff_max)
        self.connections = 0
        self._per_uid: dict[int, int] = {}  # open connections by uid
        self._watchers: dict[str, set[_Watcher]] = {}
        self._seq = 0  # number of the last event sent to watchers
        self._acked = trio.Event()  # set (and replaced) whenever a watcher confirms or leaves
        self._config_stamps: dict[str, follow.Stamp | None] = {}  # volume key -> config stamp
        # volume key -> (generation, commitment) last verified, for a volume whose
        # config this agent refused as not descending from it (see _distrusted_unlock)
        self._distrusted: dict[str, tuple[int, bytes]] = {}
        self._unlocking: set[int] = set()
        self._argon2 = trio.CapacityLimiter(opts.argon2_parallel)
        self.early_signals: list[int] = []  # stops asked for before run() listened for them
        self._fs_limiters: dict[int, trio.CapacityLimiter] = {}
        self.clock = LoopClock()  # how long this loop was stalled (a watch's silence excludes it)
        self._refusals: RefusalLog[int] = RefusalLog()  # (log lines of refused unlocks: per uid)

    # -- running ---------------------------------------------------------------------
    async def run(self, listener: trio.socket.SocketType,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(listener, task_status)
        finally:
            for uid, held, seconds in self._refusals.ended(everything=True):
                self._refusal_summary(uid, held, seconds)  # (no count is lost at a stop)

    async def _run(self, listener: trio.socket.SocketType,
                   task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._on_signals, nursery.cancel_scope)
            nursery.start_soon(self._reaper)
            nursery.start_soon(self.clock.run)
            if self.audit is not None:
                nursery.start_soon(self.audit.sealer)
            nursery.start_soon(self._config_watch)
            listeners = [trio.SocketListener(listener)]
            await nursery.start(trio.serve_listeners, self.handle, listeners)
            log.info("agent ready (idle timeout %s, pid %d)",
                     f"{self.opts.idle_timeout:g} s" if self.opts.idle_timeout else "off",
                     os.getpid())
            task_status.started()

    async def _on_signals(self, scope: trio.CancelScope,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            task_status.started()
            if self.early_signals:  # (one that came before this loop listened)
                log.info("signal %d: stopping", self.early_signals[0])
                scope.cancel()
                return
            async for signum in signals:
                log.info("signal %d: locking every session and stopping", signum)
                self.lock_all("agent stopping")
                await trio.sleep(0.2)  # let the watchers' connections send "wipe"
                scope.cancel()
                return

    async def _reaper(self) -> None:
        tick = min(1.0, self.opts.idle_timeout / 4) if self.opts.idle_timeout else 1.0
        while True:
            await trio.sleep(tick)
            for s in self.store.expired():
                self.lock_session(s, "idle timeout")
            for uid, held, seconds in self._refusals.ended():
                self._refusal_summary(uid, held, seconds)

    def _refused(self, uid: int, level: int, msg: str, *args: Any) -> None:
        """Log an unlock of ``uid`` refused before a passphrase was tried: the
        first few of a minute one by one, the rest as one summary line
        (keyagent.refusals)."""
        show, summary = self._refusals.admit(uid)
        if summary is not None:
            self._refusal_summary(uid, *summary)
        if show:
            log.log(level, msg, *args)

    def _refusal_summary(self, uid: int, held: int, seconds: float) -> None:
        log.warning("unlock refused: uid %d (%s): %d more refused unlocks in the last %.0f s "
                    "(not logged one by one)", uid, user_name_of(uid), held, max(1.0, seconds))

    async def _config_watch(self) -> None:
        """Every CONFIG_CHECK_EVERY seconds, check the configs of held volumes
        (apart from the idle reaper: a stuck filesystem must not stop idle locks)."""
        while True:
            await trio.sleep(CONFIG_CHECK_EVERY)
            for vol in self.store.held_volumes():
                try:
                    await self._recheck(vol)
                except Exception:  # noqa: BLE001 - one volume never takes the agent down
                    log.exception("checking the config of %s failed", vol.path)
                    self._end_volume(vol.key, "its config could not be checked")

    async def _recheck(self, vol: VolumeRef) -> None:
        """End the sessions of ``vol`` that its config no longer allows.

        When the config file changed (a user removed, a passphrase changed,
        the file replaced), it is read and authenticated again with the held
        key: if it no longer authenticates, or the directory is no longer the
        one unlocked, every session of the volume ends; otherwise those of
        uids that lost their slot do.  A file system that does not answer
        within FS_TIMEOUT ends them all too.
        """
        known = self._config_stamps.get(vol.key)
        with trio.move_on_after(FS_TIMEOUT) as scope:
            try:
                result = await trio.to_thread.run_sync(self._read_config, vol, known,
                                                       abandon_on_cancel=True)
            except (CryptfsError, OSError) as e:
                why = str(e) if isinstance(e, CryptfsError) else (e.strerror or str(e))
                self._end_volume(vol.key, f"the volume can no longer be read: {why}")
                return
        if scope.cancelled_caught:
            self._end_volume(vol.key, f"its file system did not answer in {FS_TIMEOUT:g} s")
            return
        if result is None:
            return  # unchanged since the last check
        stamp, cfg = result
        self._config_stamps[vol.key] = stamp
        held = self.store.master(vol.key)  # (the thread ran: it may be gone)
        if held is None:
            return
        if cfg.volume_id.hex() != vol.volume_id:
            self._end_volume(vol.key, "the volume's config was replaced")
            return
        sessions = [s for s in self.store.of_uid(None) if s.volume.key == vol.key]
        held_keys = VolumeKeys(Secret(held[0].reveal()), held[1])
        try:  # (the same generation, authenticated; or a rotation, followed: cryptfs.follow)
            keys = follow.reopen(cfg, cfg.volume_id, held_keys, lambda: [
                (slot_for_uid(cfg, s.uid), s.private) for s in sessions if s.private is not None])
        except CryptfsError as e:
            log.error("volume %s at %s: its config cannot be used (%s): not followed",
                      vol.volume_id, vol.path, str(e).removesuffix(": not followed"))
            self._distrust(vol.key, held[1], held[0])
            self._end_volume(vol.key, "the volume's config was replaced")
            return
        finally:
            held_keys.close()
        try:
            if keys.key_id != held[1]:
                self._follow_rotation(vol, cfg, keys)
        finally:
            keys.close()
        for s in self.store.of_uid(None):
            if s.volume.key == vol.key and slot_for_uid(cfg, s.uid) is None:
                self.lock_session(s, "its key slot was removed")

    def _rotated_unlock(self, key: str, cfg: Any, master: Secret, private: Secret | None
                        ) -> dict[str, Any] | None:
        """An unlock that opened another generation than the one held for the
        volume: a rotation the config watch has not seen yet is followed now
        (sessions continue), anything else is refused as the watch would refuse
        it (a config put back, or forged by a removed user who kept the
        authority key), and the volume's sessions end.  None: go on."""
        held = self.store.master(key)
        if held is None or (held[1] == cfg.key_id
                            and hmac.compare_digest(held[0].reveal(), master.reveal())):
            return None
        held_keys = VolumeKeys(Secret(held[0].reveal()), held[1])
        try:
            ok = private is not None and follow.descends(cfg, held_keys, master,
                                                          user_authority(private.reveal()))
        finally:
            held_keys.close()
        if ok:
            self.store.rekey(key, Secret(master.reveal()), cfg.key_id)
            log.info("volume %s: its key was rotated to generation %d; sessions follow",
                     cfg.volume_id.hex(), cfg.key_id)
            copy = self.store.master(key)
            assert copy is not None
            self._notify(key, p.reply(event="keys", key_id=cfg.key_id, secret=True), copy[0])
            return None
        log.error("volume %s: an unlock opened a key generation that no holder of the current "
                  "one made (a config put back from earlier, or forged): not followed, the "
                  "unlock is refused", cfg.volume_id.hex())
        self._distrust(key, held[1], held[0])
        self._end_volume(key, "its config has a key generation that was not made by a holder "
                              "of the current one")
        return p.error(p.NOT_A_VOLUME, "the volume's config has a key generation that the "
                                       "running agent cannot verify: it was replaced or forged",
                       )

    def _distrust(self, key: str, key_id: int, master: Secret) -> None:
        """Remember the generation held for volume ``key`` when its config was
        refused (put back, or forged): its number and a one-way commitment to
        its master, not the master, which is wiped with the sessions."""
        self._distrusted[key] = (key_id, _commitment(master))

    def _distrusted_unlock(self, key: str, cfg: Any, master: Secret) -> dict[str, Any] | None:
        """An unlock of a volume whose config this agent refused: once every
        session ended, nothing held could check the config's chain, and a cold
        unlock would take the very config just refused.  Until the agent
        restarts, only the generation it last verified (the real config put
        back) is unlocked, which lifts the distrust.  None: go on."""
        want = self._distrusted.get(key)
        if want is None or self.store.master(key) is not None:
            return None
        if want[0] == cfg.key_id and hmac.compare_digest(want[1], _commitment(master)):
            del self._distrusted[key]
            log.info("volume %s: its config is again the generation (%d) this agent last "
                     "verified: unlocks are allowed again", cfg.volume_id.hex(), cfg.key_id)
            return None
        log.error("volume %s: an unlock opened key generation %d, but this agent refused the "
                  "volume's config earlier and last verified generation %d: the unlock is "
                  "refused (put the real config back; after a legitimate change made meanwhile, "
                  "restart the agent)", cfg.volume_id.hex(), cfg.key_id, want[0])
        return p.error(p.NOT_A_VOLUME, "the volume's config was refused by the running agent as "
                                       "put back or forged, and this is not the generation it "
                                       "last verified: ask an administrator")

    def _follow_rotation(self, vol: VolumeRef, cfg: Any, keys: VolumeKeys) -> None:
        """The volume's master key was rotated and followed (``keys``): hold the
        new one and send it to the mounts.  Sessions that cannot follow (a v1
        slot, or a slot that no longer holds the new key) end."""
        new = Secret(keys.master.reveal())
        self.store.rekey(vol.key, new, cfg.key_id)
        log.info("volume %s at %s: its key was rotated to generation %d; sessions follow",
                 vol.volume_id, vol.path, cfg.key_id)
        held = self.store.master(vol.key)
        assert held is not None
        self._notify(vol.key, p.reply(event="keys", key_id=cfg.key_id, secret=True), held[0])
        for s in self.store.of_uid(None):
            if s.volume.key != vol.key:
                continue
            slot = slot_for_uid(cfg, s.uid)
            follows = s.private is not None and slot is not None
            if follows:
                opened = cfg.slot_master(slot, s.private)
                follows = opened is not None
                if opened is not None:
                    opened.master.wipe()
            if not follows:
                self.lock_session(s, "the volume's key was rotated and this session's slot "
                                     "cannot follow: unlock again")

    def _read_config(self, vol: VolumeRef, known: follow.Stamp | None
                     ) -> tuple[follow.Stamp | None, Any] | None:
        """(stamp, config) of ``vol``'s config, or None if its stamp is ``known``."""
        dir_fd, directory, real = self._open_trusted(vol.path)
        try:
            if directory != vol.directory:
                raise CryptfsError("its backing directory was replaced")
            stamp = self._stamp_at(dir_fd, real)
            if not follow.changed(known, stamp):
                return None
            return stamp, load_config_at(dir_fd, real)
        finally:
            os.close(dir_fd)

    def _end_volume(self, vol_key: str, why: str) -> None:
        for s in self.store.of_uid(None):
            if s.volume.key == vol_key:
                self.lock_session(s, why)

    # -- events to watchers ------------------------------------------------------------
    def _notify(self, vol_key: str, event: dict[str, Any], master: Secret | None = None) -> int:
        """Queue an event for every watcher of the volume; returns its sequence number."""
        self._seq += 1
        event = {**event, "seq": self._seq}
        for w in list(self._watchers.get(vol_key, ())):
            copy = Secret(master.reveal()) if master is not None else None
            try:
                w.send.send_nowait((event, copy))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                # A watcher that does not keep up is dropped; it reconnects
                # and gets a fresh state.  Its mount denies access meanwhile.
                if copy is not None:
                    copy.wipe()
                w.send.close()
                self._watchers[vol_key].discard(w)
                self._acks_changed()
        return self._seq

    def _acks_changed(self) -> None:
        self._acked.set()
        self._acked = trio.Event()

    async def _confirmed(self, vol_key: str, seq: int) -> bool:
        """Wait until every watcher of the volume has applied event ``seq`` (or left).

        So when `cryptfs lock` returns, the mounts already refuse the user, and
        when `cryptfs unlock` returns, they already serve them.
        """
        with trio.move_on_after(CONFIRM_WITHIN):
            while any(w.acked < seq for w in self._watchers.get(vol_key, ())):
                await self._acked.wait()
            return True
        log.warning("a mount did not confirm event %d within %g s", seq, CONFIRM_WITHIN)
        return False

    def lock_session(self, s: Session, why: str, pid: int = 0) -> int:
        """End a session (``pid``: the process that asked, 0 if none did);
        returns the sequence number of the last event it caused."""
        _, wiped = self.store.close(s.uid, s.volume.key)
        log.info("lock: uid %d (%s), volume %s at %s (%s)", s.uid, user_name_of(s.uid),
                 s.volume.volume_id, s.volume.path, why)
        self._audit_lock(s, why, pid)
        seq = self._notify(s.volume.key, p.reply(event="locked", uid=s.uid, reason=why))
        if wiped:
            seq = self._notify(s.volume.key, p.reply(event="wipe"))
            self._config_stamps.pop(s.volume.key, None)
        return seq

    def _audit_lock(self, s: Session, why: str, pid: int = 0) -> None:
        if self.audit is not None:  # (locking never waits for the log)
            self.audit.write("lock", "allowed", s.uid, pid, volume=s.volume.volume_id,
                             path=s.volume.path, slot=s.slot_id, reason=why)

    def lock_all(self, why: str) -> None:
        for s in self.store.of_uid(None):
            self.lock_session(s, why)
        self.store.close_all()

    # -- connections -------------------------------------------------------------------
    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            conn = Conn(stream)
            mine = self._per_uid.get(conn.uid, 0)
            if self.connections >= self.opts.max_connections or (
                    not self._privileged(conn.uid) and mine >= self.opts.max_per_uid):
                with trio.move_on_after(1):
                    await stream.send_all(p.encode(p.error(p.BUSY, "too many connections")))
                return
            self.connections += 1
            self._per_uid[conn.uid] = mine + 1
            try:
                await self._serve(conn)
            finally:
                self.connections -= 1
                self._per_uid[conn.uid] -= 1
                if not self._per_uid[conn.uid]:
                    del self._per_uid[conn.uid]
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            pass
        except trio.TooSlowError:
            log.info("closed a connection that did not read its reply in time")
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                log.warning("connection failed: %s", e.strerror or e)
        except Exception:  # noqa: BLE001 - one connection never takes the daemon down
            log.exception("internal error while serving a connection")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def _serve(self, conn: Conn) -> None:
        while True:
            secret = None
            try:
                try:
                    with trio.fail_after(self.opts.request_timeout):
                        try:
                            msg, secret = await conn.read_message()
                        except EOFError:
                            return
                except trio.TooSlowError:
                    with trio.move_on_after(1):
                        await conn.send(p.error(p.TIMEOUT, "request not received in time"))
                    return
                try:
                    op = p.request_op(msg)
                    if op == "watch":
                        await self._watch(conn, msg)
                        return
                    answer = await self._dispatch(conn, op, msg, secret)
                except p.ProtocolError as e:
                    answer = p.error(e.code, str(e))
                except Denied as e:
                    answer = p.error(p.DENIED, str(e))
                except trio.TooSlowError:
                    answer = p.error(p.TIMEOUT, "the file system did not answer in time")
            except p.ProtocolError as e:
                with trio.move_on_after(1):
                    await conn.send(p.error(e.code, str(e)))
                return
            finally:
                if secret is not None:
                    secret.wipe()
            with trio.fail_after(self.opts.request_timeout):
                await conn.send(answer)

    def _privileged(self, uid: int) -> bool:
        return uid == 0 or (self.opts.service_uid is not None and uid == self.opts.service_uid)

    def _target_uid(self, conn: Conn, msg: dict[str, Any]) -> int:
        uid: int = p.field(msg, "uid", int, conn.uid)
        if uid != conn.uid and not self._privileged(conn.uid):
            raise Denied("only root or the service user may act for another user")
        return uid

    async def _dispatch(self, conn: Conn, op: str, msg: dict[str, Any],
                        secret: Secret | None) -> dict[str, Any]:
        if op == "ping":
            return p.reply(message="pong", version=p.VERSION)
        if op == "unlock":
            return await self._unlock(conn, msg, secret)
        if op == "lock":
            return await self._lock(conn, msg)
        if op == "status":
            return self._status(conn, msg)
        if op == "probe":
            return await self._probe(conn, msg)
        raise p.ProtocolError(p.BAD_REQUEST, f"{p.short(op)} is only valid on a watch connection")

    # -- volumes -------------------------------------------------------------------------
    @staticmethod
    def _path(msg: dict[str, Any]) -> str:
        path: str = p.field(msg, "backing", str, required=True)
        if not os.path.isabs(path) or "\0" in path or len(path) > 4096:
            raise p.ProtocolError(p.BAD_REQUEST, "backing must be an absolute path")
        try:
            path.encode()
        except UnicodeEncodeError:  # (a lone surrogate: a traceback per request, once)
            raise p.ProtocolError(p.BAD_REQUEST, "backing is not a UTF-8 path") from None
        return path

    @staticmethod
    def _identify(path: str) -> tuple[str, str]:
        """The identity ("dev:ino") and real path of a directory (no trust needed:
        it only names a volume, e.g. to lock its sessions)."""
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        return f"{st.st_dev}:{st.st_ino}", os.path.realpath(path)

    @staticmethod
    def _open_trusted(path: str) -> tuple[int, str, str]:
        """Open a backing directory the agent may read from and write to.

        The agent runs as root in directories a caller names, so it serves
        only a directory owned by root (or the agent's own uid) and writable
        by that owner alone: nobody else can plant a symlink, a FIFO or a
        forged config in it.  Everything afterwards goes through the
        descriptor, so swapping path components later changes nothing; and the
        path kept for it is where the opened directory is (the kernel's name of
        the descriptor), not a resolution made before the open that a caller
        could race with a symlink of its own.  Messages name the path as the
        caller gave it: resolving it (/proc/PID/cwd) with root's rights must
        not tell the caller where another user's process works.
        """
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid not in (0, os.geteuid()) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise CryptfsError(f"{path} is not owned by root, or others may write to it: "
                                   "the agent serves only volumes that root controls")
            real = os.readlink(f"/proc/self/fd/{fd}")
        except BaseException:
            os.close(fd)
            raise
        return fd, f"{st.st_dev}:{st.st_ino}", real

    async def _volume(self, uid: int, path: str) -> tuple[str, str]:
        return await self._fs(uid, self._identify, path)  # type: ignore[no-any-return]

    async def _fs(self, uid: int, fn: Any, *args: Any) -> Any:
        """File-system work for ``uid``'s request, in a thread: at most FS_PER_UID
        at a time per uid (so one user's requests for a path on a stuck file
        system cannot take every worker), and FS_TIMEOUT seconds to answer
        (then this request fails with "timeout"; the agent goes on)."""
        limiter = self._fs_limiters.get(uid)
        if limiter is None:
            limiter = self._fs_limiters[uid] = trio.CapacityLimiter(FS_PER_UID)
        with trio.fail_after(FS_TIMEOUT):
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True,
                                                 limiter=limiter)

    @staticmethod
    def _stamp_at(dir_fd: int, real: str) -> follow.Stamp:
        """What tells one version of the config file from another (cryptfs.follow)."""
        try:
            return follow.stamp_at(dir_fd)
        except FileNotFoundError:
            raise NotAVolume(f"{real} is not a cryptfs volume (no {CONFIG_NAME})") from None

    @staticmethod
    def _config_at(dir_fd: int, real: str) -> tuple[follow.Stamp | None, VolumeConfig]:
        """The config and the stamp it was read under (cryptfs.follow.read_at)."""
        return follow.read_at(dir_fd, real)

    # -- operations --------------------------------------------------------------------------
    async def _unlock(self, conn: Conn, msg: dict[str, Any], secret: Secret | None
                      ) -> dict[str, Any]:
        uid = self._target_uid(conn, msg)
        path = self._path(msg)
        if secret is None:
            raise p.ProtocolError(p.BAD_REQUEST, "unlock needs a passphrase (secret frame)")
        who = f"uid {uid} ({user_name_of(uid)}), pid {conn.pid}"
        wait = self.store.retry_after(uid)
        if wait > 0:
            self._refused(uid, logging.WARNING, "unlock refused: %s: backing off after %d failed "
                          "attempts (%.0f s left)", who, self.store.failure_count(uid), wait)
            return p.error(p.BACKOFF, f"too many failed unlocks: try again in "
                                      f"{math.ceil(wait)} s", retry_after=wait)
        if uid in self._unlocking:
            return p.error(p.BUSY, "an unlock for this user is already in progress")
        self._unlocking.add(uid)
        try:
            try:
                dir_fd, key, real = await self._fs(uid, self._open_trusted, path)
            except CryptfsError as e:
                return p.error(p.NOT_A_VOLUME, str(e))
            except OSError as e:
                return p.error(p.NOT_A_VOLUME, f"{path}: {e.strerror or e}")
            try:
                return await self._unlock_at(conn, uid, dir_fd, key, real, secret, path)
            finally:
                os.close(dir_fd)
        finally:
            self._unlocking.discard(uid)

    async def _unlock_at(self, conn: Conn, uid: int, dir_fd: int, directory: str, real: str,
                         secret: Secret, shown: str) -> dict[str, Any]:
        """``real``: where the volume is (kept, logged); ``shown``: the path the
        caller gave (in the answers: see _open_trusted)."""
        who = f"uid {uid} ({user_name_of(uid)}), pid {conn.pid}"
        try:
            stamp, cfg = await self._fs(uid, self._config_at, dir_fd, shown)
        except CryptfsError as e:
            return p.error(p.NOT_A_VOLUME, str(e))
        except OSError as e:
            return p.error(p.NOT_A_VOLUME, f"{shown}: {e.strerror or e}")
        key = f"{directory}:{cfg.volume_id.hex()}"
        slot = slot_for_uid(cfg, uid)
        if slot is None:
            return _no_slot(uid, shown)
        try:
            async with self._argon2:
                opened = await trio.to_thread.run_sync(cfg.try_slot, slot, secret)
        except CryptfsError as e:
            self._refused(uid, logging.ERROR, "unlock refused: %s: %s", who, e)
            return p.error(p.NOT_A_VOLUME, str(e))
        if opened is None:
            count, delay = self.store.failed(uid, key)
            # (every passphrase tried is logged and recorded: the backoff bounds them)
            log.warning("unlock failed: %s, volume %s at %s: wrong passphrase "
                        "(%d in a row; next attempt allowed in %.0f s)",
                        who, cfg.volume_id.hex(), real, count, delay)
            if self.audit is not None:
                self.audit.write("unlock", "denied", uid, conn.pid, volume=cfg.volume_id.hex(),
                                 path=real, slot=slot.id, reason="wrong passphrase",
                                 failures=count)
            return p.error(p.WRONG_PASSPHRASE, "wrong passphrase", retry_after=delay,
                           failures=count)
        master, private = opened.master, opened.private
        keys: VolumeKeys | None = None

        def wipe() -> None:
            master.wipe()
            if private is not None:
                private.wipe()

        try:
            keys = cfg.open_keys(master, user_authority(private.reveal()) if private else None)
            # Argon2id took a while: if the config changed meanwhile (this
            # user removed?), decide by the config as it is now.
            if await self._fs(uid, self._stamp_at, dir_fd, shown) != stamp:
                _, cfg = await self._fs(uid, self._config_at, dir_fd, shown)
                now = slot_for_uid(cfg, uid)
                if cfg.volume_id.hex() != key.rsplit(":", 1)[1] or now is None:
                    wipe()
                    return _no_slot(uid, shown, "no longer has a")
                if cfg.key_id != keys.key_id:  # rotated meanwhile: follow with the user's key
                    fresh = cfg.slot_master(now, private) if private is not None else None
                    if fresh is None:
                        wipe()
                        return p.error(p.NOT_A_VOLUME, "the volume's key was rotated during "
                                                       "the unlock: try again")
                    master.wipe()
                    master = fresh.master
                cfg.open_keys(master).close()
        except CryptfsError as e:
            wipe()
            self._refused(uid, logging.ERROR, "unlock refused: %s: %s", who, e)
            return p.error(p.NOT_A_VOLUME, str(e))
        except OSError as e:
            wipe()
            return p.error(p.NOT_A_VOLUME, f"{shown}: {e.strerror or e}")
        except trio.TooSlowError:
            wipe()
            raise
        finally:
            if keys is not None:
                keys.close()
        refused = (self._distrusted_unlock(key, cfg, master)
                   or self._rotated_unlock(key, cfg, master, private))
        if refused is not None:
            wipe()
            return refused
        if self.audit is not None and not self.audit.write(
                "unlock", "allowed", uid, conn.pid, volume=cfg.volume_id.hex(), path=real,
                slot=slot.id):
            wipe()  # no log, no plaintext: no session either
            return p.error(p.DENIED, "the access log cannot be written: unlock refused")
        self.store.succeeded(uid, key)
        vol = VolumeRef(key, real, cfg.volume_id.hex())
        copy = Secret(private.reveal()) if private is not None else None
        changed, evicted = self.store.open(uid, vol, slot.id, master, cfg.key_id, private)
        for other in evicted:
            log.info("lock: uid %d (%s), volume %s at %s (unlocked with a key that the "
                     "volume's config no longer has)", other.uid, user_name_of(other.uid),
                     vol.volume_id, real)
            self._audit_lock(other, "key changed")
            self._notify(key, p.reply(event="locked", uid=other.uid, reason="key changed"))
        held = self.store.master(key)
        if changed and held is not None:
            self._notify(key, p.reply(event="keys", key_id=held[1], secret=True), held[0])
        seq = self._notify(key, p.reply(event="unlocked", uid=uid, secret=copy is not None), copy)
        if copy is not None:
            copy.wipe()
        self._config_stamps.pop(key, None)  # the config watch checks every new session once
        log.info("unlock: %s, volume %s at %s, slot %d", who, vol.volume_id, real, slot.id)
        await self._confirmed(key, seq)
        try:
            await self._fs(uid, record_unlock, dir_fd, slot.id)
        except (OSError, trio.TooSlowError) as e:
            log.warning("cannot record the unlock time in %s: %s", real,
                        getattr(e, "strerror", None) or "no answer in time")
        return p.reply(message="unlocked", volume_id=vol.volume_id, backing=real,
                       slot=slot.id, idle_timeout=self.opts.idle_timeout)

    async def _probe(self, conn: Conn, msg: dict[str, Any]) -> dict[str, Any]:
        """Whether the caller has a key slot in a volume (no secret, no backoff):
        lets `cryptfs unlock` and the login script skip asking for nothing."""
        uid = self._target_uid(conn, msg)
        path = self._path(msg)

        def work() -> tuple[str, Any]:
            dir_fd, _, real = self._open_trusted(path)
            try:
                return real, load_config_at(dir_fd, path)  # (messages: as the caller named it)
            finally:
                os.close(dir_fd)

        try:
            real, cfg = await self._fs(uid, work)
        except CryptfsError as e:
            return p.error(p.NOT_A_VOLUME, str(e))
        except OSError as e:
            return p.error(p.NOT_A_VOLUME, f"{path}: {e.strerror or e}")
        slot = slot_for_uid(cfg, uid)
        if slot is None:
            return _no_slot(uid, path)
        return p.reply(backing=real, volume_id=cfg.volume_id.hex(), slot=slot.id)

    async def _lock(self, conn: Conn, msg: dict[str, Any]) -> dict[str, Any]:
        uid = self._target_uid(conn, msg)
        sessions = self.store.of_uid(uid)
        if "backing" in msg:
            path = self._path(msg)
            try:
                directory, _ = await self._volume(uid, path)
            except OSError as e:
                return p.error(p.NOT_A_VOLUME, f"{path}: {e.strerror or e}")
            sessions = [s for s in sessions if s.volume.directory == directory]
        last = {s.volume.key: self.lock_session(s, f"requested by pid {conn.pid}", conn.pid)
                for s in sessions}
        confirmed = [await self._confirmed(key, seq) for key, seq in last.items()]
        if not all(confirmed):
            return p.reply(message=f"locked {len(sessions)} session(s), but a mount did not "
                                   "confirm in time: it may still serve you for a moment",
                           locked=len(sessions), unconfirmed=True)
        return p.reply(message=f"locked {len(sessions)} session(s)", locked=len(sessions))

    def _status(self, conn: Conn, msg: dict[str, Any]) -> dict[str, Any]:
        if p.field(msg, "all", bool, False):
            if not self._privileged(conn.uid):
                raise Denied("only root or the service user may see every session")
            sessions = self.store.of_uid(None)
        else:
            sessions = self.store.of_uid(self._target_uid(conn, msg))
        out = []
        for s in sessions:
            left = self.store.idle_left(s)
            out.append({
                "uid": s.uid, "user": user_name_of(s.uid), "backing": s.volume.path,
                "volume_id": s.volume.volume_id, "slot": s.slot_id,
                "unlocked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.unlocked_at)),
                "idle_left": None if left is None else round(left, 1),
            })
        answer = p.reply(sessions=out, idle_timeout=self.opts.idle_timeout)
        while not p.fits(answer):  # one frame holds a few hundred sessions
            out = out[:len(out) // 2]
            answer = p.reply(sessions=out, idle_timeout=self.opts.idle_timeout,
                             truncated=len(sessions) - len(out))
        return answer

    # -- watching (mounts) ----------------------------------------------------------------------
    async def _watch(self, conn: Conn, msg: dict[str, Any]) -> None:
        if not self._privileged(conn.uid):
            await conn.send(p.error(p.DENIED, "only root or the service user may watch a volume"))
            return
        path = self._path(msg)
        volume_id = p.field(msg, "volume_id", str, required=True)
        try:
            directory, real = await self._volume(conn.uid, path)
        except OSError as e:
            await conn.send(p.error(p.NOT_A_VOLUME, f"{path}: {e.strerror or e}"))
            return
        key = f"{directory}:{volume_id}"
        send, receive = trio.open_memory_channel[_Event](256)
        watcher = _Watcher(send, self._seq)
        self._watchers.setdefault(key, set()).add(watcher)
        log.info("watch: pid %d watches %s", conn.pid, real)
        try:
            held = self.store.master(key)
            state = p.reply(event="state", uids=self.store.uids(key), keys=held is not None,
                            key_id=held[1] if held else None, secret=held is not None)
            copy = Secret(held[0].reveal()) if held else None
            try:
                await conn.send(state, copy)
            finally:
                if copy is not None:
                    copy.wipe()
            for s in self.store.of_uid(None):  # the users' own keys, for hybrid files
                if s.volume.key == key and s.private is not None:
                    copy = Secret(s.private.reveal())
                    try:
                        await conn.send(p.reply(event="user-key", uid=s.uid, secret=True), copy)
                    finally:
                        copy.wipe()
            silence = Silence(self.clock)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_out, conn, receive, nursery.cancel_scope)
                    # A mount pings every 2 s: one silent for request_timeout
                    # seconds of this loop's running time is dropped (it
                    # reconnects and gets a fresh state).
                    nursery.start_soon(silence.watch, self.opts.request_timeout)
                    await self._watch_in(conn, key, watcher, silence)
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                first = leaf(group)
                if isinstance(first, trio.TooSlowError):
                    log.info("watch: pid %d said nothing for %g s: dropped", conn.pid,
                             self.opts.request_timeout)
                    return
                raise first from None  # handled (or logged) by handle()
        finally:
            self._watchers.get(key, set()).discard(watcher)
            send.close()
            self._acks_changed()
            log.info("watch: pid %d stopped watching %s", conn.pid, real)

    async def _watch_out(self, conn: Conn,
                         receive: trio.MemoryReceiveChannel[_Event],
                         scope: trio.CancelScope) -> None:
        async for event, secret in receive:
            try:
                await conn.send(event, secret)
            finally:
                if secret is not None:
                    secret.wipe()
        scope.cancel()  # the channel was closed: this watcher fell behind

    async def _watch_in(self, conn: Conn, key: str, watcher: _Watcher, silence: Silence) -> None:
        while True:
            try:
                msg, secret = await conn.read_message()
            except EOFError:
                return
            except p.ProtocolError as e:
                with trio.move_on_after(1):
                    await conn.send(p.error(e.code, str(e)))
                return
            silence.heard()
            if secret is not None:
                secret.wipe()
            try:
                op = p.request_op(msg)
            except p.ProtocolError as e:
                await conn.send(p.error(e.code, str(e)))
                return
            if op == "ping":
                await conn.send(p.reply(event="pong"))
            elif op == "ack":
                seq = msg.get("seq")
                if isinstance(seq, int) and not isinstance(seq, bool) and seq > watcher.acked:
                    watcher.acked = seq
                    self._acks_changed()
            elif op == "activity":
                uids = msg.get("uids")
                if isinstance(uids, list):
                    self.store.touch(key, {u for u in uids if isinstance(u, int)})
            else:
                await conn.send(p.error(p.BAD_REQUEST, f"{p.short(op)} is not valid while watching"))
