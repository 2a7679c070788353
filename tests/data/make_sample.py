"""Make the frozen sample volumes of format version 1 (run once per format version).

    .venv/bin/python tests/data/make_sample.py NAME...

Writes tests/data/NAME/ (sample-v1-<mode> for each content mode, and
sample-v1-users-recovery: user slots and a recovery key, whose private half
is RECOVERY.key beside the volume files), each with a
MANIFEST.json listing every plaintext entry (path as hex bytes, type, size,
SHA-256, symlink target).  Uses the filesystem operations directly (no
mount), so it needs no FUSE.  Git keeps no xattrs, hard links or holes, so
the samples have none.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import sys

import trio

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from cryptfs.config import Kdf  # noqa: E402
from cryptfs.ops import ROOT, CryptOperations  # noqa: E402
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


async def build(ops: CryptOperations, items: list[tuple[bytes, str, bytes]]) -> None:
    ctx = __import__("pyfuse3").RequestContext()
    inodes = {b"": ROOT}
    for path, kind, data in items:
        parent_path, _, name = path.rpartition(b"/")
        parent = inodes[parent_path]
        if kind == "dir":
            inodes[path] = (await ops.mkdir(parent, name, stat.S_IFDIR | 0o755, ctx)).st_ino
        elif kind == "symlink":
            await ops.symlink(parent, name, data, ctx)
        elif kind == "sparse":  # written as its two ends, leaving a hole
            fi, _ = await ops.create(parent, name, stat.S_IFREG | 0o644, os.O_RDWR, ctx)
            await ops.write(fi.fh, 0, data[:5])
            await ops.write(fi.fh, len(data) - 3, data[-3:])
            await ops.release(fi.fh)
        else:
            fi, _ = await ops.create(parent, name, stat.S_IFREG | 0o644, os.O_RDWR, ctx)
            for off in range(0, len(data), 65536):
                await ops.write(fi.fh, off, data[off : off + 65536])
            await ops.release(fi.fh)


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
        slot = vol.config.make_slot(vol.keys.master, Secret(b"sample agent passphrase"),
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
    trio.run(build, ops, items)
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


def main() -> None:
    """Make the samples named on the command line (never silently all: they are frozen)."""
    known = {
        "sample-v1-aes-256-gcm": ("aes-256-gcm", False),
        "sample-v1-xchacha20-poly1305": ("xchacha20-poly1305", False),
        "sample-v1-users-recovery": ("aes-256-gcm", True),
    }
    names = sys.argv[1:]
    if not names or any(n not in known for n in names):
        sys.exit(f"usage: make_sample.py NAME... (one of {', '.join(known)})")
    for n in names:
        make(n, *known[n])


if __name__ == "__main__":
    main()
