"""Make the frozen sample volumes (run once per format version).

    .venv/bin/python tests/data/make_sample.py NAME...

Writes tests/data/NAME/ (sample-v1-<mode> for each content mode, and
sample-v1-users-recovery: user slots and a recovery key, whose private half
is RECOVERY.key beside the volume files), each with a
MANIFEST.json listing every plaintext entry (path as hex bytes, type, size,
SHA-256, symlink target).  Uses the filesystem operations directly (no
mount), so it needs no FUSE.  Git keeps no xattrs, hard links or holes, so
the samples have none.

sample-v2-hybrid is a version 2 volume: v2 slots (root's, and agent7's, a
user that need not exist on the machine), a recovery key (RECOVERY.key), a
directory policy (a symmetric directory in the other cipher, a hybrid
directory, a hybrid drop box whose recipient is agent7), files written,
then one `rotate --slots` (so the config has `retired` and `base`, and the
first files name the retired generation 1), then more files.  Its manifest
also gives each file's content mode, whether it is hybrid, its recipients
(user names, or "recovery") and, for symmetric files, its key generation.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from cryptfs import rotate  # noqa: E402
from cryptfs.config import Kdf  # noqa: E402
from cryptfs.fuse.requests import EmptyIn  # noqa: E402
from cryptfs.ops import ROOT, CryptOperations  # noqa: E402
from cryptfs.policy import Policy, Rule, store_policy  # noqa: E402
from cryptfs.recovery import add_recovery  # noqa: E402
from cryptfs.secret import Secret  # noqa: E402
from cryptfs.volume import init_volume  # noqa: E402

PASSPHRASE = b"cryptfs sample volume"


def contents() -> list[tuple[bytes, str, bytes]]:
    rng = random.Random(20261129)
    csv = "surname,given,gender,phone\n张,伟,M,13800138000\nMüller,Anna,F,+49 30 1234567\n"
    return [
        (b"empty.txt", "file", b""),
        (b"one-block.bin", "file", rng.randbytes(4096)),
        (b"block-and-a-byte.bin", "file", rng.randbytes(4097)),
        (b"hundred-k.bin", "file", rng.randbytes(100_000)),
        ("客户名单.csv".encode(), "file", csv.encode()),
        (b"latin1-\xe9t\xe9.txt", "file", b"not UTF-8 in the name\n"),
        (b"n" * 200 + b".txt", "file", b"a long name\n"),
        (b"dir", "dir", b""),
        (b"dir/subdir", "dir", b""),
        (b"dir/subdir/deep.txt", "file", b"deep\n" * 1000),
        (b"link-to-deep", "symlink", b"dir/subdir/deep.txt"),
        (b"sparse.bin", "sparse", b"start" + bytes(20480 - 5) + b"end"),
    ]


def build(ops: CryptOperations, items: list[tuple[bytes, str, bytes]]) -> None:
    ctx = EmptyIn()  # the request as a handler sees it: uid 0, gid 0, pid 0
    ctx.uid = ctx.gid = ctx.pid = 0
    inodes = {b"": ROOT}
    for path, kind, data in items:
        parent_path, _, name = path.rpartition(b"/")
        if parent_path not in inodes:  # a directory made by an earlier build
            grand, _, pname = parent_path.rpartition(b"/")
            inodes[parent_path] = (ops.lookup(inodes[grand], pname, ctx)).nodeid
        parent = inodes[parent_path]
        if kind == "dir":
            inodes[path] = (ops.mkdir(parent, name, stat.S_IFDIR | 0o755, ctx)).nodeid
        elif kind == "symlink":
            ops.symlink(parent, name, data, ctx)
        elif kind == "sparse":  # written as its two ends, leaving a hole
            fi, _ = ops.create(parent, name, stat.S_IFREG | 0o644, os.O_RDWR, ctx)
            ops.write(fi.fh, 0, data[:5])
            ops.write(fi.fh, len(data) - 3, data[-3:])
            ops.release(fi.fh)
        else:
            fi, _ = ops.create(parent, name, stat.S_IFREG | 0o644, os.O_RDWR, ctx)
            for off in range(0, len(data), 65536):
                ops.write(fi.fh, off, data[off : off + 65536])
            ops.release(fi.fh)


def make(name: str, mode: str, users_and_recovery: bool = False) -> None:
    os.umask(0)  # as the mount daemon: modes are the ones given
    items = contents()
    out = os.path.join(HERE, name)
    shutil.rmtree(out, ignore_errors=True)
    kdf = Kdf(ops=1, mem_kib=8 * 1024)
    first = {"user": "root", "uid": 0, "role": "admin"} if users_and_recovery else None
    vol = init_volume(out, mode, Secret(PASSPHRASE), kdf, first)
    extra: dict[str, str] = {}
    if users_and_recovery:
        # Slots of users that need not exist here (the fields are only data).
        slot = vol.config.make_slot(vol.keys, Secret(b"sample agent passphrase"),
                                    "agent7", kdf, user="agent7", uid=4007, role="agent")
        vol.config.slots.append(slot)
        vol.save_config()
        fd = os.open(os.path.join(out, "RECOVERY.key"), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o600)
        try:
            add_recovery(vol, fd)
        finally:
            os.close(fd)
        extra = {"agent_passphrase": "sample agent passphrase", "recovery_key": "RECOVERY.key"}
    ops = CryptOperations(vol)
    build(ops, items)
    ops.close()
    vol.close()
    manifest = [
        {"path": p.hex(), "type": k, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        | ({"target": d.decode()} if k == "symlink" else {})
        for p, k, d in items
    ]
    with open(os.path.join(out, "MANIFEST.json"), "w") as f:
        json.dump({"passphrase": PASSPHRASE.decode(), "mode": mode, **extra,
                   "entries": manifest}, f, indent=1)
    print(f"wrote {out}")


# -- sample-v2-hybrid ---------------------------------------------------------------------------

AGENT = ("agent7", 4007, b"sample agent passphrase")  # a user slot; the user need not exist
V2_RULES = [  # (path, content mode, hybrid, recipients, dropbox); default mode aes-256-gcm
    ("/xchacha", "xchacha20-poly1305", False, (), False),
    ("/hybrid", "aes-256-gcm", True, (), False),
    ("/hybrid/x", "xchacha20-poly1305", True, ("agent7",), False),
    ("/dropbox", "xchacha20-poly1305", True, ("agent7",), True),
]


def contents_v2_before() -> list[tuple[bytes, str, bytes]]:
    rng = random.Random(20261130)
    return contents() + [
        (b"xchacha", "dir", b""),
        (b"xchacha/notes.txt", "file", b"symmetric, the other cipher\n" * 50),
        (b"xchacha/block-and-a-byte.bin", "file", rng.randbytes(4097)),
        (b"hybrid", "dir", b""),
        (b"hybrid/report.bin", "file", rng.randbytes(10_000)),
        (b"hybrid/empty", "file", b""),
        (b"hybrid/" + b"h" * 190, "file", b"hybrid file with a long name\n"),
        (b"hybrid/sparse.bin", "sparse", b"start" + bytes(3 * 4096) + b"end"),
        (b"hybrid/link", "symlink", b"report.bin"),
        (b"hybrid/x", "dir", b""),
        (b"hybrid/x/shared.bin", "file", rng.randbytes(5000)),
        (b"dropbox", "dir", b""),
        (b"dropbox/upload-1.wav", "file", rng.randbytes(9000)),
        (b"dropbox/upload-empty.wav", "file", b""),
    ]


def contents_v2_after() -> list[tuple[bytes, str, bytes]]:
    rng = random.Random(20261201)
    return [
        (b"after-rotation", "dir", b""),
        (b"after-rotation/new.bin", "file", rng.randbytes(8192)),
        (b"xchacha/after.txt", "file", b"written after rotate --slots\n"),
        (b"hybrid/after.bin", "file", rng.randbytes(4096)),
        (b"hybrid/x/after.bin", "file", rng.randbytes(100)),
        (b"dropbox/upload-2.wav", "file", rng.randbytes(12_345)),
    ]


def rule_of(path: bytes) -> tuple[str, str, bool, tuple[str, ...], bool] | None:
    """The rule a file at ``path`` was written under (the deepest ruled directory above it)."""
    d = "/" + path.rpartition(b"/")[0].decode()
    best = None
    for rule in V2_RULES:
        if d == rule[0] or d.startswith(rule[0] + "/"):
            if best is None or len(rule[0]) > len(best[0]):
                best = rule
    return best


def v2_fields(path: bytes, kind: str, key_id: int, creator: str) -> dict:
    """Manifest fields of a v2 sample file: content mode, hybrid, recipients, key generation."""
    if kind not in ("file", "sparse"):
        return {}
    rule = rule_of(path)
    if rule is None or not rule[2]:
        return {"mode": rule[1] if rule else "aes-256-gcm", "hybrid": False, "key_id": key_id}
    _, mode, _, recipients, dropbox = rule
    who = ([] if dropbox else [creator]) + list(recipients) + ["recovery"]
    return {"mode": mode, "hybrid": True, "recipients": who}


def make_v2_hybrid(name: str) -> None:
    os.umask(0)
    out = os.path.join(HERE, name)
    shutil.rmtree(out, ignore_errors=True)
    kdf = Kdf(ops=1, mem_kib=8 * 1024)
    vol = init_volume(out, "aes-256-gcm", Secret(PASSPHRASE), kdf,
                      {"user": "root", "uid": 0, "role": "admin"})
    user, uid, secret = AGENT
    vol.config.slots.append(vol.config.make_slot(vol.keys, Secret(secret), user, kdf,
                                                 user=user, uid=uid, role="agent"))
    vol.save_config()
    fd = os.open(os.path.join(out, "RECOVERY.key"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        add_recovery(vol, fd)
    finally:
        os.close(fd)
    store_policy(vol.config, vol.keys,
                 Policy({p: Rule(p, m, h, r, d) for p, m, h, r, d in V2_RULES}))
    vol.save_config()

    before, after = contents_v2_before(), contents_v2_after()
    ops = CryptOperations(vol)
    build(ops, before)
    ops.close()
    assert rotate.begin(vol, "slots")  # as `cryptfs rotate --slots`: no file is touched
    assert vol.config.key_id == 2
    ops = CryptOperations(vol)
    build(ops, after)
    ops.close()
    vol.close()

    manifest = [
        {"path": p.hex(), "type": k, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        | ({"target": d.decode()} if k == "symlink" else {})
        | v2_fields(p, k, gen, "root")
        for gen, items in ((1, before), (2, after)) for p, k, d in items
    ]
    with open(os.path.join(out, "MANIFEST.json"), "w") as f:
        json.dump({"passphrase": PASSPHRASE.decode(), "mode": "aes-256-gcm",
                   "agent_passphrase": secret.decode(), "recovery_key": "RECOVERY.key",
                   "users": {"root": {"uid": 0, "role": "admin"},
                             user: {"uid": uid, "role": "agent"}},
                   "key_id": 2, "retired": [1],
                   "policy": [{"path": p, "mode": m, "hybrid": h, "recipients": list(r),
                               "dropbox": d} for p, m, h, r, d in V2_RULES],
                   "entries": manifest}, f, indent=1)
    print(f"wrote {out}")


def main() -> None:
    """Make the samples named on the command line (never silently all: they are frozen)."""
    known = {
        "sample-v1-aes-256-gcm": ("aes-256-gcm", False),
        "sample-v1-xchacha20-poly1305": ("xchacha20-poly1305", False),
        "sample-v1-users-recovery": ("aes-256-gcm", True),
    }
    v2 = {"sample-v2-hybrid": make_v2_hybrid}
    names = sys.argv[1:]
    if not names or any(n not in known and n not in v2 for n in names):
        sys.exit(f"usage: make_sample.py NAME... (one of {', '.join([*known, *v2])})")
    for n in names:
        if n in v2:
            v2[n](n)
        else:
            make(n, *known[n])


if __name__ == "__main__":
    main()
