"""The per-file header, at offset 0 of every backing regular file.

Layout (integers big-endian)::

    off  len  field
    0    6    magic  b"CRYPTF"
    6    1    format version (1)
    7    1    content mode id (1 = aes-256-gcm, 2 = xchacha20-poly1305)
    8    2    flags (bit 0: file may contain holes; other bits must be 0)
    10   2    header length H in bytes, MAC included
    12   16   file id (random)
    28   1    stanza count k (>= 1)
    29   ...  k stanzas: type (u8) || length (u16) || body
    H-32 32   HMAC-SHA256(header MAC key, bytes 0 .. H-32)

The stanzas wrap the random 32-byte file key (see cryptfs.modes.wrap), with
associated data ``bytes 0..8 || file id``.  From the file key,
HKDF-SHA256(info="cryptfs/v1/file") gives 64 bytes: the content key, then
the header MAC key.  Content blocks start at offset H.
"""

from __future__ import annotations

import functools
import hmac
import struct
from dataclasses import dataclass, replace
from typing import Protocol

from cryptfs.modes import IntegrityError, NotForMe
from cryptfs.modes.content import FILE_ID_LEN, ContentCipher, ContentMode, content_mode
from cryptfs.modes.errors import NotARecipient
from cryptfs.modes.kdf import hkdf
from cryptfs.modes.rand import random_bytes
from cryptfs.modes.wrap import FILE_KEY_LEN, Stanza, decode_stanzas, is_hybrid

MAGIC = b"CRYPTF"
VERSION = 1
FLAG_SPARSE = 0x0001
KNOWN_FLAGS = FLAG_SPARSE
MAC_LEN = 32  # bytes
PREFIX = struct.Struct(">6sBBHH16sB")  # 29 bytes, up to the stanzas
PREFIX_LEN = PREFIX.size
MAX_HEADER_LEN = 0xFFFF


# Optional, unauthenticated hint on the backing file: mode id (u8) || H (u16).
# It lets a plaintext size be computed from stat alone, without reading the
# header (a random disk read per file when listing a cold directory).
LAYOUT_XATTR = "user.cryptfs-layout"

# A mark on the backing file, set by the mount before the first write of a
# role that sees masked data (an agent): the file may hold rows that role
# chose, so its masked views show no tokens (docs/POLICY.md, Tokens).  Its
# presence is all that counts (value b"1"); removing it takes write access
# to the backing directory.
AGENT_ROWS_XATTR = "user.cryptfs-agent-rows"


def layout_hint(mode: ContentMode, h_len: int) -> bytes:
    return struct.pack(">BH", mode.mode_id, h_len)


def parse_layout_hint(raw: bytes) -> tuple[ContentMode, int]:
    """Mode and header length from a layout hint (IntegrityError if malformed)."""
    if len(raw) != 3:
        raise IntegrityError("bad layout hint")
    mode_id, h_len = struct.unpack(">BH", raw)
    if h_len < PREFIX_LEN + MAC_LEN:
        raise IntegrityError("bad layout hint")
    return content_mode(mode_id), h_len


class KeyWrapper(Protocol):
    """What makes a new header: wraps its file key (cryptfs.modes.wrap)."""

    def wrap(self, file_key: bytes, ad: bytes) -> list[Stanza]: ...


class KeyUnwrapper(Protocol):
    """What opens a header: the file key from its stanzas (a Keyring)."""

    def unwrap(self, stanzas: list[Stanza], ad: bytes) -> bytes: ...


def peek(prefix: bytes) -> tuple[ContentMode, int]:
    """Mode and header length from the first 12 bytes, unauthenticated.

    Enough to turn a backing size into a plaintext size; every read of
    content authenticates the full header first.
    """
    if len(prefix) < 12 or prefix[:6] != MAGIC or prefix[6] != VERSION:
        raise IntegrityError("bad header")
    mode = content_mode(prefix[7])
    (hlen,) = struct.unpack_from(">H", prefix, 10)
    if hlen < PREFIX_LEN + MAC_LEN:
        raise IntegrityError("bad header")
    return mode, hlen


@dataclass(frozen=True)
class FileHeader:
    mode: ContentMode
    flags: int
    file_id: bytes
    stanzas: tuple[Stanza, ...]
    file_key: bytes

    def __repr__(self) -> str:
        return f"<FileHeader mode={self.mode.name} flags={self.flags:#x} id={self.file_id.hex()}>"

    @property
    def length(self) -> int:
        return PREFIX_LEN + sum(3 + len(s.body) for s in self.stanzas) + MAC_LEN

    @property
    def sparse(self) -> bool:
        return bool(self.flags & FLAG_SPARSE)

    @functools.cached_property
    def _keys(self) -> tuple[bytes, bytes]:
        k = hkdf(self.file_key, b"cryptfs/v1/file", 64)
        return k[:32], k[32:]

    def keys(self) -> tuple[bytes, bytes]:
        """(content key, header MAC key), derived once per header object."""
        return self._keys

    def cipher(self) -> ContentCipher:
        return self.mode.cipher(self.keys()[0], self.file_id)

    def encode(self) -> bytes:
        body = PREFIX.pack(MAGIC, VERSION, self.mode.mode_id, self.flags, self.length,
                           self.file_id, len(self.stanzas))
        body += b"".join(s.encode() for s in self.stanzas)
        return body + hmac.digest(self.keys()[1], body, "sha256")

    def with_flags(self, flags: int) -> FileHeader:
        return replace(self, flags=flags)

    def with_stanzas(self, stanzas: list[Stanza]) -> FileHeader:
        """The same file key wrapped anew; the caller keeps the length unchanged."""
        return replace(self, stanzas=tuple(stanzas))

    @property
    def hybrid(self) -> bool:
        return is_hybrid(self.stanzas)

    @staticmethod
    def wrap_ad(mode: ContentMode, file_id: bytes) -> bytes:
        return MAGIC + bytes([VERSION, mode.mode_id]) + file_id

    @classmethod
    def new(cls, mode: ContentMode, wrapper: KeyWrapper) -> FileHeader:
        file_id = random_bytes(FILE_ID_LEN)
        file_key = random_bytes(FILE_KEY_LEN)
        stanzas = wrapper.wrap(file_key, cls.wrap_ad(mode, file_id))
        return cls(mode, 0, file_id, tuple(stanzas), file_key)

    @classmethod
    def decode(cls, buf: bytes | memoryview, wrapper: KeyUnwrapper) -> FileHeader:
        """Parse and authenticate a header; ``buf`` may run past its end."""
        buf = bytes(buf)
        if len(buf) < PREFIX_LEN + MAC_LEN:
            raise IntegrityError()
        magic, version, mode_id, flags, hlen, file_id, count = PREFIX.unpack_from(buf)
        if magic != MAGIC or version != VERSION or flags & ~KNOWN_FLAGS or count < 1:
            raise IntegrityError()
        if hlen > len(buf) or hlen < PREFIX_LEN + MAC_LEN:
            raise IntegrityError()
        mode = content_mode(mode_id)
        stanzas, used = decode_stanzas(memoryview(buf)[PREFIX_LEN : hlen - MAC_LEN], count)
        if PREFIX_LEN + used != hlen - MAC_LEN:
            raise IntegrityError()
        try:
            file_key = wrapper.unwrap(stanzas, cls.wrap_ad(mode, file_id))
        except NotARecipient:
            raise
        except NotForMe:
            raise IntegrityError("no stanza for this volume's key") from None
        hdr = cls(mode, flags, file_id, tuple(stanzas), file_key)
        mac = hmac.digest(hdr.keys()[1], buf[: hlen - MAC_LEN], "sha256")
        if not hmac.compare_digest(mac, buf[hlen - MAC_LEN : hlen]):
            raise IntegrityError()
        return hdr
