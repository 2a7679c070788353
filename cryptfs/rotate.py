"""Key rotation in three strengths, offline or inside a live mount, resumable.

``slots``      A new master key (the next key generation) for every user slot
               and the recovery key; the old master is kept, sealed under the
               new one ("retired"), because file headers still name it.  New
               files get the new generation.  O(users).
``wrap-key``   The same, then every symmetric file header is re-wrapped under
               the new generation (same file key, no content rewritten), every
               hybrid header loses the stanzas of recipients who are no longer
               users, and the retired masters are forgotten: an old master (an
               old config plus an old passphrase) then opens no file key.
``reencrypt``  The same, but every file gets a new file key and every block is
               rewritten: old file keys decrypt nothing any more.

A rotation that walks files is recorded in the config (``rotation``) when it
starts, and the retired masters stay until a walk finds nothing left to do,
so a run killed at any moment is finished by running the command again.  Each
header is rewritten with one pwrite of the same length (the header of a file
is never half old, half new after a kill).  A re-encrypted file is first
written completely into ``BACKING/cryptfs.rotate.journal`` (fsync, then an
atomic rename), then copied over the file in place (so its inode, links and
open descriptors stay), then the journal is removed; a journal found at the
next start (mount or rotate) is copied again.  docs/FORMAT.md has the layout.
"""

from __future__ import annotations

import errno
import hmac
import json
import os
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptfs import presence, sysio
from cryptfs.config import VolumeConfig, config_lock, load_config, save_config, user_authority
from cryptfs.content import ContentFile, read_stanzas
from cryptfs.errors import BackingIOError, NotAVolume, UsageError
from cryptfs.header import FileHeader
from cryptfs.keys import MASTER_KEY_LEN, VolumeKeys
from cryptfs.modes import BLOCK_SIZE as BLOCK
from cryptfs.modes import IntegrityError
from cryptfs.modes.errors import NotARecipient
from cryptfs.modes.rand import random_bytes
from cryptfs.modes.wrap import (
    STANZA_PADDING,
    STANZA_SYMMETRIC,
    STANZA_X25519,
    TAG_LEN,
    X25519_BODY_LEN,
    Keyring,
    RecipientWrapper,
    Stanza,
    is_hybrid,
    padding,
    recipient_tag,
)
from cryptfs.names import is_cryptfs_entry
from cryptfs.recovery import unlock_with_recovery_key
from cryptfs.secret import Secret
from cryptfs.volume import UnlockedVolume

KINDS = ("slots", "wrap-key", "reencrypt")
STRENGTH = {"slots": 0, "wrap-key": 1, "reencrypt": 2}
JOURNAL = "cryptfs.rotate.journal"
_JOURNAL_TMP = JOURNAL + ".tmp"
_MAGIC = b"CRYPTFSJ"
_TRAILER = struct.Struct(">Q8s")  # meta length (u64), magic
CHUNK = 1 << 20  # bytes re-encrypted at a time


# -- starting -----------------------------------------------------------------------------
def hold_volume(backing: str, exclusive: bool) -> int:
    """A descriptor of the volume's presence file (cryptfs.presence) with a lock
    on it: shared for a mount, exclusive for an offline rotation (so neither
    runs under the other, on this server or another).  Closing the
    descriptor (or exiting) releases it."""
    return presence.take(backing) if exclusive else presence.join(backing)


def refuse_v1_slots(cfg: VolumeConfig) -> None:
    old = [f"{s.id} ({s.extra.get('user') or s.label})" for s in cfg.slots if not s.v2]
    if old:
        raise UsageError(
            f"key slot(s) {', '.join(old)} wrap the master key under a passphrase directly "
            "(volumes made before cryptfs 0.4): a new master key cannot reach them",
            hint="have each of those users run `cryptfs passwd` (which upgrades the slot), "
                 "or remove them, then rotate")


def reencrypts(cfg: VolumeConfig, kind: str, new_generation: bool = False) -> bool:
    """Whether :func:`begin` on ``cfg`` would make a new key generation whose
    walk re-encrypts (asked for, or an unfinished re-encryption it continues).
    (Resuming an unfinished rotation changes nothing in the config.)"""
    running = cfg.rotation["kind"] if cfg.rotation else None
    if running is not None and STRENGTH[running] >= STRENGTH[kind] and not new_generation:
        return False
    return "reencrypt" in (kind, running)


def begin(vol: UnlockedVolume, kind: str, new_generation: bool = False,
          alone: bool | None = None) -> bool:
    """Start a rotation of ``kind``: a new key generation in the config.

    If a rotation at least as strong is unfinished, nothing changes (the
    walk resumes it), unless ``new_generation`` (a revocation: the removed
    user knows the current master, so there must be a new one).  Returns
    whether a new generation was made (and the config saved).  ``alone``
    False: the caller could not prove that no other mount has the volume
    (cryptfs.presence), so a rotation that re-encrypts is refused before
    anything changes (the config on disk decides, under its lock).
    """
    if kind not in KINDS:
        raise UsageError(f"unknown rotation {kind!r}")
    with config_lock(vol.backing):
        _rebase(vol)
        if alone is False and reencrypts(vol.config, kind, new_generation):
            raise UsageError("an unfinished re-encryption of the volume was found (begun by "
                             "another command meanwhile): nothing was changed",
                             hint="run the command again")
        return _begin(vol, kind, new_generation)


def _begin(vol: UnlockedVolume, kind: str, new_generation: bool) -> bool:
    cfg = vol.config
    running = cfg.rotation["kind"] if cfg.rotation else None
    if running is not None and STRENGTH[running] >= STRENGTH[kind] and not new_generation:
        return False
    if running is not None and STRENGTH[running] > STRENGTH[kind]:
        kind = running  # (a stronger walk was unfinished: the new generation continues it)
    refuse_v1_slots(cfg)
    with Secret(random_bytes(MASTER_KEY_LEN)) as master:
        new = cfg.set_generation(vol.keys, master, retire=True)
    if kind != "slots":
        cfg.rotation = {"kind": kind, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    old, vol.keys = vol.keys, new
    vol.save_config()
    old.close()
    return True


def _rebase(vol: UnlockedVolume) -> None:
    """With the config locked: if it changed since ``vol`` read it (another
    rotation began meanwhile, a walk ended, a user was added), go on from the
    config on disk, so no generation is made twice (two masters for one
    ``key_id``: the walks of one would leave files the other cannot open)
    and no change is lost.  A newer generation is opened with the key this
    command holds and taken only if it descends from the one it opened."""
    fresh = load_config(vol.backing)
    if fresh.mac == vol.config.mac:
        return
    if fresh.volume_id != vol.config.volume_id:
        raise NotAVolume(f"{vol.backing} holds another volume now")
    if not hmac.compare_digest(vol.config.compute_mac(vol.keys), vol.config.mac):
        # (a change not saved yet, e.g. the slot a revocation removes: never dropped)
        raise UsageError("the volume's config was changed by another command while this one "
                         "ran (a rotation, a user added?): nothing was changed",
                         hint="run the command again")
    if fresh.key_id == vol.keys.key_id:
        keys = fresh.open_keys(vol.keys.master)
    else:
        keys = _reopened(vol, fresh)
        if not fresh.follows(vol.keys, keys):
            keys.close()
            raise NotAVolume("the volume's config was replaced by one whose key generation "
                             "does not descend from the one this command opened (put back "
                             "from earlier, or forged): nothing rotated",
                             hint="restore cryptfs.conf from a backup")
    old, vol.config, vol.keys = vol.keys, fresh, keys
    old.close()


def _reopened(vol: UnlockedVolume, fresh: VolumeConfig) -> VolumeKeys:
    """The keys of ``fresh`` (a newer generation) through the user key or the
    recovery key ``vol`` was opened with."""
    private = vol.private_key
    slot = getattr(vol, "slot", None)
    if private is None:
        raise UsageError("the volume's key was rotated while this command ran: run it again")
    if slot is None:
        return unlock_with_recovery_key(fresh, fresh.volume_id, private)
    now = next((s for s in fresh.slots if s.id == slot.id), None)
    opened = fresh.slot_master(now, private) if now is not None else None
    if opened is None:
        raise UsageError("the volume's key was rotated while this command ran and your key "
                         "slot does not hold the new key", hint="unlock and run it again")
    vol.slot = now  # type: ignore[attr-defined]
    with opened.master:
        return fresh.open_keys(opened.master, user_authority(private.reveal()))


def finish_config(backing: str, keys: VolumeKeys) -> tuple[VolumeConfig, VolumeKeys] | None:
    """The walk is done: forget the retired masters and the rotation record in
    the config *as it is on disk now* (users or policy may have changed during
    the walk), if it still is the generation that was walked.  Returns the
    saved config and its keys, or None if another rotation began meanwhile
    (locked: a rotation beginning now waits and starts from what is saved)."""
    with config_lock(backing):
        fresh = load_config(backing)
        if fresh.key_id != keys.key_id:
            return None
        fresh.open_keys(keys.master).close()  # authentic, under the generation walked
        fresh.rotation = None
        new = fresh.drop_retired(keys)
        fresh.seal(new)
        save_config(backing, fresh)
    return fresh, new


def finish(vol: UnlockedVolume) -> bool:
    """Offline: :func:`finish_config`, and the volume object follows."""
    done = finish_config(vol.backing, vol.keys)
    if done is None:
        return False
    old = vol.keys
    vol.config, vol.keys = done
    old.close()
    return True


# -- one file ----------------------------------------------------------------------------------
def allowed_tags(cfg: VolumeConfig) -> dict[bytes, bytes]:
    """Recipient tag -> public key of everyone a hybrid file may still name."""
    pubs = list(cfg.publics().values())
    if cfg.recovery is not None:
        pubs.append(cfg.recovery.public)
    return {recipient_tag(p): p for p in pubs}


def is_stale(stanzas: tuple[Stanza, ...] | list[Stanza], keys: VolumeKeys, cfg: VolumeConfig) -> bool:
    """Whether a header still needs the rotation: a symmetric stanza of an
    older generation, or a hybrid stanza of someone no longer a user."""
    allowed = allowed_tags(cfg)
    for st in stanzas:
        if st.type == STANZA_SYMMETRIC and struct.unpack_from(">I", st.body)[0] != keys.key_id:
            return True
        if st.type == STANZA_X25519 and st.body[:TAG_LEN] not in allowed:
            return True
    return False


def rewrapped(hdr: FileHeader, keys: VolumeKeys, cfg: VolumeConfig) -> FileHeader:
    """The same file key under the current generation, removed users' hybrid
    stanzas replaced by padding of the same size (the header keeps its length)."""
    allowed = allowed_tags(cfg)
    ad = hdr.wrap_ad(hdr.mode, hdr.file_id)
    out: list[Stanza] = []
    for st in hdr.stanzas:
        if st.type == STANZA_SYMMETRIC:
            out.extend(keys.wrapper.wrap(hdr.file_key, ad))
        elif st.type == STANZA_X25519 and st.body[:TAG_LEN] not in allowed:
            out.append(padding(3 + len(st.body)))
        else:
            out.append(st)
    fresh = hdr.with_stanzas(out)
    assert fresh.length == hdr.length
    return fresh


def fresh_header(hdr: FileHeader, keys: VolumeKeys, cfg: VolumeConfig) -> FileHeader:
    """A new file key for the file (re-encryption), wrapped as the old one was:
    symmetric under the current generation, or to the same recipients who are
    still users (with the same room for later shares)."""
    if not hdr.hybrid:
        return FileHeader.new(hdr.mode, keys.wrapper)
    allowed = allowed_tags(cfg)
    publics = [allowed[st.body[:TAG_LEN]] for st in hdr.stanzas
               if st.type == STANZA_X25519 and st.body[:TAG_LEN] in allowed]
    room = sum(3 + len(st.body) for st in hdr.stanzas
               if st.type == STANZA_PADDING
               or (st.type == STANZA_X25519 and st.body[:TAG_LEN] not in allowed))
    if not publics:
        raise NotARecipient()  # nobody left to read it: leave it to the recovery key
    return FileHeader.new(hdr.mode, RecipientWrapper(publics, spare=room // (3 + X25519_BODY_LEN)))


# Local file systems (statfs magic numbers): ext2-4, XFS, Btrfs, tmpfs, F2FS,
# ZFS, bcachefs, overlayfs, JFS, ReiserFS.
LOCAL_FS = frozenset({0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0xF2F52010, 0x2FC12FC1,
                      0xCA451A4E, 0x794C7630, 0x3153464A, 0x52654973})
MTIME_NUDGE = 1000  # ns a rewritten file's mtime moves on other (shared) storage


def put_times_back(fd: int, atime_ns: int, mtime_ns: int) -> None:
    """A rotation changes no plaintext, so a rewritten file keeps its times
    (backups and make must not see every file as modified).  But on storage
    shared by servers (any file system not in LOCAL_FS: JuiceFS, NFS, CephFS,
    SMB), another server's client decides by the mtime whether what it
    cached of the file is still good (JuiceFS keeps serving the old blocks
    for as long as the mtime is the same): there the mtime moves
    ``MTIME_NUDGE`` ns forward (100 ns is the coarsest unit, SMB's)."""
    if sysio.fs_type(fd) not in LOCAL_FS:
        mtime_ns += MTIME_NUDGE
    os.utime(fd, ns=(atime_ns, mtime_ns))


def write_header(fd: int, hdr: FileHeader) -> None:
    """Rewrite a header in place; the file's times stay (:func:`put_times_back`)."""
    st = os.fstat(fd)
    data = hdr.encode()
    if os.pwrite(fd, data, 0) != len(data):
        raise OSError(errno.EIO, "short header write")
    put_times_back(fd, st.st_atime_ns, st.st_mtime_ns)


def reencrypt(fd: int, content: ContentFile, keys: VolumeKeys, cfg: VolumeConfig,
              backing: str, target: str) -> ContentFile:
    """Re-encrypt the file open as ``fd`` (``target``: its path relative to the
    backing directory) under a new file key, through the journal."""
    hdr = fresh_header(content.header, keys, cfg)
    st = os.fstat(fd)
    dfd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.path.lexists(os.path.join(backing, JOURNAL)):
            # The only full copy of a file whose rewrite was interrupted: never
            # written over.  (Mount and rotate replay it first, or refuse.)
            raise OSError(errno.EEXIST, f"an interrupted re-encryption is pending in {JOURNAL}")
        jfd = os.open(_JOURNAL_TMP, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=dfd)
        try:
            new = ContentFile.create(jfd, hdr.mode, keys.wrapper, header=hdr)
            for off, end in _data_ranges(fd, content):
                for o in range(off, end, CHUNK):
                    new.write(o, content.read(o, min(CHUNK, end - o)))
            if new.size < content.size:
                new.truncate(content.size)  # a hole up to the end, then the final block
            length = os.fstat(jfd).st_size
            meta = json.dumps({"path": target, "dev": st.st_dev, "ino": st.st_ino,
                               "length": length, "atime_ns": st.st_atime_ns,
                               "mtime_ns": st.st_mtime_ns}).encode()
            tail = meta + _TRAILER.pack(len(meta), _MAGIC)
            if os.pwrite(jfd, tail, length) != len(tail):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(jfd)
            os.rename(_JOURNAL_TMP, JOURNAL, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
            _apply(jfd, fd, length, (st.st_atime_ns, st.st_mtime_ns))
            os.unlink(JOURNAL, dir_fd=dfd)
            os.fsync(dfd)
        except BaseException:
            with _quiet():
                os.unlink(_JOURNAL_TMP, dir_fd=dfd)
            raise
        finally:
            os.close(jfd)
    finally:
        os.close(dfd)
    return ContentFile(fd, hdr, content.size)


def _data_ranges(fd: int, content: ContentFile) -> list[tuple[int, int]]:
    """Plaintext ranges (start, end) to re-encrypt: all of it, except, in a file
    flagged as sparse, whole blocks that are holes in the backing file (they
    stay holes in the new image, so a sparse file stays sparse)."""
    size = content.size
    if not content.header.sparse or size == 0:
        return [(0, size)]
    out: list[tuple[int, int]] = []
    n = -(-size // BLOCK)
    final = n - 1
    for i in range(n):
        c_off = content.h_len + i * content.c_block
        hole = i != final and _is_hole(fd, c_off, content.c_block)
        if not hole:
            start, end = i * BLOCK, min(size, (i + 1) * BLOCK)
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
    return out


def _is_hole(fd: int, off: int, length: int) -> bool:
    try:
        return os.lseek(fd, off, os.SEEK_DATA) >= off + length
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data after off at all
            return True
        return False


def _apply(jfd: int, fd: int, length: int, times: tuple[int, int] | None) -> None:
    """Copy the journal's file image over the target, in place: cut the target
    to nothing, copy the image's data ranges (its holes stay holes), set the
    length.  A kill in between leaves the journal, which is copied again."""
    os.ftruncate(fd, 0)
    off = 0
    while off < length:
        try:
            start = os.lseek(jfd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            break  # only a hole is left
        if start >= length:
            break
        end = min(length, os.lseek(jfd, start, os.SEEK_HOLE))
        pos = start
        while pos < end:
            try:
                n = os.copy_file_range(jfd, fd, min(CHUNK * 8, end - pos), pos, pos)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                n = 0
            if n <= 0:
                data = os.pread(jfd, min(CHUNK, end - pos), pos)
                if not data:
                    raise OSError(errno.EIO, "journal shorter than it says")
                n = os.pwrite(fd, data, pos)
            pos += n
        off = end
    os.ftruncate(fd, length)
    if times is not None:
        put_times_back(fd, *times)  # (the file's plaintext did not change)
    os.fsync(fd)


class _quiet:
    def __enter__(self) -> None:
        pass

    def __exit__(self, typ: object, exc: object, tb: object) -> bool:
        return isinstance(exc, OSError)


def replay_journal(backing: str) -> str | None:
    """Finish a re-encryption that a kill interrupted; returns what it did.

    A journal that is there was written completely (it is renamed into place
    only after fsync): its file image is copied over its target again.  A
    leftover temporary journal is an interrupted one: the target was not
    touched, so it is removed."""
    dfd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with _quiet():
            os.unlink(_JOURNAL_TMP, dir_fd=dfd)
        try:
            jfd = os.open(JOURNAL, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(jfd).st_size
            trailer = os.pread(jfd, _TRAILER.size, size - _TRAILER.size) if size >= _TRAILER.size else b""
            if len(trailer) != _TRAILER.size or _TRAILER.unpack(trailer)[1] != _MAGIC:
                raise NotAVolume(f"{backing}/{JOURNAL} is damaged", hint="fsck the volume")
            mlen = _TRAILER.unpack(trailer)[0]
            meta = json.loads(os.pread(jfd, mlen, size - _TRAILER.size - mlen))
            length, target = int(meta["length"]), str(meta["path"])
            if length + mlen + _TRAILER.size != size or target.startswith("/") or ".." in target.split("/"):
                raise NotAVolume(f"{backing}/{JOURNAL} is damaged")
            fd = os.open(target, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (meta["dev"], meta["ino"]):
                    raise NotAVolume(f"the re-encryption journal's file {target} was replaced",
                                     hint=f"the journal is kept: {backing}/{JOURNAL}")
                times = (meta["atime_ns"], meta["mtime_ns"]) if "mtime_ns" in meta else None
                _apply(jfd, fd, length, times)
            finally:
                os.close(fd)
        except (ValueError, KeyError, TypeError):
            raise NotAVolume(f"{backing}/{JOURNAL} is damaged") from None
        except OSError as e:
            raise BackingIOError(f"cannot finish the interrupted re-encryption: {e.strerror}") \
                from None
        finally:
            os.close(jfd)
        os.unlink(JOURNAL, dir_fd=dfd)
        os.fsync(dfd)
        return f"finished the interrupted re-encryption of one file ({target})"
    finally:
        os.close(dfd)


# -- walking -----------------------------------------------------------------------------------
@dataclass
class Progress:
    kind: str
    total: int = 0  # files
    done: int = 0  # files looked at
    changed: int = 0  # files rewritten
    bytes: int = 0  # plaintext bytes re-encrypted (or header bytes re-wrapped)
    skipped: list[str] = field(default_factory=list)  # backing paths this key cannot open
    damaged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # could not be read or written (OSError)
    started: float = field(default_factory=time.monotonic)
    state: str = "running"  # running | finished | incomplete | failed
    message: str = ""
    forgotten: bool = False  # the retired generations were forgotten at the end

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "total": self.total, "done": self.done,
                "changed": self.changed, "bytes": self.bytes, "skipped": len(self.skipped),
                "damaged": len(self.damaged), "failed": len(self.failed),
                "elapsed": time.monotonic() - self.started,
                "state": self.state, "message": self.message, "forgotten": self.forgotten,
                "examples": (self.failed + self.skipped + self.damaged)[:5]}


def _raise(e: OSError) -> None:
    raise e


def regular_files(tree: str) -> Iterator[tuple[int, str, str]]:
    """(directory fd, backing name, path relative to the tree) of every file
    entry.  A directory that cannot be listed stops the walk (OSError): a
    rotation must never forget keys that files it did not see still need."""
    for top, _dirs, files, dfd in os.fwalk(tree, onerror=_raise):
        rel = os.path.relpath(top, tree)
        for n in files:
            if not is_cryptfs_entry(n):
                continue
            try:
                st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield dfd, n, n if rel == "." else f"{rel}/{n}"


def rotate_one(fd: int, content: ContentFile | None, keyring: Keyring, keys: VolumeKeys,
               cfg: VolumeConfig, kind: str, backing: str, target: str
               ) -> tuple[ContentFile | None, int]:
    """Bring one file (open as ``fd``) up to the current generation.

    ``content`` is the file's engine if the caller has it loaded (a mount
    with the file open), else it is loaded with ``keyring``.  Returns the
    engine to use from now on (None if nothing changed) and the plaintext
    bytes processed.  Raises NotARecipient for a hybrid file this keyring
    cannot open, IntegrityError for a damaged one.
    """
    # Decided from the stanzas alone, so a file that needs nothing is not opened
    # (a hybrid file may not open with any key at hand).  A hybrid file names
    # no generation: a resumed re-encryption does it again.
    stanzas = content.header.stanzas if content is not None else read_stanzas(fd)
    if not (is_stale(stanzas, keys, cfg) or (kind == "reencrypt" and is_hybrid(stanzas))):
        return None, 0
    if content is None:
        content = ContentFile.load(fd, keyring)
    hdr = content.header
    if kind == "reencrypt":
        return reencrypt(fd, content, keys, cfg, backing, target), content.size
    fresh = rewrapped(hdr, keys, cfg)
    write_header(fd, fresh)
    content.header = fresh
    return content, hdr.length


def keep_readable(fd: int, content: ContentFile | None, keyring: Keyring, keys: VolumeKeys,
                  cfg: VolumeConfig) -> bool:
    """A file that failed re-encryption (a damaged block): if its header still
    opens, re-wrap it (and update ``content``, the caller's engine, if any),
    so it stays readable, but for that block, once the old generation is
    forgotten."""
    try:
        if content is None:
            content = ContentFile.load(fd, keyring)
        if is_stale(content.header.stanzas, keys, cfg):
            fresh = rewrapped(content.header, keys, cfg)
            write_header(fd, fresh)
            content.header = fresh
    except (IntegrityError, NotARecipient):
        return True  # the header itself does not open: no key makes it readable again
    except OSError:
        return False  # a header that still needs the old keys
    return True


def walk(vol: UnlockedVolume, kind: str, keyring: Keyring,
         on_progress: Callable[[Progress], None] | None = None) -> Progress:
    """The offline walk: every file of the tree, then finish if nothing is left."""
    prog = Progress(kind)
    tree = os.path.join(vol.backing, "tree")
    prog.total = sum(1 for _ in regular_files(tree))
    for dfd, n, rel in regular_files(tree):
        try:
            fd = os.open(n, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            continue
        except OSError as e:
            prog.failed.append(f"tree/{rel} ({e.strerror})")
            prog.done += 1
            continue
        try:
            step(fd, None, keyring, vol.keys, vol.config, prog, vol.backing, f"tree/{rel}")
        finally:
            os.close(fd)
        prog.done += 1
        if on_progress:
            on_progress(prog)
    conclude(vol, prog)
    return prog


def step(fd: int, content: ContentFile | None, keyring: Keyring, keys: VolumeKeys,
         cfg: VolumeConfig, prog: Progress, backing: str, target: str) -> ContentFile | None:
    """:func:`rotate_one`, with its outcome counted in ``prog``; returns the new
    engine if the file changed."""
    try:
        new, nbytes = rotate_one(fd, content, keyring, keys, cfg, prog.kind, backing, target)
    except NotARecipient:
        prog.skipped.append(target)
        return None
    except IntegrityError:
        prog.damaged.append(target)
        if not keep_readable(fd, content, keyring, keys, cfg):
            prog.failed.append(f"{target} (damaged, and its header could not be re-wrapped)")
        return None
    except OSError as e:
        prog.failed.append(f"{target} ({e.strerror or e})")
        return None
    if new is not None:
        prog.changed += 1
        prog.bytes += nbytes
    return new


def outcome(prog: Progress, finished: bool) -> None:
    """The walk is over; say how it went.

    The retired masters are forgotten (``finished``) unless a file could not
    be read or written: no symmetric header needs them any more (every
    readable one was re-wrapped; a header that fails authentication opens
    with no key).  What a walk cannot do is reported: hybrid files that no
    key at hand opens keep their old file key and their removed recipients,
    damaged files keep their damage, and files that failed keep the old
    generation, which is then kept too."""
    prog.forgotten = finished
    if finished and not (prog.skipped or prog.damaged):
        prog.state = "finished"
        return
    prog.state = "incomplete"
    parts = []
    if prog.failed:
        parts.append(f"{len(prog.failed)} file(s) could not be read or written, so the old key "
                     "generation is kept: fix that and run the same command again")
    elif not finished:
        parts.append("another rotation began meanwhile; run cryptfs rotate again")
    if prog.skipped:
        parts.append(f"{len(prog.skipped)} hybrid file(s) that no key at hand opens were left as "
                     "they were (the recovery key opens them)")
    if prog.damaged:
        parts.append(f"{len(prog.damaged)} damaged file(s) keep their damage (blocks that still "
                     "authenticate stay readable)")
    prog.message = "; ".join(parts)


def conclude(vol: UnlockedVolume, prog: Progress) -> None:
    finished = False
    if not prog.failed:
        os.sync()  # every rewritten header on disk before the old keys are forgotten
        finished = finish(vol)
    outcome(prog, finished)
