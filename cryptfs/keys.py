"""The keys of an unlocked volume, all derived from the master key by HKDF.

    master (32 B, random, only ever stored inside key slots)
      |- HKDF "cryptfs/v1/config"    -> HMAC-SHA256 key over the volume config
      |- HKDF "cryptfs/v1/wrap"      -> AES-256-GCM key that wraps per-file data keys
      |- HKDF "cryptfs/v1/names"     -> AES-SIV key (64 B) for file names and xattr names
      |- HKDF "cryptfs/v1/symlink"   -> AES-256-GCM key for symlink targets
      '- HKDF "cryptfs/v1/xattr"     -> AES-256-GCM key for user.* xattr values

Per file (see cryptfs.header):
    file_key (32 B, random) -HKDF "cryptfs/v1/file"-> content key (32) || header MAC key (32)
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

from cryptfs.modes.kdf import hkdf
from cryptfs.modes.wrap import SymmetricWrapper
from cryptfs.secret import Secret

MASTER_KEY_LEN = 32  # bytes


class VolumeKeys:
    """Derived keys of one unlocked volume.  ``close()`` drops them."""

    def __init__(self, master: Secret, key_id: int) -> None:
        m = master.reveal()
        self.master = master
        self.key_id = key_id
        self.config_mac_key = hkdf(m, b"cryptfs/v1/config")
        self.wrapper = SymmetricWrapper(hkdf(m, b"cryptfs/v1/wrap"), key_id)
        self.names = AESSIV(hkdf(m, b"cryptfs/v1/names", 64))
        self.symlink = AESGCM(hkdf(m, b"cryptfs/v1/symlink"))
        self.xattr = AESGCM(hkdf(m, b"cryptfs/v1/xattr"))

    def __repr__(self) -> str:
        return f"<VolumeKeys key_id={self.key_id}, redacted>"

    def close(self) -> None:
        self.master.wipe()
