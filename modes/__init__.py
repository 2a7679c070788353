"""Cipher modes behind one small interface.

Content modes seal and open one plaintext block at a time
(:mod:`cryptfs.modes.content`); key wrapping turns a per-file key into
header stanzas and back (:mod:`cryptfs.modes.wrap`); every other secret
or record is sealed by the one AEAD seal (:mod:`cryptfs.modes.seal`).  Everything here is pure
and synchronous: no I/O, no trio, no pyfuse3.
"""

from cryptfs.modes.content import (
    BLOCK_SIZE,
    CONTENT_MODES,
    ContentCipher,
    content_mode,
    content_mode_by_name,
)
from cryptfs.modes.errors import IntegrityError, NotForMe

__all__ = [
    "BLOCK_SIZE",
    "CONTENT_MODES",
    "ContentCipher",
    "IntegrityError",
    "NotForMe",
    "content_mode",
    "content_mode_by_name",
]
