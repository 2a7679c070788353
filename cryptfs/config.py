"""The volume config: ``BACKING/cryptfs.conf``, a JSON object.

It holds the format version, default mode, feature flags, the default KDF
cost, and the list of key slots.  Each slot wraps the master key under a key
stretched from one passphrase with Argon2id (as LUKS keyslots do).  The whole
object except ``mac`` is authenticated with HMAC-SHA256 under a key derived
from the master key, so after unlocking, any edited, added, removed or
downgraded field is detected.  The exact layout is in docs/FORMAT.md.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cryptfs.errors import BackingIOError, NotAVolume, WrongPassphrase
from cryptfs.keys import MASTER_KEY_LEN, VolumeKeys
from cryptfs.modes import content_mode_by_name
from cryptfs.modes.kdf import ARGON2_SALT_LEN, MIN_MEM_KIB, MIN_OPS, argon2id
from cryptfs.modes.rand import random_bytes
from cryptfs.secret import Secret

CONFIG_NAME = "cryptfs.conf"
TREE_NAME = "tree"
FORMAT_VERSION = 1
FEATURES = frozenset({"aead-blocks", "last-block-flag", "siv-names", "long-names", "xattrs"})

# Default Argon2id cost of a key slot.  128 MiB x 3 passes: ~0.5 s on one core
# here, and 20 users unlocking at once need 2.5 GiB (see docs/PERFORMANCE.md).
DEFAULT_OPS = 3
DEFAULT_MEM_KIB = 128 * 1024
MAX_OPS = 64
MAX_MEM_KIB = 4096 * 1024  # 4 GiB

_SLOT_NONCE_LEN = 12  # bytes


def b64e(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def b64d(s: object) -> bytes:
    if not isinstance(s, str):
        raise ValueError("expected a base64 string")
    return base64.b64decode(s, validate=True)


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass
class Kdf:
    ops: int
    mem_kib: int
    salt: bytes = b""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"algorithm": "argon2id", "ops": self.ops, "mem_kib": self.mem_kib}
        if self.salt:
            d["salt"] = b64e(self.salt)
        return d

    @classmethod
    def from_json(cls, d: Any) -> Kdf:
        if not isinstance(d, dict) or d.get("algorithm") != "argon2id":
            raise ValueError("unsupported KDF")
        ops, mem = d.get("ops"), d.get("mem_kib")
        if not isinstance(ops, int) or not isinstance(mem, int):
            raise ValueError("bad KDF cost")
        # Bounded both ways: an edited config must not turn unlocking into a
        # memory or CPU bomb.
        if not (MIN_OPS <= ops <= MAX_OPS and MIN_MEM_KIB <= mem <= MAX_MEM_KIB):
            raise ValueError("KDF cost out of range")
        salt = b64d(d["salt"]) if "salt" in d else b""
        if "salt" in d and len(salt) != ARGON2_SALT_LEN:
            raise ValueError("bad KDF salt length")
        return cls(ops, mem, salt)


@dataclass
class Slot:
    id: int
    label: str
    kdf: Kdf
    wrapped: bytes  # nonce (12) || AES-256-GCM(master) (48)
    created: str
    extra: dict[str, Any] = field(default_factory=dict)  # role, uid, ... (later issues)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(id=self.id, label=self.label, kdf=self.kdf.to_json(),
                 wrapped=b64e(self.wrapped), created=self.created)
        return d

    @classmethod
    def from_json(cls, d: Any) -> Slot:
        if not isinstance(d, dict):
            raise ValueError("slot is not an object")
        extra = {k: v for k, v in d.items() if k not in ("id", "label", "kdf", "wrapped", "created")}
        sid, label, created = d.get("id"), d.get("label"), d.get("created")
        if not isinstance(sid, int) or not isinstance(label, str) or not isinstance(created, str):
            raise ValueError("bad slot fields")
        wrapped = b64d(d.get("wrapped"))
        if len(wrapped) != _SLOT_NONCE_LEN + MASTER_KEY_LEN + 16:
            raise ValueError("bad wrapped key length")
        return cls(sid, label, Kdf.from_json(d.get("kdf")), wrapped, created, extra)


def _slot_ad(volume_id: bytes, slot: Slot) -> bytes:
    return b"cryptfs/v1/slot" + volume_id + struct.pack(">I", slot.id) + canonical(slot.kdf.to_json())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Recovery:
    """The volume's recovery key: its X25519 public half, and the master key
    wrapped to it (cryptfs.recovery).  The private half is never in the volume."""

    public: bytes
    wrapped: bytes

    def to_json(self) -> dict[str, Any]:
        return {"public": b64e(self.public), "wrapped": b64e(self.wrapped)}

    @classmethod
    def from_json(cls, d: Any) -> Recovery:
        if not isinstance(d, dict):
            raise ValueError("recovery is not an object")
        public, wrapped = b64d(d.get("public")), b64d(d.get("wrapped"))
        if len(public) != 32 or len(wrapped) != 32 + MASTER_KEY_LEN + 16:
            raise ValueError("bad recovery key lengths")
        return cls(public, wrapped)


@dataclass
class VolumeConfig:
    volume_id: bytes
    default_mode: str
    features: list[str]
    kdf: Kdf  # default cost for new slots
    key_id: int
    slots: list[Slot]
    created: str
    mac: bytes = b""
    recovery: Recovery | None = None

    # -- serialisation ---------------------------------------------------------
    def body(self) -> dict[str, Any]:
        return {
            "cryptfs": FORMAT_VERSION,
            "volume_id": self.volume_id.hex(),
            "created": self.created,
            "default_mode": self.default_mode,
            "features": sorted(self.features),
            "kdf": self.kdf.to_json(),
            "key_id": self.key_id,
            "slots": [s.to_json() for s in self.slots],
            # (absent, not null, without a recovery key: older configs keep their MAC)
            **({"recovery": self.recovery.to_json()} if self.recovery else {}),
        }

    def compute_mac(self, keys: VolumeKeys) -> bytes:
        return hmac.new(keys.config_mac_key, canonical(self.body()), "sha256").digest()

    def seal(self, keys: VolumeKeys) -> None:
        self.mac = self.compute_mac(keys)

    def verify(self, keys: VolumeKeys) -> None:
        if not hmac.compare_digest(self.compute_mac(keys), self.mac):
            raise NotAVolume(
                "volume config failed authentication: it was edited or damaged",
                hint="restore cryptfs.conf from a backup",
            )

    def to_bytes(self) -> bytes:
        d = self.body()
        d["mac"] = b64e(self.mac)
        return (json.dumps(d, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> VolumeConfig:
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise NotAVolume("volume config is not valid JSON (corrupt?)") from None
        if not isinstance(d, dict) or "cryptfs" not in d:
            raise NotAVolume("volume config is not a cryptfs config")
        version = d["cryptfs"]
        if version != FORMAT_VERSION:
            raise NotAVolume(
                f"volume format version {version!r} is not supported by this cryptfs "
                f"(it reads version {FORMAT_VERSION})",
                hint="use the cryptfs release that created the volume",
            )
        try:
            features = d["features"]
            if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
                raise ValueError("features")
            unknown = sorted(set(features) - FEATURES)
            if unknown:
                raise NotAVolume(f"volume uses unknown features: {', '.join(unknown)}",
                                 hint="use a newer cryptfs")
            missing = sorted(FEATURES - set(features))
            if missing:
                raise NotAVolume(f"volume config lacks required features: {', '.join(missing)}")
            mode = d["default_mode"]
            content_mode_by_name(mode)
            key_id = d["key_id"]
            if not isinstance(key_id, int) or key_id < 1:
                raise ValueError("key_id")
            slots = [Slot.from_json(s) for s in d["slots"]]
            if not slots or len({s.id for s in slots}) != len(slots):
                raise ValueError("slots")
            return cls(
                volume_id=bytes.fromhex(d["volume_id"]),
                default_mode=mode,
                features=features,
                kdf=Kdf.from_json(d["kdf"]),
                key_id=key_id,
                slots=slots,
                created=str(d["created"]),
                mac=b64d(d["mac"]),
                recovery=Recovery.from_json(d["recovery"]) if "recovery" in d else None,
            )
        except NotAVolume:
            raise
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise NotAVolume(f"volume config is malformed ({type(e).__name__}: {e})") from None

    # -- slots -----------------------------------------------------------------
    def make_slot(self, master: Secret, passphrase: Secret, label: str,
                  kdf: Kdf | None = None, slot_id: int | None = None, **extra: Any) -> Slot:
        """A new slot wrapping ``master`` (appended id unless ``slot_id`` is given)."""
        cost = kdf or self.kdf
        if slot_id is None:
            slot_id = max((s.id for s in self.slots), default=-1) + 1
        slot = Slot(
            id=slot_id,
            label=label,
            kdf=Kdf(cost.ops, cost.mem_kib, random_bytes(ARGON2_SALT_LEN)),
            wrapped=b"",
            created=_now(),
            extra=dict(extra),
        )
        k = argon2id(passphrase.reveal(), slot.kdf.salt, slot.kdf.ops, slot.kdf.mem_kib)
        nonce = random_bytes(_SLOT_NONCE_LEN)
        slot.wrapped = nonce + AESGCM(k).encrypt(nonce, master.reveal(), _slot_ad(self.volume_id, slot))
        return slot

    def try_slot(self, slot: Slot, passphrase: Secret) -> Secret | None:
        k = argon2id(passphrase.reveal(), slot.kdf.salt, slot.kdf.ops, slot.kdf.mem_kib)
        nonce, ct = slot.wrapped[:_SLOT_NONCE_LEN], slot.wrapped[_SLOT_NONCE_LEN:]
        try:
            return Secret(AESGCM(k).decrypt(nonce, ct, _slot_ad(self.volume_id, slot)))
        except InvalidTag:
            return None

    def unlock(self, passphrase: Secret, slot_id: int | None = None) -> tuple[VolumeKeys, Slot]:
        """Find the slot this passphrase opens, check the config MAC, return the keys."""
        for slot in self.slots:
            if slot_id is not None and slot.id != slot_id:
                continue
            master = self.try_slot(slot, passphrase)
            if master is None:
                continue
            keys = VolumeKeys(master, self.key_id)
            self.verify(keys)
            return keys, slot
        raise WrongPassphrase("wrong passphrase: it opens no key slot of this volume")


def new_config(default_mode: str, kdf: Kdf) -> VolumeConfig:
    content_mode_by_name(default_mode)
    return VolumeConfig(
        volume_id=random_bytes(16),
        default_mode=default_mode,
        features=sorted(FEATURES),
        kdf=kdf,
        key_id=1,
        slots=[],
        created=_now(),
    )


def config_path(backing: str) -> str:
    return os.path.join(backing, CONFIG_NAME)


def load_config(backing: str) -> VolumeConfig:
    if not os.path.isdir(backing):
        raise NotAVolume(f"{backing}: no such directory")
    path = config_path(backing)
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except FileNotFoundError:
        raise NotAVolume(f"{backing} is not a cryptfs volume (no {CONFIG_NAME})",
                         hint="create one with: cryptfs init " + backing) from None
    except PermissionError:
        raise BackingIOError(f"{path}: permission denied") from None
    except OSError as e:
        raise BackingIOError(f"{path}: {e.strerror}") from None
    return VolumeConfig.from_bytes(raw)


def load_config_at(dir_fd: int, where: str) -> VolumeConfig:
    """The config of the backing directory open as ``dir_fd``: opened without
    following a symlink, without blocking, and only read if it is a regular file
    (for a reader with more rights than whoever controls the directory)."""
    try:
        fd = os.open(CONFIG_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        raise NotAVolume(f"{where} is not a cryptfs volume (no {CONFIG_NAME})") from None
    except OSError as e:
        raise NotAVolume(f"{where}/{CONFIG_NAME}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAVolume(f"{where}/{CONFIG_NAME} is not a regular file")
        raw = os.read(fd, 1 << 20)
    except OSError as e:
        raise NotAVolume(f"{where}/{CONFIG_NAME}: {e.strerror}") from None
    finally:
        os.close(fd)
    return VolumeConfig.from_bytes(raw)


def save_config(backing: str, cfg: VolumeConfig) -> None:
    """Replace the config atomically (write, fsync, rename, fsync directory)."""
    path = config_path(backing)
    tmp = path + ".tmp"
    data = cfg.to_bytes()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise BackingIOError(f"cannot write {path}: {e.strerror}") from None
