"""Key derivation: Argon2id for passphrases, HKDF-SHA256 for everything else.

Every HKDF use has its own readable label (``info``), listed in
docs/FORMAT.md, so no key is ever used for two purposes.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl import pwhash

ARGON2_SALT_LEN = pwhash.argon2id.SALTBYTES  # 16 bytes
MIN_MEM_KIB = 8 * 1024  # refuse weaker slots than 8 MiB
MIN_OPS = 1


def hkdf(ikm: bytes, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def argon2id(passphrase: bytes, salt: bytes, ops: int, mem_kib: int, length: int = 32) -> bytes:
    """Stretch a passphrase (libsodium's Argon2id, parallelism 1)."""
    if ops < MIN_OPS or mem_kib < MIN_MEM_KIB:
        raise ValueError(f"Argon2id cost too low (ops >= {MIN_OPS}, memory >= {MIN_MEM_KIB} KiB)")
    if len(salt) != ARGON2_SALT_LEN:
        raise ValueError("Argon2id salt must be 16 bytes")
    return pwhash.argon2id.kdf(length, passphrase, salt, opslimit=ops, memlimit=mem_kib * 1024)
