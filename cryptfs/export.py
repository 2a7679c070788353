"""Export a plaintext file of a mounted volume as a standard age file.

For handing data outside the volume: the file is read through the mount
(so the mount's access rules apply to whoever exports), and written
encrypted to one or more age X25519 recipients (``age1...``), which any age
implementation (Debian's ``age -d``) decrypts.  The age format itself comes
from pyrage, the Python binding of rage (a maintained age implementation),
not from code of ours.
"""

from __future__ import annotations

import os
import secrets
import stat
from typing import BinaryIO

import pyrage

from cryptfs.errors import BackingIOError, UsageError
from cryptfs.mounttable import volume_of_path


def parse_recipients(texts: list[str]) -> list[pyrage.x25519.Recipient]:
    if not texts:
        raise UsageError("name at least one recipient (--to age1...)")
    out = []
    for t in texts:
        try:
            out.append(pyrage.x25519.Recipient.from_str(t.strip()))
        except pyrage.RecipientError as e:
            raise UsageError(f"{t!r} is not an age X25519 recipient ({e})",
                             hint="an age public key looks like age1qyqszqgpqyqszqgp...") from None
    return out


def recipients_from_file(path: str) -> list[str]:
    """Recipients, one per line; blank lines and '#' comments ignored (as age -R)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read(1 << 20).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the recipients file {path}: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def export(path: str, recipients: list[pyrage.x25519.Recipient], out: str | None,
           stdout: BinaryIO) -> int:
    """Encrypt ``path`` to ``recipients`` into ``out`` (a new file) or ``stdout``;
    returns the plaintext size."""
    if volume_of_path(path) is None:
        raise UsageError(f"{path} is not on a mounted cryptfs volume",
                         hint="export reads a file through the mount: mount the volume first")
    try:
        src = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise BackingIOError(f"{path}: {e.strerror}") from None
    with src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file")
        if out is None:
            _encrypt(src, stdout, recipients, path)
            return st.st_size
        target = os.path.abspath(out)
        if os.path.lexists(target):
            raise UsageError(f"{out} exists: export never writes over a file")
        tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}."
                           f"{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise BackingIOError(f"cannot create {out}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as dst:
                _encrypt(src, dst, recipients, path)
                dst.flush()
                os.fsync(dst.fileno())
            os.link(tmp, target)  # fails, rather than replacing, if out appeared meanwhile
        except FileExistsError:
            raise UsageError(f"{out} exists: export never writes over a file") from None
        except OSError as e:
            raise BackingIOError(f"cannot write {out}: {e.strerror}") from None
        finally:
            os.unlink(tmp)
        return st.st_size


class _Checked:
    """``dst`` as pyrage writes to it, remembering a failed write: pyrage drops
    an error that its writer raises (to a full disk, a small file's age output
    vanished with exit 0)."""

    def __init__(self, dst: BinaryIO) -> None:
        self.dst = dst
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.dst.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.dst.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def _encrypt(src: BinaryIO, dst: BinaryIO, recipients: list[pyrage.x25519.Recipient],
             path: str) -> None:
    out = _Checked(dst)
    try:
        pyrage.encrypt_io(src, out, recipients)
        out.flush()
    except (OSError, pyrage.EncryptError) as e:
        # (pyrage wraps its writer's error in its own, with Python's repr in the text)
        if out.error is not None:
            raise BackingIOError(f"cannot write the age file: {out.error.strerror or out.error}"
                                 ) from None
        if isinstance(e, OSError):
            raise BackingIOError(f"{path}: {e.strerror or e}") from None
        raise BackingIOError(f"age encryption failed: {e}") from None
    if out.error is not None:
        raise BackingIOError(f"cannot write the age file: {out.error.strerror or out.error}")
