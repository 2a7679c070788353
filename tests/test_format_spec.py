"""An independent decryptor written from docs/FORMAT.md alone, and tests that run it.

Nothing here imports cryptfs: the decryptor uses only the standard library, ``cryptography``
and ``nacl``, so that it proves the document is enough to read a volume.  It is run on the
frozen sample volumes, on fresh volumes written through a real mount, and on tampered copies
(every authentication failure must raise :class:`SpecError`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import shutil
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl import bindings as sodium

from conftest import PASSPHRASE, Mount, make_volume, new_mount

DATA = Path(__file__).parent / "data"
SAMPLES = sorted(DATA.glob("sample-v1-*"))

# ---------------------------------------------------------------------------------------------
# The decryptor (FORMAT.md, version 1)
# ---------------------------------------------------------------------------------------------

FEATURES_V1 = {"aead-blocks", "last-block-flag", "long-names", "siv-names", "xattrs"}
MAGIC = b"CRYPTF"
BS = 4096
MODES = {1: ("aes-256-gcm", 12), 2: ("xchacha20-poly1305", 24)}  # mode id -> (name, nonce length)
TAG = 16
FLAG_HOLES = 0x0001
STANZA_SYMMETRIC = 1
XATTR_PREFIX = "user.cryptfs."
LAYOUT_HINT = "user.cryptfs-layout"  # FORMAT.md, "Layout hint": not a user attribute


def check_layout_hint(path: bytes, raw: bytes) -> None:
    """If the optional hint is present, it must name the header's mode id and length."""
    try:
        hint = os.getxattr(path, LAYOUT_HINT, follow_symlinks=False)
    except OSError:
        return
    if hint != raw[7:8] + raw[10:12]:
        raise SpecError(f"layout hint {hint.hex()} disagrees with the header")


class SpecError(Exception):
    """The volume does not decrypt/authenticate as FORMAT.md says it must."""


def b64u_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        text = text.decode("ascii")
    if "=" in text or not text or any(c not in _B64U for c in text):
        raise SpecError(f"not unpadded url-safe base64: {text!r}")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as e:
        raise SpecError(f"bad base64: {text!r}") from e
    if b64u_encode(raw) != text:  # non-canonical trailing bits
        raise SpecError(f"non-canonical base64: {text!r}")
    return raw


_B64U = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def hkdf(ikm: bytes, info: str, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=info.encode("ascii")).derive(ikm)


def canonical(x: Any) -> bytes:
    return json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def gcm_open(key: bytes, nonce: bytes, ct: bytes, ad: bytes, what: str) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, ct, ad)
    except InvalidTag as e:
        raise SpecError(f"{what}: AES-GCM authentication failed") from e


def xchacha_open(key: bytes, nonce: bytes, ct: bytes, ad: bytes, what: str) -> bytes:
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ct, ad, nonce, key)
    except nacl.exceptions.CryptoError as e:
        raise SpecError(f"{what}: XChaCha20-Poly1305 authentication failed") from e


def siv_open(key: bytes, data: bytes, ad: list[bytes], what: str) -> bytes:
    if len(data) < 16:
        raise SpecError(f"{what}: AES-SIV input too short")
    try:
        return AESSIV(key).decrypt(data, ad)
    except InvalidTag as e:
        raise SpecError(f"{what}: AES-SIV authentication failed") from e


@dataclass
class Entry:
    kind: str                     # file, dir, symlink, fifo, socket
    data: bytes = b""             # file contents / symlink target
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    mode_id: int = 0              # content mode id (files)
    flags: int = 0                # header flags (files)
    backing: str = ""             # backing path (for tamper tests)


@dataclass
class Keys:
    master: bytes
    key_id: int
    wrap: bytes
    names: bytes
    symlink: bytes
    xattr: bytes


def open_config(backing: Path, passphrase: bytes) -> tuple[dict[str, Any], Keys]:
    """Open a slot, check the config MAC, check the fields, derive the keys."""
    try:
        conf = json.loads((backing / "cryptfs.conf").read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"cryptfs.conf is not UTF-8 JSON: {e}") from e
    if not isinstance(conf, dict):
        raise SpecError("cryptfs.conf is not a JSON object")
    try:
        volume_id = bytes.fromhex(conf["volume_id"])
        slots = conf["slots"]
        mac = base64.b64decode(conf["mac"], validate=True)
    except (KeyError, ValueError, TypeError) as e:
        raise SpecError(f"config: {e!r}") from e
    if len(volume_id) != 16 or not isinstance(slots, list) or not slots:
        raise SpecError("config: bad volume_id or slots")

    master = None
    for slot in slots:
        try:
            kdf = slot["kdf"]
            if kdf["algorithm"] != "argon2id":
                continue
            salt = base64.b64decode(kdf["salt"], validate=True)
            wrapped = base64.b64decode(slot["wrapped"], validate=True)
            sid = slot["id"]
            k_slot = nacl.pwhash.argon2id.kdf(32, passphrase, salt, opslimit=kdf["ops"],
                                              memlimit=kdf["mem_kib"] * 1024)
        except (KeyError, ValueError, TypeError, nacl.exceptions.CryptoError) as e:
            raise SpecError(f"config: bad slot: {e!r}") from e
        if len(wrapped) != 60:
            raise SpecError("config: wrapped key is not 60 bytes")
        ad = b"cryptfs/v1/slot" + volume_id + struct.pack(">I", sid) + canonical(kdf)
        try:
            master = AESGCM(k_slot).decrypt(wrapped[:12], wrapped[12:], ad)
            break
        except InvalidTag:
            continue
    if master is None:
        raise SpecError("no key slot opens with this passphrase")
    if len(master) != 32:
        raise SpecError("master key is not 32 bytes")

    rest = {k: v for k, v in conf.items() if k != "mac"}
    want = hmac.new(hkdf(master, "cryptfs/v1/config"), canonical(rest), hashlib.sha256).digest()
    if not hmac.compare_digest(want, mac):
        raise SpecError("config MAC mismatch")

    # Only now are the fields trusted.
    if conf.get("cryptfs") != 1 or type(conf.get("cryptfs")) is not int:
        raise SpecError(f"unsupported format version {conf.get('cryptfs')!r}")
    if not isinstance(conf.get("features"), list) or set(conf["features"]) != FEATURES_V1:
        raise SpecError(f"unsupported feature set {conf.get('features')!r}")
    if conf.get("default_mode") not in ("aes-256-gcm", "xchacha20-poly1305"):
        raise SpecError(f"unknown default_mode {conf.get('default_mode')!r}")
    key_id = conf.get("key_id")
    if type(key_id) is not int or key_id < 1:
        raise SpecError(f"bad key_id {key_id!r}")
    keys = Keys(master=master, key_id=key_id, wrap=hkdf(master, "cryptfs/v1/wrap"),
                names=hkdf(master, "cryptfs/v1/names", 64),
                symlink=hkdf(master, "cryptfs/v1/symlink"), xattr=hkdf(master, "cryptfs/v1/xattr"))
    return conf, keys


def parse_header(keys: Keys, raw: bytes) -> tuple[int, int, int, bytes, bytes]:
    """-> (H, mode id, flags, file id, content key); raises on any defect."""
    if len(raw) < 29 + 32:
        raise SpecError("file shorter than a header")
    if raw[:6] != MAGIC:
        raise SpecError("bad magic")
    if raw[6] != 1:
        raise SpecError(f"bad header version {raw[6]}")
    mode_id = raw[7]
    if mode_id not in MODES:
        raise SpecError(f"unknown content mode {mode_id}")
    flags, hlen = struct.unpack(">HH", raw[8:12])
    if flags & ~FLAG_HOLES:
        raise SpecError(f"unknown header flags {flags:#x}")
    if hlen < 29 + 32 or hlen > len(raw):
        raise SpecError(f"bad header length {hlen}")
    file_id = raw[12:28]
    count = raw[28]
    if count < 1:
        raise SpecError("no stanzas")
    pos, end = 29, hlen - 32
    stanzas = []
    for _ in range(count):
        if pos + 3 > end:
            raise SpecError("stanza overruns header")
        stype, slen = struct.unpack(">BH", raw[pos:pos + 3])
        pos += 3
        if pos + slen > end:
            raise SpecError("stanza overruns header")
        stanzas.append((stype, raw[pos:pos + slen]))
        pos += slen
    if pos != end:
        raise SpecError("stanzas do not fill the header")
    file_key = None
    ad = raw[0:8] + file_id
    for stype, body in stanzas:
        if stype != STANZA_SYMMETRIC:
            continue  # unknown stanza types are skipped
        if len(body) != 64:
            raise SpecError("symmetric stanza is not 64 bytes")
        (kid,) = struct.unpack(">I", body[:4])
        if kid != keys.key_id:
            continue
        file_key = gcm_open(keys.wrap, body[4:16], body[16:64], ad, "file key wrap")
        break
    if file_key is None:
        raise SpecError("no stanza unwraps the file key")
    fk = hkdf(file_key, "cryptfs/v1/file", 64)
    content_key, mac_key = fk[:32], fk[32:]
    want = hmac.new(mac_key, raw[:hlen - 32], hashlib.sha256).digest()
    if not hmac.compare_digest(want, raw[hlen - 32:hlen]):
        raise SpecError("header MAC mismatch")
    return hlen, mode_id, flags, file_id, content_key


def decrypt_file(keys: Keys, raw: bytes) -> tuple[bytes, int, int]:
    """Backing file bytes -> (plaintext, mode id, flags)."""
    if not raw:
        raise SpecError("empty backing file")
    hlen, mode_id, flags, file_id, ckey = parse_header(keys, raw)
    nlen = MODES[mode_id][1]
    over = nlen + TAG
    bsize = BS + over
    d = len(raw) - hlen
    if d < over:
        raise SpecError("no final block")
    q, m = divmod(d, bsize)
    if m == 0:
        n = q
    elif m >= over:
        n = q + 1
    else:
        raise SpecError("final block truncated")
    aead = gcm_open if mode_id == 1 else xchacha_open
    out = []
    for i in range(n):
        final = i == n - 1
        blk = raw[hlen + i * bsize: hlen + (i + 1) * bsize]
        if final and len(blk) == over and n > 1:
            raise SpecError("empty final block after full blocks")
        if not final and flags & FLAG_HOLES and blk.count(0) == bsize:
            out.append(bytes(BS))
            continue
        ad = file_id + struct.pack(">QB", i, 1 if final else 0)
        out.append(aead(ckey, blk[:nlen], blk[nlen:], ad, f"block {i}"))
    return b"".join(out), mode_id, flags


def decrypt_name(keys: Keys, diriv: bytes, c_name: str) -> bytes:
    p = siv_open(keys.names, b64u_decode(c_name), [diriv], f"name {c_name!r}")
    if not 1 <= len(p) <= 255 or b"/" in p or b"\0" in p:
        raise SpecError(f"bad plaintext name {p!r}")
    return p


def decrypt_symlink(keys: Keys, target: bytes) -> bytes:
    raw = b64u_decode(target)
    if len(raw) < 12 + TAG:
        raise SpecError("symlink target too short")
    return gcm_open(keys.symlink, raw[:12], raw[12:], b"cryptfs/v1/symlink", "symlink target")


def decrypt_xattrs(keys: Keys, path: bytes) -> dict[bytes, bytes]:
    out = {}
    for bname in os.listxattr(path, follow_symlinks=False):
        if not bname.startswith("user.") or bname == LAYOUT_HINT:
            continue
        if not bname.startswith(XATTR_PREFIX):
            raise SpecError(f"user xattr not in cryptfs's namespace: {bname!r}")
        name = siv_open(keys.names, b64u_decode(bname[len(XATTR_PREFIX):]), [b"xattr"],
                        f"xattr name {bname!r}")
        if not name.startswith(b"user."):
            raise SpecError(f"xattr name outside user.: {name!r}")
        val = os.getxattr(path, bname, follow_symlinks=False)
        if len(val) < 12 + TAG:
            raise SpecError("xattr value too short")
        out[name] = gcm_open(keys.xattr, val[:12], val[12:], bname.encode("ascii"), f"xattr {name!r}")
    return out


@dataclass
class Volume:
    conf: dict[str, Any]
    entries: dict[bytes, Entry]       # plaintext path (relative, bytes) -> entry
    leftovers: list[bytes]            # T.* entries found


def decrypt_volume(backing: Path, passphrase: bytes) -> Volume:
    conf, keys = open_config(backing, passphrase)
    tree = os.fsencode(backing / "tree")
    if not os.path.isdir(tree):
        raise SpecError("no tree/")
    vol = Volume(conf, {}, [])
    vol.entries[b""] = Entry("dir", xattrs=decrypt_xattrs(keys, tree), backing=os.fsdecode(tree))
    _walk(keys, tree, b"", vol)
    return vol


def _walk(keys: Keys, bdir: bytes, pdir: bytes, vol: Volume) -> None:
    try:
        with open(os.path.join(bdir, b".diriv"), "rb") as f:
            diriv = f.read()
    except FileNotFoundError as e:
        raise SpecError(f"{bdir!r} has no .diriv") from e
    if len(diriv) != 16:
        raise SpecError(f"{bdir!r}: .diriv is not 16 bytes")
    names = set(os.listdir(bdir))
    seen: set[bytes] = set()
    for bname in sorted(names):
        if bname == b".diriv":
            continue
        if bname.startswith(b"T."):
            vol.leftovers.append(os.path.join(bdir, bname))
            continue
        if bname.startswith(b"L.") and bname.endswith(b".name"):
            if bname[:-5] not in names:
                raise SpecError(f"orphan long-name side file {bname!r}")
            continue
        if bname.startswith(b"L."):
            side = os.path.join(bdir, bname + b".name")
            try:
                with open(side, "rb") as f:
                    c_name = f.read().decode("ascii")
            except (FileNotFoundError, UnicodeDecodeError) as e:
                raise SpecError(f"long name {bname!r}: bad or missing side file") from e
            if b"L." + b64u_encode(hashlib.sha256(c_name.encode("ascii")).digest()).encode() != bname:
                raise SpecError(f"long name {bname!r}: hash does not match side file")
            if len(c_name) <= 255:
                raise SpecError(f"long name {bname!r} is not long")
        elif b"." in bname:
            raise SpecError(f"unknown dotted backing name {bname!r}")
        else:
            c_name = bname.decode("ascii")
            if len(c_name) > 255:
                raise SpecError("over-long name")
        pname = decrypt_name(keys, diriv, c_name)
        if pname in seen:
            raise SpecError(f"duplicate name {pname!r}")
        seen.add(pname)
        ppath = pdir + b"/" + pname if pdir else pname
        bpath = os.path.join(bdir, bname)
        st = os.lstat(bpath)
        if stat.S_ISDIR(st.st_mode):
            vol.entries[ppath] = Entry("dir", xattrs=decrypt_xattrs(keys, bpath), backing=os.fsdecode(bpath))
            _walk(keys, bpath, ppath, vol)
        elif stat.S_ISREG(st.st_mode):
            with open(bpath, "rb") as f:
                raw = f.read()
            data, mode_id, flags = decrypt_file(keys, raw)
            check_layout_hint(bpath, raw)
            vol.entries[ppath] = Entry("file", data, decrypt_xattrs(keys, bpath), mode_id, flags,
                                       os.fsdecode(bpath))
        elif stat.S_ISLNK(st.st_mode):
            vol.entries[ppath] = Entry("symlink", decrypt_symlink(keys, os.readlink(bpath)),
                                       backing=os.fsdecode(bpath))
        elif stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            kind = "fifo" if stat.S_ISFIFO(st.st_mode) else "socket"
            vol.entries[ppath] = Entry(kind, xattrs=decrypt_xattrs(keys, bpath), backing=os.fsdecode(bpath))
        else:
            raise SpecError(f"unexpected backing file type {bpath!r}")


# ---------------------------------------------------------------------------------------------
# 1. The frozen sample volumes
# ---------------------------------------------------------------------------------------------

def copy_sample(src: Path, dst: Path) -> tuple[Path, dict[str, Any]]:
    shutil.copytree(src, dst, symlinks=True)
    manifest = json.loads((dst / "MANIFEST.json").read_text())
    (dst / "MANIFEST.json").unlink()
    return dst, manifest


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_sample_volume_matches_manifest(sample: Path, tmp_path: Path) -> None:
    backing, manifest = copy_sample(sample, tmp_path / "vol")
    vol = decrypt_volume(backing, manifest["passphrase"].encode())
    assert vol.conf["default_mode"] == manifest["mode"]
    assert not vol.leftovers
    want_mode = {"aes-256-gcm": 1, "xchacha20-poly1305": 2}[manifest["mode"]]

    got = {p: e for p, e in vol.entries.items() if p != b""}
    expected = {bytes.fromhex(e["path"]): e for e in manifest["entries"]}
    assert set(got) == set(expected), "entries differ from MANIFEST.json"
    for path, m in expected.items():
        e = got[path]
        kind = {"sparse": "file"}.get(m["type"], m["type"])
        assert e.kind == kind, path
        if kind == "dir":
            continue
        if kind == "symlink":
            assert e.data == m["target"].encode(), path
        else:
            assert e.mode_id == want_mode, path
            assert e.flags == (FLAG_HOLES if m["type"] == "sparse" else 0), path
        assert len(e.data) == m["size"], path
        assert hashlib.sha256(e.data).hexdigest() == m["sha256"], path
    # at least one long name and one nested entry are exercised
    assert any(os.path.basename(e.backing).startswith("L.") for e in got.values())
    assert any(p.count(b"/") >= 2 for p in got)


# ---------------------------------------------------------------------------------------------
# 2. Fresh volumes written through a real mount
# ---------------------------------------------------------------------------------------------

MiB = 1 << 20


def write_tree(root: Path) -> dict[bytes, tuple[str, bytes, dict[bytes, bytes]]]:
    """Write a varied tree through the mount; return what the decryptor must find."""
    rnd = random.Random(1234)
    expected: dict[bytes, tuple[str, bytes, dict[bytes, bytes]]] = {}
    r = os.fsencode(root)

    def put(rel: bytes, data: bytes) -> None:
        with open(os.path.join(r, rel), "wb") as f:
            f.write(data)
        expected[rel] = ("file", data, {})

    for size in (0, 1, 4095, 4096, 4097, 300000):
        put(b"size-%d.bin" % size, rnd.randbytes(size))

    # sparse: data at offset 0 and at 1 MiB, a hole in between
    with open(os.path.join(r, b"sparse.bin"), "wb") as f:
        f.write(b"head" * 10)
        f.seek(MiB)
        f.write(b"tail" * 10)
    expected[b"sparse.bin"] = ("file", b"head" * 10 + bytes(MiB - 40) + b"tail" * 10, {})

    long_name = b"L" * 216 + b".txt"
    assert len(long_name) == 220
    put(long_name, b"long name contents\n")
    put(b"caf\xe9-\xff\xfe-not-utf8.dat", b"\x00\xff latin-1 name\n")

    for d in (b"a", b"a/b", b"a/b/c", b"a/empty"):
        os.mkdir(os.path.join(r, d))
        expected[d] = ("dir", b"", {})
    put(b"a/b/c/deep.txt", rnd.randbytes(5000))
    put(b"a/b/c/" + b"m" * 200, b"long name in a nested dir")

    os.symlink(b"a/b/c/deep.txt", os.path.join(r, b"link"))
    expected[b"link"] = ("symlink", b"a/b/c/deep.txt", {})
    os.symlink(b"../\xff\xfe/" + b"t" * 500, os.path.join(r, b"a/odd-link"))
    expected[b"a/odd-link"] = ("symlink", b"../\xff\xfe/" + b"t" * 500, {})

    # extended by truncate (a hole, flag set), appended at a block boundary, rewritten in place
    with open(os.path.join(r, b"truncated-up.bin"), "wb") as f:
        f.write(b"t" * 10)
        f.truncate(40000)
    expected[b"truncated-up.bin"] = ("file", b"t" * 10 + bytes(40000 - 10), {})
    put(b"appended.bin", b"a" * 8192)
    with open(os.path.join(r, b"appended.bin"), "ab") as f:
        f.write(b"b" * 5)
    expected[b"appended.bin"] = ("file", b"a" * 8192 + b"b" * 5, {})
    put(b"rewritten.bin", b"r" * 10000)
    with open(os.path.join(r, b"rewritten.bin"), "r+b") as f:
        f.seek(4090)
        f.write(b"MIDDLE-ACROSS-A-BLOCK-BOUNDARY")
    expected[b"rewritten.bin"] = ("file", b"r" * 4090 + b"MIDDLE-ACROSS-A-BLOCK-BOUNDARY" + b"r" * 5880, {})
    put(b"shrunk.bin", b"s" * 20000)
    os.truncate(os.path.join(r, b"shrunk.bin"), 8192)
    expected[b"shrunk.bin"] = ("file", b"s" * 8192, {})
    # a renamed directory keeps its .diriv, so its entries' names stay valid
    os.mkdir(os.path.join(r, b"before"))
    put(b"before/inside", b"inside")
    os.rename(os.path.join(r, b"before"), os.path.join(r, b"after"))
    expected[b"after"] = ("dir", b"", {})
    expected[b"after/inside"] = expected.pop(b"before/inside")
    os.link(os.path.join(r, b"size-4097.bin"), os.path.join(r, b"a/hardlink"))
    expected[b"a/hardlink"] = expected[b"size-4097.bin"]
    os.mkfifo(os.path.join(r, b"a/fifo"))
    expected[b"a/fifo"] = ("fifo", b"", {})
    os.symlink(b"z" * 3000, os.path.join(r, b"max-link"))
    expected[b"max-link"] = ("symlink", b"z" * 3000, {})

    xattrs = {
        b"size-1.bin": {b"user.comment": b"hello", b"user.empty": b"", b"user.bin": bytes(range(256))},
        b"a/b": {b"user.dir-attr": b"on a directory"},
        long_name: {b"user." + b"x" * 100: b"v" * 3000},
    }
    for rel, attrs in xattrs.items():
        for k, v in attrs.items():
            os.setxattr(os.path.join(r, rel), k, v)
        kind, data, _ = expected[rel]
        expected[rel] = (kind, data, dict(attrs))
    return expected


def check_fresh_volume(m: Mount, mode_id: int) -> None:
    expected = write_tree(m.mnt)
    m.stop()
    vol = decrypt_volume(m.backing, PASSPHRASE)
    assert not vol.leftovers
    got = {p: (e.kind, e.data, e.xattrs) for p, e in vol.entries.items() if p != b""}
    assert sorted(got) == sorted(expected)
    for p in expected:
        assert got[p] == expected[p], p
    for p, e in vol.entries.items():
        if e.kind == "file":
            assert e.mode_id == mode_id, p
            assert e.flags == (FLAG_HOLES if p in (b"sparse.bin", b"truncated-up.bin") else 0), p
    # the sparse file's middle really is a hole in the backing store
    sparse = vol.entries[b"sparse.bin"].backing
    assert os.stat(sparse).st_blocks * 512 < MiB // 2
    # long names went through side files
    assert os.path.basename(vol.entries[b"L" * 216 + b".txt"].backing).startswith("L.")
    assert not os.path.basename(vol.entries[b"size-1.bin"].backing).startswith("L.")
    linked = (os.stat(vol.entries[p].backing).st_ino for p in (b"a/hardlink", b"size-4097.bin"))
    assert len(set(linked)) == 1

    # xattr tampering is detected too (the samples cannot carry xattrs)
    target = vol.entries[b"size-1.bin"].backing
    bname = next(n for n in os.listxattr(target) if n.startswith(XATTR_PREFIX))
    value = bytearray(os.getxattr(target, bname))
    value[-1] ^= 1
    os.setxattr(target, bname, bytes(value))
    with pytest.raises(SpecError, match="xattr"):
        decrypt_volume(m.backing, PASSPHRASE)
    value[-1] ^= 1
    os.setxattr(target, bname, bytes(value))
    decrypt_volume(m.backing, PASSPHRASE)
    other = vol.entries[b"a/b"].backing                 # a value moved to another name fails
    other_name = next(n for n in os.listxattr(other) if n.startswith(XATTR_PREFIX))
    os.setxattr(other, other_name, bytes(value))
    with pytest.raises(SpecError, match="xattr"):
        decrypt_volume(m.backing, PASSPHRASE)


@pytest.mark.mount
def test_fresh_volume_aes(mount: Mount) -> None:
    check_fresh_volume(mount, 1)


@pytest.mark.mount
def test_fresh_volume_xchacha(tmp_path: Path, passfile: Path) -> None:
    m = new_mount(tmp_path, make_volume(tmp_path / "b2", "xchacha20-poly1305"), passfile, "mnt2")
    m.start()
    try:
        check_fresh_volume(m, 2)
    finally:
        m.stop()


# ---------------------------------------------------------------------------------------------
# 3. Tampering: every authentication failure raises
# ---------------------------------------------------------------------------------------------

SAMPLE_PASS = b"cryptfs sample volume"


def flip(path: str | Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def geometry(path: str) -> tuple[int, int, int]:
    """-> (H, B, backing size) of a backing file, read from its (unauthenticated) header."""
    raw = Path(path).read_bytes()
    hlen = struct.unpack(">H", raw[10:12])[0]
    return hlen, BS + MODES[raw[7]][1] + TAG, len(raw)


def _block(vol: Volume, plain: bytes, i: int) -> tuple[str, int, int]:
    bp = vol.entries[plain].backing
    hlen, bsize, _ = geometry(bp)
    return bp, hlen + i * bsize, bsize


def t_block_body(vol: Volume) -> None:
    bp, off, _ = _block(vol, b"hundred-k.bin", 3)
    flip(bp, off + 100)


def t_block_nonce(vol: Volume) -> None:
    bp, off, _ = _block(vol, b"hundred-k.bin", 0)
    flip(bp, off)


def t_block_tag(vol: Volume) -> None:
    bp = vol.entries[b"block-and-a-byte.bin"].backing
    flip(bp, os.path.getsize(bp) - 1)


def t_empty_file_block(vol: Volume) -> None:
    bp = vol.entries[b"empty.txt"].backing
    flip(bp, os.path.getsize(bp) - 5)


def _header_flip(offset: int, mask: int = 0x01):
    def f(vol: Volume) -> None:
        bp = vol.entries[b"dir/subdir/deep.txt"].backing
        hlen = geometry(bp)[0]
        flip(bp, offset if offset >= 0 else hlen + offset, mask)
    return f


def t_swap_blocks(vol: Volume) -> None:
    bp, off0, bsize = _block(vol, b"hundred-k.bin", 0)
    raw = bytearray(Path(bp).read_bytes())
    raw[off0:off0 + bsize], raw[off0 + bsize:off0 + 2 * bsize] = \
        raw[off0 + bsize:off0 + 2 * bsize], raw[off0:off0 + bsize]
    Path(bp).write_bytes(bytes(raw))


def t_block_from_other_file(vol: Volume) -> None:
    src, soff, bsize = _block(vol, b"hundred-k.bin", 0)
    dst, doff, _ = _block(vol, b"block-and-a-byte.bin", 0)
    blk = Path(src).read_bytes()[soff:soff + bsize]
    raw = bytearray(Path(dst).read_bytes())
    raw[doff:doff + bsize] = blk
    Path(dst).write_bytes(bytes(raw))


def t_header_from_other_file(vol: Volume) -> None:
    src = vol.entries[b"hundred-k.bin"].backing
    dst = vol.entries[b"one-block.bin"].backing
    hlen = geometry(src)[0]
    assert geometry(dst)[0] == hlen
    Path(dst).write_bytes(Path(src).read_bytes()[:hlen] + Path(dst).read_bytes()[hlen:])


def t_truncate_at_block_boundary(vol: Volume) -> None:
    bp, off, _ = _block(vol, b"hundred-k.bin", 10)
    os.truncate(bp, off)


def t_truncate_inside_block(vol: Volume) -> None:
    bp, off, _ = _block(vol, b"hundred-k.bin", 10)
    os.truncate(bp, off + 10)


def t_truncate_inside_header(vol: Volume) -> None:
    bp = vol.entries[b"empty.txt"].backing
    os.truncate(bp, 40)


def t_truncate_to_zero(vol: Volume) -> None:
    os.truncate(vol.entries[b"empty.txt"].backing, 0)


def t_append_bytes(vol: Volume) -> None:
    with open(vol.entries[b"one-block.bin"].backing, "ab") as f:
        f.write(bytes(100))


def t_append_zero_block(vol: Volume) -> None:
    bp, _, bsize = _block(vol, b"one-block.bin", 0)
    with open(bp, "ab") as f:
        f.write(bytes(bsize))


def t_zero_block_not_sparse(vol: Volume) -> None:
    bp, off, bsize = _block(vol, b"hundred-k.bin", 2)
    raw = bytearray(Path(bp).read_bytes())
    raw[off:off + bsize] = bytes(bsize)
    Path(bp).write_bytes(bytes(raw))


def t_zero_final_block_sparse(vol: Volume) -> None:
    bp = vol.entries[b"sparse.bin"].backing
    hlen, bsize, size = geometry(bp)
    last = hlen + ((size - hlen - 1) // bsize) * bsize
    raw = bytearray(Path(bp).read_bytes())
    raw[last:] = bytes(size - last)
    Path(bp).write_bytes(bytes(raw))


def t_name(vol: Volume) -> None:
    bp = vol.entries[b"dir/subdir/deep.txt"].backing
    name = os.path.basename(bp)
    c = "A" if name[5] != "A" else "B"
    os.rename(bp, os.path.join(os.path.dirname(bp), name[:5] + c + name[6:]))


def t_name_moved_to_other_dir(vol: Volume) -> None:
    bp = vol.entries[b"empty.txt"].backing
    os.rename(bp, os.path.join(vol.entries[b"dir"].backing, os.path.basename(bp)))


def t_diriv(vol: Volume) -> None:
    p = os.path.join(vol.entries[b"dir"].backing, ".diriv")
    os.chmod(p, 0o644)
    flip(p, 3)


def t_long_name_side_file(vol: Volume) -> None:
    long = next(e for e in vol.entries.values() if os.path.basename(e.backing).startswith("L."))
    side = long.backing + ".name"
    os.chmod(side, 0o644)
    text = Path(side).read_text()
    Path(side).write_text(text[:10] + ("A" if text[10] != "A" else "B") + text[11:])


def t_symlink(vol: Volume) -> None:
    bp = vol.entries[b"link-to-deep"].backing
    target = os.readlink(bp)
    os.unlink(bp)
    os.symlink(target[:20] + ("A" if target[20] != "A" else "B") + target[21:], bp)


def _conf_edit(edit):
    def f(vol: Volume) -> None:
        p = Path(vol.entries[b""].backing).parent / "cryptfs.conf"
        conf = json.loads(p.read_text())
        edit(conf)
        p.write_text(json.dumps(conf, indent=2))
    return f


def t_conf_raw_byte(vol: Volume) -> None:
    p = Path(vol.entries[b""].backing).parent / "cryptfs.conf"
    raw = p.read_bytes()
    i = raw.index(b'"label": "') + len(b'"label": "')
    flip(p, i)  # a letter of the first slot's label -> another letter: still valid JSON


def _set(key: str, value: Any):
    def edit(conf: dict[str, Any]) -> None:
        conf[key] = value
    return edit


def _slot_set(key: str, value: Any):
    def edit(conf: dict[str, Any]) -> None:
        conf["slots"][0][key] = value
    return edit


def _flip_b64(key: str, slot: bool = False):
    def edit(conf: dict[str, Any]) -> None:
        obj = conf["slots"][0] if slot else conf
        raw = bytearray(base64.b64decode(obj[key]))
        raw[5] ^= 1
        obj[key] = base64.b64encode(bytes(raw)).decode()
    return edit


def _slot_ops(conf: dict[str, Any]) -> None:
    conf["slots"][0]["kdf"]["ops"] += 1


TAMPERS = {
    "block-body": t_block_body,
    "block-nonce": t_block_nonce,
    "block-tag": t_block_tag,
    "empty-file-block": t_empty_file_block,
    "block-swap": t_swap_blocks,
    "block-from-other-file": t_block_from_other_file,
    "header-magic": _header_flip(0),
    "header-version": _header_flip(6),
    "header-mode": _header_flip(7, 0x03),
    "header-flags-holes": _header_flip(9),
    "header-flags-other": _header_flip(8),
    "header-length": _header_flip(11, 0x10),
    "header-file-id": _header_flip(20),
    "header-stanza-count": _header_flip(28),
    "header-stanza-len": _header_flip(31),
    "header-key-id": _header_flip(35),
    "header-stanza-nonce": _header_flip(40),
    "header-wrapped-key": _header_flip(70),
    "header-mac": _header_flip(-1),
    "header-from-other-file": t_header_from_other_file,
    "truncate-block-boundary": t_truncate_at_block_boundary,
    "truncate-inside-block": t_truncate_inside_block,
    "truncate-inside-header": t_truncate_inside_header,
    "truncate-to-zero": t_truncate_to_zero,
    "append-bytes": t_append_bytes,
    "append-zero-block": t_append_zero_block,
    "zero-block-not-sparse": t_zero_block_not_sparse,
    "zero-final-block-sparse": t_zero_final_block_sparse,
    "name": t_name,
    "name-other-dir": t_name_moved_to_other_dir,
    "diriv": t_diriv,
    "long-name-side-file": t_long_name_side_file,
    "symlink-target": t_symlink,
    "conf-raw-byte": t_conf_raw_byte,
    "conf-created": _conf_edit(_set("created", "2000-01-01T00:00:00Z")),
    "conf-default-mode": _conf_edit(lambda c: c.update(default_mode={
        "aes-256-gcm": "xchacha20-poly1305", "xchacha20-poly1305": "aes-256-gcm"}[c["default_mode"]])),
    "conf-key-id": _conf_edit(_set("key_id", 2)),
    "conf-version": _conf_edit(_set("cryptfs", 2)),
    "conf-features-removed": _conf_edit(_set("features", sorted(FEATURES_V1 - {"last-block-flag"}))),
    "conf-key-added": _conf_edit(_set("extra", True)),
    "conf-mac-removed": _conf_edit(lambda c: c.pop("mac")),
    "conf-mac": _conf_edit(_flip_b64("mac")),
    "conf-slot-label": _conf_edit(_slot_set("label", "mallory")),
    "conf-slot-extra-key": _conf_edit(_slot_set("role", "auditor")),
    "conf-slot-wrapped": _conf_edit(_flip_b64("wrapped", slot=True)),
    "conf-slot-id": _conf_edit(_slot_set("id", 1)),
    "conf-slot-kdf": _conf_edit(_slot_ops),
    "conf-volume-id": _conf_edit(_set("volume_id", "00" * 16)),
}


@pytest.fixture(params=SAMPLES, ids=[s.name.removeprefix("sample-v1-") for s in SAMPLES])
def sample_copy(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Volume]:
    backing, _ = copy_sample(request.param, tmp_path / "vol")
    return backing, decrypt_volume(backing, SAMPLE_PASS)


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_tampering_raises(sample_copy: tuple[Path, Volume], tamper: str) -> None:
    backing, vol = sample_copy
    TAMPERS[tamper](vol)
    with pytest.raises(SpecError):
        decrypt_volume(backing, SAMPLE_PASS)


def test_untampered_controls(sample_copy: tuple[Path, Volume]) -> None:
    """The tamper tests fail for the right reason: harmless changes still decrypt."""
    backing, vol = sample_copy
    _conf_edit(lambda c: None)(vol)          # re-serialised config (MAC is over canonical JSON)
    leftover = backing / "tree" / "T.0123456789abcdef"
    leftover.mkdir()                          # a leftover T.* entry is ignored (fsck's business)
    again = decrypt_volume(backing, SAMPLE_PASS)
    assert again.leftovers == [os.fsencode(leftover)]
    assert {p: e.data for p, e in again.entries.items()} == {p: e.data for p, e in vol.entries.items()}
    # the sample's sparse file really has all-zero (hole) blocks that the hole rule reads as zeros
    bp = vol.entries[b"sparse.bin"].backing
    hlen, bsize, size = geometry(bp)
    raw = Path(bp).read_bytes()
    assert any(raw[o:o + bsize] == bytes(bsize) for o in range(hlen, size - bsize, bsize))


def test_wrong_passphrase(sample_copy: tuple[Path, Volume]) -> None:
    with pytest.raises(SpecError, match="no key slot"):
        decrypt_volume(sample_copy[0], b"not the passphrase")


def recovery_master(backing: Path, key_file: Path) -> bytes:
    """The master key from the recovery key file, as FORMAT.md describes it
    (X25519 and ChaCha20-Poly1305 straight from the library, not cryptfs)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    line = next(ln for ln in key_file.read_text().splitlines() if not ln.startswith("#"))
    magic, vid, b64 = line.split(":")
    assert magic == "CRYPTFS-RECOVERY-KEY-1"
    conf = json.loads((backing / "cryptfs.conf").read_text())
    assert vid == conf["volume_id"]
    r = X25519PrivateKey.from_private_bytes(base64.b64decode(b64))
    pub = r.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert pub == base64.b64decode(conf["recovery"]["public"])
    wrapped = base64.b64decode(conf["recovery"]["wrapped"])
    assert len(wrapped) == 80
    epk = wrapped[:32]
    shared = r.exchange(X25519PublicKey.from_public_bytes(epk))
    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + pub,
             info=b"cryptfs/v1/recovery").derive(shared)
    return ChaCha20Poly1305(k).decrypt(bytes(12), wrapped[32:],
                                       b"cryptfs/v1/recovery" + bytes.fromhex(vid))


def test_recovery_key_opens_the_master_as_the_spec_says(tmp_path: Path) -> None:
    from conftest import run_cli

    pf = tmp_path / "pass"
    pf.write_bytes(PASSPHRASE + b"\n")
    run_cli("init", str(tmp_path / "b"), "--passphrase-file", str(pf), "--recovery-key",
            str(tmp_path / "rk"), "--kdf-memory", "8", "--kdf-iterations", "1")
    master = recovery_master(tmp_path / "b", tmp_path / "rk")
    _, keys = open_config(tmp_path / "b", PASSPHRASE)  # the config MAC covers "recovery" too
    assert master == keys.master
