"""The volume recovery key, and recovering plaintext with it alone.

``cryptfs init --recovery-key FILE`` makes an X25519 key pair.  The config
keeps the public half and the master key wrapped to it (cryptfs.modes.x25519,
label ``cryptfs/v1/recovery``, associated data ``"cryptfs/v1/recovery" ||
volume_id``).  The private half goes once into FILE, for the data owner to
keep offline::

    # cryptfs recovery key of volume 6f1c...; created 2026-11-29T05:00:00Z
    # Whoever holds this file can decrypt every file of the volume. Keep it offline.
    CRYPTFS-RECOVERY-KEY-2:6f1c...:<base64 of the 32-byte X25519 private key>:<base64 of
        the volume's authority key>   (one line; "-1" files of version 1 configs lack the last)

With it, the master key is recovered without any passphrase, the config is
authenticated, and :func:`extract` writes the plaintext tree (or parts of
it) to a directory: no mount, no user, every mode of the volume.
"""

from __future__ import annotations

import base64
import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptfs import sysio
from cryptfs.config import Recovery, VolumeConfig, load_config
from cryptfs.content import BlockError
from cryptfs.errors import BackingIOError, NotAVolume, UsageError, WrongPassphrase
from cryptfs.fsck import Checker, Problem
from cryptfs.keys import VolumeKeys
from cryptfs.modes import IntegrityError, NotForMe, x25519
from cryptfs.mounttable import mounts_of_backing, within
from cryptfs.policy import volume_path
from cryptfs.secret import Secret
from cryptfs.volume import RecoveredVolume, Volume

LABEL = b"cryptfs/v1/recovery"
PREFIX = "CRYPTFS-RECOVERY-KEY-1"  # volume id, private key (volumes made before 0.4)
PREFIX2 = "CRYPTFS-RECOVERY-KEY-2"  # volume id, private key, authority key
CHUNK = 1 << 20  # bytes copied at a time


def new_recovery(keys: VolumeKeys, volume_id: bytes) -> tuple[Recovery, Secret]:
    """A fresh recovery key pair: what the config keeps, and what the key file
    keeps: the private key || the volume's authority key."""
    r = x25519.new_private_key()
    recovery = Recovery.to(x25519.public_key(r), keys.master, volume_id, keys.authority)
    return recovery, Secret(r + keys.authority)


def key_file_text(key: Secret, volume_id: bytes) -> str:
    """The key file: a v2 line (private key and authority key) for a 64-byte
    ``key``, a v1 line (private key only) for a 32-byte one."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    k = key.reveal()
    parts = [base64.b64encode(k[:32]).decode()]
    if len(k) > 32:
        parts.append(base64.b64encode(k[32:]).decode())
    prefix = PREFIX2 if len(k) > 32 else PREFIX
    return (f"# cryptfs recovery key of volume {volume_id.hex()}; created {created}\n"
            "# Whoever holds this file can decrypt every file of the volume. Keep it offline.\n"
            f"{prefix}:{volume_id.hex()}:{':'.join(parts)}\n")


def create_key_file(path: str) -> int:
    """Create the (empty) recovery key file, mode 0600, before anything else
    happens: it must not exist, and a volume must never get a recovery key
    whose private half could not be written."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists: a recovery key is never written over a file") from None
    except OSError as e:
        raise UsageError(f"cannot create the recovery key file {path}: {e.strerror}") from None


def add_recovery(vol: Volume, key_fd: int) -> None:
    """Give the volume a recovery key: its private half into ``key_fd`` (written
    and fsync'ed first), then the public half and wrapped master into the config."""
    if vol.config.recovery is not None:
        raise UsageError("this volume already has a recovery key")
    recovery, private = new_recovery(vol.keys, vol.config.volume_id)
    with private:
        data = key_file_text(private, vol.config.volume_id).encode()
    try:
        if os.write(key_fd, data) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(key_fd)
    except OSError as e:
        raise BackingIOError(f"cannot write the recovery key file: {e.strerror}") from None

    def change(cfg: VolumeConfig) -> None:
        if cfg.recovery is not None:
            raise UsageError("this volume already has a recovery key")
        cfg.recovery = recovery

    vol.update_config(change)


def read_key_file(path: str) -> tuple[bytes, Secret]:
    """The volume id and key in a recovery key file: the private key, followed
    by the authority key in a v2 file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(64 * 1024)
    except OSError as e:
        raise UsageError(f"cannot read the recovery key file {path}: {e.strerror}") from None
    key_line = _key_line(raw)
    if key_line is not None:
        fields = key_line.split(":")
        if (fields[0], len(fields)) in ((PREFIX, 3), (PREFIX2, 4)) and _HEX32.fullmatch(fields[1]):
            try:
                key = b"".join(_b64_key(f) for f in fields[2:])
            except ValueError:
                key = b""
            if len(key) == x25519.KEY_LEN * (len(fields) - 2):
                return bytes.fromhex(fields[1]), Secret(key)
    raise UsageError(f"{path} is not a cryptfs recovery key file",
                     hint="it holds one line CRYPTFS-RECOVERY-KEY-2:<volume id>:<key>:<key> "
                          "besides blank and # comment lines (docs/FORMAT.md)")


_HEX32 = re.compile(r"[0-9a-f]{32}")


def _key_line(raw: bytes) -> str | None:
    """The one line of a key file that is neither blank nor a ``#`` comment (each
    line stripped of spaces, tabs and a CR); None unless the file is ASCII and
    has exactly one such line."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = [ln.strip(" \t\r") for ln in text.split("\n")]
    keys = [ln for ln in lines if ln and not ln.startswith("#")]
    return keys[0] if len(keys) == 1 else None


def _b64_key(text: str) -> bytes:
    """32 bytes in standard base64 with padding, in its one canonical spelling
    (44 characters; ValueError otherwise)."""
    raw = base64.b64decode(text, validate=True) if len(text) == 44 else b""
    if len(raw) != x25519.KEY_LEN or base64.b64encode(raw).decode() != text:
        raise ValueError("not a key")
    return raw


def unlock_with_recovery_key(cfg: VolumeConfig, volume_id: bytes, key: Secret) -> VolumeKeys:
    """The volume's keys from its recovery key; the config is authenticated with
    them (and with the authority key a v2 file holds).  The private key also
    opens hybrid files: every one has a stanza for it."""
    if cfg.recovery is None:
        raise NotAVolume("this volume has no recovery key (it was made without one)")
    if volume_id != cfg.volume_id:
        raise WrongPassphrase(f"this recovery key belongs to volume {volume_id.hex()}, not to "
                              f"{cfg.volume_id.hex()}")
    k = key.reveal()
    private, authority = k[:32], (k[32:] or None)
    if x25519.public_key(private) != cfg.recovery.public:
        raise WrongPassphrase("this is not the volume's recovery key")
    if cfg.recovery.auth and authority is None:
        raise NotAVolume("the volume's recovery key is bound to its authority key, which this "
                         "key file lacks: the config was edited (or the file is not this "
                         "volume's)")
    try:
        master = x25519.unwrap(cfg.recovery.wrapped, private, LABEL,
                               cfg.recovery.ad(cfg.volume_id, authority if cfg.recovery.auth else None))
    except (NotForMe, IntegrityError):
        raise NotAVolume("the recovery key does not open the wrapped master key: the volume "
                         "config was edited or damaged") from None
    with Secret(master) as m:
        return cfg.open_keys(m, authority)


def open_for_recovery(backing: str, key_file: str) -> RecoveredVolume:
    backing = os.path.abspath(backing)
    cfg = load_config(backing)
    volume_id, private = read_key_file(key_file)
    try:
        keys = unlock_with_recovery_key(cfg, volume_id, private)
    except BaseException:
        private.wipe()
        raise
    vol = RecoveredVolume(backing, cfg, keys, private)
    if not os.path.isdir(vol.tree):
        vol.close()
        raise NotAVolume(f"{backing}: the encrypted tree is missing")
    return vol


@dataclass
class Extracted:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # PATHs asked for that the volume lacks


class Extractor(Checker):
    """Walks the volume as fsck does, writing what decrypts under the directory
    ``out_fd`` (an open descriptor of --out, see :func:`open_out`).

    A file with a damaged header or block is reported and not written (no
    partial plaintext with holes where data should be); everything else is.
    Everything is written through directory descriptors, none of them
    followed through a symlink: whatever another user renames or plants
    meanwhile, the plaintext goes nowhere but into --out.
    """

    def __init__(self, vol: RecoveredVolume, out_fd: int, only: list[bytes],
                 on_problem: Callable[[Problem], None] | None = None,
                 on_file: Callable[[str], None] | None = None) -> None:
        super().__init__(vol, on_problem)
        self.only = _volume_paths(only)
        self.done = Extracted(problems=self.report.problems)
        self.on_file = on_file
        self._outs = {b"/": out_fd}  # plaintext directory -> its output directory, open

    def _wanted(self, p_path: bytes) -> tuple[bool, bool]:
        """(write this entry, descend into it)."""
        if not self.only:
            return True, True
        inside = any(p_path == o or p_path.startswith(o + b"/") for o in self.only)
        above = any(o.startswith(p_path.rstrip(b"/") + b"/") for o in self.only)
        return inside, inside or above

    def written(self, p_path: bytes) -> bool:
        """Whether ``p_path`` (``/a/b``) is there under --out."""
        try:
            os.stat(p_path.lstrip(b"/"), dir_fd=self._outs[b"/"], follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _entry(self, dfd: int, n: str, p_path: bytes, c_path: str) -> None:
        write, descend = self._wanted(p_path)
        if not descend:
            return
        st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
        parent_p, name = p_path.rsplit(b"/", 1)
        out = self._outs[parent_p or b"/"]
        shown = p_path.decode("utf-8", "backslashreplace")
        if stat.S_ISDIR(st.st_mode):
            try:
                os.mkdir(name, 0o700, dir_fd=out)
            except FileExistsError:
                pass  # (made as the way to a PATH asked for, or by an earlier run)
            sub_out = os.open(name, _OUT_DIR, dir_fd=out)
            try:
                if write:
                    self.done.dirs += 1
                sub = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW,
                              dir_fd=dfd)
                self._outs[p_path] = sub_out
                try:
                    self._dir(sub, p_path, c_path)
                finally:
                    del self._outs[p_path]
                    os.close(sub)
                if write:
                    if os.geteuid() == 0:
                        os.fchown(sub_out, st.st_uid, st.st_gid)
                    os.fchmod(sub_out, stat.S_IMODE(st.st_mode))
            finally:
                os.close(sub_out)
        elif not write:
            return
        elif stat.S_ISREG(st.st_mode):
            self._extract_file(dfd, n, out, name, shown, st)
        elif stat.S_ISLNK(st.st_mode):
            try:
                os.symlink(self.codec.open_target(os.readlink(n, dir_fd=dfd)), name, dir_fd=out)
                if os.geteuid() == 0:
                    os.chown(name, st.st_uid, st.st_gid, dir_fd=out, follow_symlinks=False)
                self.done.symlinks += 1
            except IntegrityError:
                self.problem(shown, "symlink target does not decrypt (not written)")

    def _restore_xattrs(self, src_fd: int, dst_fd: int, shown: str) -> None:
        """Copy the file's user.* extended attributes, decrypted."""
        for c_name in os.listxattr(src_fd):
            if not c_name.startswith("user.cryptfs."):
                continue
            try:
                name = self.codec.xattr_name_decrypt(c_name)
                value = self.codec.open_xattr(c_name, os.getxattr(src_fd, c_name))
            except IntegrityError:
                self.problem(shown, f"extended attribute {c_name[:40]}... does not decrypt "
                                    "(not written)")
                continue
            if not name.startswith(b"user."):
                # (the mount stores user.* alone: a system.posix_acl_access or a
                # security.* here was put in by hand, and would grant or change
                # what the recovered file's owner never asked for)
                shown_name = name[:40].decode("utf-8", "backslashreplace")
                self.problem(shown, f"extended attribute {shown_name} is not a user attribute "
                                    "(not written)")
                continue
            os.setxattr(dst_fd, name, value)

    def _extract_file(self, dfd: int, n: str, out_dir: int, name: bytes, shown: str,
                      st: os.stat_result) -> None:
        fd = self._open_file(dfd, n, shown, " (not written)")
        if fd is None:
            return
        tmp = b".cryptfs-recover-" + secrets.token_hex(6).encode() + b".tmp"
        made = False
        try:
            cf = self._load(fd, shown, " (not written)")
            if cf is None:
                return
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                          0o600, dir_fd=out_dir)
            made = True
            try:
                for p_off in range(0, cf.size, CHUNK):
                    sysio.write_all(out, cf.read(p_off, CHUNK))
                self._restore_xattrs(fd, out, shown)
                if os.geteuid() == 0:
                    os.fchown(out, st.st_uid, st.st_gid)
                os.fchmod(out, stat.S_IMODE(st.st_mode))
                os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(out)
            os.replace(tmp, name, src_dir_fd=out_dir, dst_dir_fd=out_dir)
            made = False
            self.done.files += 1
            self.done.bytes += cf.size
            if self.on_file:
                self.on_file(shown)
        except BlockError as e:
            self.problem(shown, f"block {e.block}: {e} (not written)")
        except OSError as e:  # (the disk of --out full, say: which file, and that it is not there)
            raise BackingIOError(f"recovery stopped at {shown} (not written): "
                                 f"{e.strerror or e}") from None
        finally:
            os.close(fd)
            if made:
                os.unlink(tmp, dir_fd=out_dir)


_OUT_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_out(out: str) -> tuple[int, bool]:
    """Open --out for writing plaintext into: (its descriptor, whether it was made now).

    A missing --out is made, mode 0700.  One that exists must be an empty
    directory (not a symlink to one) of the caller's own, that nobody else may
    enter: recovered files keep their volume's modes, and inside a directory
    others can search they could read them (a mask does not apply here); inside
    one others can write they could plant a symlink for the recovery to write
    through, with root's rights."""
    made = not os.path.lexists(out)
    try:
        if made:
            parent = os.path.dirname(os.path.abspath(out))
            os.makedirs(parent, exist_ok=True)
            os.mkdir(out, 0o700)
        fd = os.open(out, _OUT_DIR)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UsageError(f"{out} is not a directory (a symlink is not followed)",
                             hint="recover into a new directory") from None
        raise BackingIOError(f"{out}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise UsageError(f"{out} belongs to uid {st.st_uid}, not to you: its owner could "
                             "read the plaintext, or redirect it, while it is written",
                             hint="recover into a new directory")
        if os.listdir(fd):
            raise UsageError(f"{out} is not empty", hint="recover into a new or empty directory")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise UsageError(f"{out} is open to others (mode {stat.S_IMODE(st.st_mode):04o}): "
                             "they could read the plaintext recovered into it",
                             hint=f"chmod 700 {out}, or recover into a new directory")
    except BaseException:
        os.close(fd)
        if made:
            os.rmdir(out)
        raise
    return fd, made


def _volume_paths(only: list[bytes]) -> list[bytes]:
    """PATHs of the volume as ``/a/b``; empty (the whole volume) if one of them
    is the root ("/", "." or "": each recovered nothing before).  '..' refused."""
    out = [volume_path(p, example="calls/2026") for p in only]
    return [] if b"/" in out else out


def _refuse_inside_volume(backing: str, out: str) -> None:
    """Plaintext never goes into the volume it comes from: inside the backing
    directory it would lie unencrypted among the ciphertext (and read as damage);
    inside a mount of the volume the walk would find what it writes, without end."""
    where, top = os.path.realpath(out), os.path.realpath(backing)
    if within(where, top):
        raise UsageError(f"{out} is inside the volume's backing directory {top}",
                         hint="recover into a directory outside the volume")
    for mp in mounts_of_backing(top):
        if within(where, mp):
            raise UsageError(f"{out} is inside {mp}, a mount of the volume being recovered",
                             hint="recover into a directory outside the volume")


def extract(vol: RecoveredVolume, out: str, only: list[bytes],
            on_problem: Callable[[Problem], None] | None = None,
            on_file: Callable[[str], None] | None = None) -> Extracted:
    """Write the plaintext of the volume (or of the paths in ``only``) under ``out``."""
    _refuse_inside_volume(vol.backing, out)
    _volume_paths(only)  # (a bad PATH is refused before anything is made)
    out_fd, made = open_out(out)
    try:
        ex = Extractor(vol, out_fd, only, on_problem, on_file)
        try:
            ex.run()
        except OSError as e:
            raise BackingIOError(f"recovery stopped: {e.strerror or e}") from None
        reported = {p.path for p in ex.done.problems}
        for p in ex.only:
            shown = p.decode("utf-8", "backslashreplace")
            if not ex.written(p) and shown not in reported:
                ex.done.missing.append(shown)  # (a typo, most likely: not damage)
        empty = not os.listdir(out_fd)
    finally:
        os.close(out_fd)
    if made and empty:  # (nothing recovered: no empty directory left behind)
        os.rmdir(out)
    return ex.done

