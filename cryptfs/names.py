"""Encrypted names, symlink targets and extended attributes.

Names are encrypted deterministically per directory::

    c_name = base64url_nopad(AES-SIV(names_key, p_name, ad=[diriv]))

where ``diriv`` is 16 random bytes stored in the directory's ``.diriv``
file.  Equal names in one directory give equal ciphertext (so lookups need
no scan); equal names in different directories do not.  Encrypted names use
only ``A-Z a-z 0-9 - _``, so every backing name with a dot is cryptfs's own:

    .diriv            the directory's IV
    L.<h>             an entry whose encrypted name is longer than 255 bytes;
                      <h> = base64url_nopad(SHA-256(c_name))
    L.<h>.name        its full encrypted name (ASCII)
    T.<hex>           a directory being created (renamed into place when ready)

Symlink targets and ``user.*`` xattr values are sealed with AES-256-GCM and a
random 12-byte nonce: ``nonce || ciphertext || tag``.

Extended attributes must fit Linux's limits once encrypted (a backing name of
at most 255 bytes, a value of at most 64 KiB), so the plaintext limits are
smaller: ``XATTR_NAME_MAX_PLAIN`` and ``XATTR_VALUE_MAX_PLAIN`` below.
"""

from __future__ import annotations

import base64
import hashlib
import re

from cryptography.exceptions import InvalidTag

from cryptfs.keys import VolumeKeys
from cryptfs.modes import IntegrityError
from cryptfs.modes.rand import random_bytes
from cryptfs.modes.seal import OVERHEAD as SEAL_OVERHEAD

DIRIV_NAME = ".diriv"
DIRIV_LEN = 16  # bytes
NAME_MAX = 255  # bytes, plaintext and backing alike
LONG_PREFIX = "L."
LONG_SUFFIX = ".name"
TMP_PREFIX = "T."
XATTR_PREFIX = b"user."
XATTR_BACKING_PREFIX = "user.cryptfs."
SYMLINK_AD = b"cryptfs/v1/symlink"
MAX_SYMLINK_TARGET = 3000  # bytes of plaintext; the sealed, encoded target stays < 4096
_SIV_LEN = 16  # bytes AES-SIV adds
XATTR_NAME_MAX = 255  # bytes: Linux's limit on an attribute name (backing names included)
XATTR_SIZE_MAX = 65536  # bytes: Linux's limit on an attribute value (backing values included)


def _b64u_len(n: int) -> int:
    return (4 * n + 2) // 3


# The longest plaintext attribute name (the whole name, "user." included)
# whose backing name "user.cryptfs." + b64u(AES-SIV(name)) fits XATTR_NAME_MAX:
# 165 bytes.  The largest value whose sealed form fits XATTR_SIZE_MAX: 65508.
XATTR_NAME_MAX_PLAIN = max(n for n in range(XATTR_NAME_MAX + 1)
                           if len(XATTR_BACKING_PREFIX) + _b64u_len(n + _SIV_LEN) <= XATTR_NAME_MAX)
XATTR_VALUE_MAX_PLAIN = XATTR_SIZE_MAX - SEAL_OVERHEAD


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


_B64U = re.compile(r"[A-Za-z0-9_-]*")


def unb64u(s: str) -> bytes:
    """The bytes of ``s`` in its one spelling :func:`b64u` writes (no padding, no
    other character, no stray trailing bits): otherwise two backing names
    would decrypt to one plaintext name."""
    try:
        raw = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (ValueError, TypeError):
        raise IntegrityError("bad base64") from None
    if not _B64U.fullmatch(s) or b64u(raw) != s:
        raise IntegrityError("bad base64")
    return raw


def long_name(c_name: str) -> str:
    return LONG_PREFIX + b64u(hashlib.sha256(c_name.encode("ascii")).digest())


def is_cryptfs_entry(backing_name: str) -> bool:
    """True for names that hold user entries (plain encrypted or long)."""
    if "." not in backing_name:
        return True
    return backing_name.startswith(LONG_PREFIX) and not backing_name.endswith(LONG_SUFFIX)


RECENT_NAMES = 1024  # encrypted names remembered per codec


class NameCodec:
    def __init__(self, keys: VolumeKeys) -> None:
        self._siv = keys.names
        self._symlink = keys.symlink
        self._xattr = keys.xattr
        # Recent encryptions: a small file's lookup, create and unlink encrypt
        # the same name in the same directory.  AES-SIV is deterministic, so a
        # remembered result is the result; bounded, emptied when full.
        self._recent: dict[tuple[bytes, bytes], str] = {}

    # -- file names ------------------------------------------------------------------
    def encrypt(self, p_name: bytes, diriv: bytes) -> str:
        """Full encrypted name (may be longer than NAME_MAX; see :func:`backing_name`)."""
        key = (diriv, p_name)
        c_name = self._recent.get(key)
        if c_name is None:
            c_name = b64u(self._siv.encrypt(p_name, [diriv]))
            if len(self._recent) >= RECENT_NAMES:
                self._recent.clear()
            self._recent[key] = c_name
        return c_name

    def decrypt(self, c_name: str, diriv: bytes) -> bytes:
        try:
            return self._siv.decrypt(unb64u(c_name), [diriv])
        except (InvalidTag, ValueError):
            raise IntegrityError("name failed authentication") from None

    def backing_name(self, p_name: bytes, diriv: bytes) -> tuple[str, str | None]:
        """(name in the backing directory, full encrypted name if it is a long name)."""
        c_name = self.encrypt(p_name, diriv)
        if len(c_name) <= NAME_MAX:
            return c_name, None
        return long_name(c_name), c_name

    # -- symlink targets -----------------------------------------------------------------
    def seal_target(self, target: bytes) -> str:
        return b64u(self._symlink.seal(target, SYMLINK_AD))

    def open_target(self, c_target: str | bytes) -> bytes:
        if isinstance(c_target, bytes):
            c_target = c_target.decode("ascii", "replace")
        try:
            return self._symlink.open(unb64u(c_target), SYMLINK_AD)
        except (IntegrityError, ValueError):
            raise IntegrityError("symlink target failed authentication") from None

    # -- extended attributes ---------------------------------------------------------------
    def xattr_name(self, p_name: bytes) -> str:
        return XATTR_BACKING_PREFIX + b64u(self._siv.encrypt(p_name, [b"xattr"]))

    def xattr_name_decrypt(self, c_name: str) -> bytes:
        if not c_name.startswith(XATTR_BACKING_PREFIX):
            raise IntegrityError("not a cryptfs xattr")
        try:
            return self._siv.decrypt(unb64u(c_name[len(XATTR_BACKING_PREFIX):]), [b"xattr"])
        except (InvalidTag, ValueError):
            raise IntegrityError("xattr name failed authentication") from None

    def seal_xattr(self, c_name: str, value: bytes) -> bytes:
        return self._xattr.seal(value, c_name.encode("ascii"))

    def open_xattr(self, c_name: str, sealed: bytes) -> bytes:
        try:
            return self._xattr.open(sealed, c_name.encode("ascii"))
        except (IntegrityError, ValueError):
            raise IntegrityError("xattr value failed authentication") from None


def new_diriv() -> bytes:
    return random_bytes(DIRIV_LEN)
