"""Content modes: one 4 KiB plaintext block in, one sealed block out.

Sealed block layout (all modes)::

    +----------------+------------------------------+-----------+
    | nonce          | ciphertext (len = plaintext) | tag (16)  |
    +----------------+------------------------------+-----------+
      12 B (AES-GCM) / 24 B (XChaCha20)

Nonce rule: a fresh random nonce on *every* seal, taken from
:func:`cryptfs.modes.rand.random_bytes`.  Keys are per file, so with 96-bit
nonces the birthday bound (2^32 seals per key for a 2^-32 collision chance)
is out of reach for any one file's life; XChaCha20's 192-bit nonce removes
the question entirely.

Associated data binds a block to its place::

    file_id (16 B) || block_no (u64, big-endian) || last (u8: 1 on the final block)

so blocks cannot be reordered, moved between files, and a file cannot be cut
short at a block boundary without the new final block failing to open.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from cryptfs.modes.errors import IntegrityError
from cryptfs.modes.rand import random_bytes

BLOCK_SIZE = 4096  # bytes of plaintext per block
TAG_LEN = 16  # bytes, both AEADs
KEY_LEN = 32  # bytes, both AEADs
FILE_ID_LEN = 16  # bytes

_AD = struct.Struct(">16sQB")


class ContentCipher(Protocol):
    """A per-file content cipher (one key, one file id)."""

    overhead: int  # bytes added to every block

    def seal(self, block_no: int, plaintext: bytes | memoryview, last: bool) -> bytes: ...

    def seal_run(self, first_no: int, plaintexts: list[bytes | memoryview], final_no: int
                 ) -> list[bytes]: ...

    def open(self, block_no: int, sealed: bytes | memoryview, last: bool) -> bytes: ...


@dataclass(frozen=True)
class ContentMode:
    """Static description of a content mode, as recorded in file headers."""

    mode_id: int  # one byte in the file header
    name: str
    nonce_len: int  # bytes

    @property
    def overhead(self) -> int:
        return self.nonce_len + TAG_LEN

    def cipher(self, key: bytes, file_id: bytes) -> ContentCipher:
        if len(key) != KEY_LEN or len(file_id) != FILE_ID_LEN:
            raise ValueError("content key must be 32 bytes and file id 16 bytes")
        if self.mode_id == AES_256_GCM.mode_id:
            return _AesGcmCipher(key, file_id)
        return _XChaChaCipher(key, file_id)


AES_256_GCM = ContentMode(1, "aes-256-gcm", 12)
XCHACHA20_POLY1305 = ContentMode(2, "xchacha20-poly1305", 24)

CONTENT_MODES: dict[int, ContentMode] = {m.mode_id: m for m in (AES_256_GCM, XCHACHA20_POLY1305)}


def content_mode(mode_id: int) -> ContentMode:
    try:
        return CONTENT_MODES[mode_id]
    except KeyError:
        raise IntegrityError("unknown content mode") from None


def content_mode_by_name(name: str) -> ContentMode:
    for m in CONTENT_MODES.values():
        if m.name == name:
            return m
    raise ValueError(f"unknown mode {name!r} (choose from: "
                     + ", ".join(m.name for m in CONTENT_MODES.values()) + ")")


class _BlockCipher:
    """What both AEADs share: framing, associated data, nonce batches."""

    NONCE_LEN = 0  # bytes, set by subclasses
    overhead = 0

    __slots__ = ("_file_id",)

    def __init__(self, file_id: bytes) -> None:
        self._file_id = file_id

    def _encrypt(self, nonce: bytes, pt: bytes | memoryview, ad: bytes) -> bytes:
        raise NotImplementedError

    def _decrypt(self, nonce: bytes | memoryview, ct: bytes | memoryview, ad: bytes) -> bytes:
        raise NotImplementedError

    def seal(self, block_no: int, plaintext: bytes | memoryview, last: bool) -> bytes:
        nonce = random_bytes(self.NONCE_LEN)
        return nonce + self._encrypt(nonce, plaintext, _AD.pack(self._file_id, block_no, last))

    def seal_run(self, first_no: int, plaintexts: list[bytes | memoryview], final_no: int
                 ) -> list[bytes]:
        """Seal consecutive blocks ``first_no, first_no + 1, ...``.

        Returns the pieces to write in order (nonce, ciphertext, nonce, ...),
        ready for one ``pwritev``; all nonces come from one call to the
        randomness source.
        """
        n = self.NONCE_LEN
        nonces = random_bytes(n * len(plaintexts))
        out: list[bytes] = []
        encrypt, pack, fid = self._encrypt, _AD.pack, self._file_id
        for k, pt in enumerate(plaintexts):
            no = first_no + k
            nonce = nonces[k * n : (k + 1) * n]
            out.append(nonce)
            out.append(encrypt(nonce, pt, pack(fid, no, no == final_no)))
        return out

    def open(self, block_no: int, sealed: bytes | memoryview, last: bool) -> bytes:
        if len(sealed) < self.overhead:
            raise IntegrityError()
        n = self.NONCE_LEN
        return self._decrypt(sealed[:n], sealed[n:], _AD.pack(self._file_id, block_no, last))


class _AesGcmCipher(_BlockCipher):
    """AES-256-GCM via pyca/cryptography (one AESGCM object per file)."""

    NONCE_LEN = 12  # bytes
    overhead = NONCE_LEN + TAG_LEN

    __slots__ = ("_aead",)

    def __init__(self, key: bytes, file_id: bytes) -> None:
        super().__init__(file_id)
        self._aead = AESGCM(key)

    def _encrypt(self, nonce: bytes, pt: bytes | memoryview, ad: bytes) -> bytes:
        return self._aead.encrypt(nonce, pt, ad)

    def _decrypt(self, nonce: bytes | memoryview, ct: bytes | memoryview, ad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, ct, ad)
        except InvalidTag:
            raise IntegrityError() from None


class _XChaChaCipher(_BlockCipher):
    """XChaCha20-Poly1305 (IETF) via libsodium (PyNaCl bindings)."""

    NONCE_LEN = 24  # bytes
    overhead = NONCE_LEN + TAG_LEN

    __slots__ = ("_key",)

    def __init__(self, key: bytes, file_id: bytes) -> None:
        super().__init__(file_id)
        self._key = key

    def _encrypt(self, nonce: bytes, pt: bytes | memoryview, ad: bytes) -> bytes:
        return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(pt), ad, nonce, self._key)

    def _decrypt(self, nonce: bytes | memoryview, ct: bytes | memoryview, ad: bytes) -> bytes:
        try:
            return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                bytes(ct), ad, bytes(nonce), self._key)
        except CryptoError:
            raise IntegrityError() from None
