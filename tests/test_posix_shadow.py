"""Randomized shadow test: one file on the mount, one plain file, same operations.

Thousands of seeded random operations (pwrite at unaligned and
block-straddling offsets, truncate up and down, O_APPEND writes, writes far
past EOF leaving holes, reads) go to both files; after every step their
sizes and contents are compared.  Writes and reads alternate between a
buffered descriptor and an O_DIRECT one, so many requests reach cryptfs with
the exact offsets and lengths chosen here, not rounded to pages.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from test_posix import fsck_clean, remount
from test_posix_io import pread_all, read_direct

from conftest import Mount

BS = 4096
STEPS = 6000
MAX_SIZE = 1 << 20
TIME_LIMIT = 60.0


class Pair:
    """The same descriptors on the mount (m*) and on the reference file (r*)."""

    def __init__(self, mnt_path: Path, ref_path: Path) -> None:
        self.paths = (mnt_path, ref_path)
        flags = os.O_RDWR | os.O_CREAT
        self.m = os.open(mnt_path, flags, 0o644)
        self.r = os.open(ref_path, flags, 0o644)
        self.m_app = os.open(mnt_path, os.O_WRONLY | os.O_APPEND)
        self.r_app = os.open(ref_path, os.O_WRONLY | os.O_APPEND)
        self.m_direct = os.open(mnt_path, os.O_RDWR | os.O_DIRECT)

    def close_mount_side(self) -> None:
        for fd in (self.m, self.m_app, self.m_direct):
            os.close(fd)

    def reopen_mount_side(self) -> None:
        p = self.paths[0]
        self.m = os.open(p, os.O_RDWR)
        self.m_app = os.open(p, os.O_WRONLY | os.O_APPEND)
        self.m_direct = os.open(p, os.O_RDWR | os.O_DIRECT)

    def close(self) -> None:
        self.close_mount_side()
        for fd in (self.r, self.r_app):
            os.close(fd)


def _offset(rng: random.Random, size: int) -> int:
    kind = rng.random()
    if kind < 0.3:  # near a block boundary inside or just past the file
        b = rng.randrange(0, size // BS + 2)
        return max(0, b * BS + rng.randint(-5, 5))
    if kind < 0.5:  # block aligned
        return rng.randrange(0, size // BS + 2) * BS
    if kind < 0.6:  # exactly at EOF
        return size
    return rng.randrange(0, size + 2 * BS)


def _length(rng: random.Random) -> int:
    kind = rng.random()
    if kind < 0.4:
        return rng.choice([1, 2, 7, 100, 4095, 4096, 4097, 8191, 8192, 8193, 12_288])
    if kind < 0.8:
        return rng.randint(1, 600)
    if kind < 0.97:
        return rng.randint(1, 20_000)
    return rng.randint(20_000, 300_000)  # several FUSE requests' worth


def _new_size(rng: random.Random, size: int) -> int:
    kind = rng.random()
    if kind < 0.05:
        return 0
    if kind < 0.35:  # down, somewhere
        return rng.randint(0, size) if size else rng.randint(0, BS)
    if kind < 0.6:  # a block boundary, give or take one
        return max(0, rng.randrange(0, size // BS + 3) * BS + rng.choice([-1, 0, 0, 1]))
    if kind < 0.85:  # a little up
        return size + rng.randint(1, 3 * BS)
    return size + rng.randint(BS, 200 * BS)  # far up: a hole


def _compare(pair: Pair, size: int, lo: int, hi: int, full: bool, step: int,
             what: str) -> None:
    m_size = os.fstat(pair.m).st_size
    assert m_size == size, f"step {step} ({what}): size {m_size} != {size}"
    assert os.stat(pair.paths[0]).st_size == size
    if full:
        ranges = [(0, size)]
    else:
        lo, hi = max(0, lo - BS), min(size, hi + BS)
        ranges = [(lo, hi - lo), (max(0, size - 2 * BS), 2 * BS)]
    for off, length in ranges:
        want = pread_all(pair.r, off, length)
        got_direct = pread_all(pair.m_direct, off, length)
        if got_direct != want:
            at = next((i for i, (a, b) in enumerate(zip(got_direct, want, strict=False))
                       if a != b), min(len(got_direct), len(want)))
            raise AssertionError(f"step {step} ({what}): daemon read [{off}, +{length}) "
                                 f"differs at {off + at} (got {len(got_direct)} bytes, "
                                 f"want {len(want)})")
        got = pread_all(pair.m, off, length)
        assert got == want, f"step {step} ({what}): cached read [{off}, +{length}) differs"


def _run(pair: Pair, rng: random.Random, steps: int) -> dict[str, int]:
    size = 0
    stats: dict[str, int] = {}
    t0 = time.monotonic()
    for step in range(steps):
        assert time.monotonic() - t0 < TIME_LIMIT, f"too slow: {step} steps"
        r = rng.random()
        if size > MAX_SIZE:
            r = 0.35  # force a truncate back down
        direct = rng.random() < 0.5
        if r < 0.32:
            what = "pwrite-direct" if direct else "pwrite"
            off, n = _offset(rng, size), _length(rng)
            data = rng.randbytes(n)
            assert os.pwrite(pair.m_direct if direct else pair.m, data, off) == n
            os.pwrite(pair.r, data, off)
            lo, hi = off, off + n
        elif r < 0.45:
            what = "truncate"
            new = _new_size(rng, size) if size <= MAX_SIZE else rng.randint(0, 256 * BS)
            if rng.random() < 0.5:
                os.ftruncate(pair.m, new)
            else:
                os.truncate(pair.paths[0], new)
            os.ftruncate(pair.r, new)
            lo, hi = min(new, size), max(new, size)
        elif r < 0.55:
            what = "append"
            data = rng.randbytes(_length(rng))
            os.write(pair.m_app, data)
            os.write(pair.r_app, data)
            lo, hi = size, size + len(data)
        elif r < 0.62:
            what = "hole-direct" if direct else "hole"
            off = size + rng.randint(BS, 256 * BS) + rng.randint(0, 17)
            data = rng.randbytes(rng.randint(1, 5000))
            os.pwrite(pair.m_direct if direct else pair.m, data, off)
            os.pwrite(pair.r, data, off)
            lo, hi = size, off + len(data)
        elif r < 0.95:
            what = "read-direct" if direct else "read"
            off = _offset(rng, size)
            n = _length(rng)
            got = os.pread(pair.m_direct if direct else pair.m, n, off)
            assert got == os.pread(pair.r, n, off), f"step {step}: {what} [{off}, +{n})"
            lo, hi = off, off + n
        elif r < 0.97:
            # no descriptor open on the mount: the daemon drops the file's state;
            # truncate it by path while closed, then open it afresh
            what = "closed-truncate"
            pair.close_mount_side()
            new = _new_size(rng, size) if size <= MAX_SIZE else rng.randint(0, 256 * BS)
            assert os.stat(pair.paths[0]).st_size == size
            os.truncate(pair.paths[0], new)
            os.ftruncate(pair.r, new)
            assert os.stat(pair.paths[0]).st_size == new
            pair.reopen_mount_side()
            lo, hi = min(new, size), max(new, size)
        else:
            what = "fsync-drop-cache"
            os.fsync(pair.m)
            os.posix_fadvise(pair.m, 0, 0, os.POSIX_FADV_DONTNEED)
            lo, hi = 0, size
        stats[what] = stats.get(what, 0) + 1
        size = os.fstat(pair.r).st_size
        full = size <= 64 * 1024 or step % 25 == 0 or what == "fsync-drop-cache"
        _compare(pair, size, lo, hi, full, step, what)
    return stats


def test_shadow_random_operations(mount_any_mode: Mount, any_mode: str, tmp_path: Path) -> None:
    m = mount_any_mode
    rng = random.Random(f"cryptfs-shadow-{any_mode}")
    ref = tmp_path / "reference.bin"
    pair = Pair(m.path("shadow.bin"), ref)
    try:
        stats = _run(pair, rng, STEPS)
        size = os.fstat(pair.r).st_size
        _compare(pair, size, 0, size, True, STEPS, "final")
    finally:
        pair.close()
    # the run exercised every kind of operation
    for kind in ("pwrite", "pwrite-direct", "truncate", "append", "hole", "hole-direct",
                 "read", "read-direct", "fsync-drop-cache", "closed-truncate"):
        assert stats.get(kind, 0) >= 20, stats
    expect = ref.read_bytes()
    remount(m)
    assert os.stat(m.path("shadow.bin")).st_size == len(expect)
    assert read_direct(m.path("shadow.bin")) == expect
    assert m.path("shadow.bin").read_bytes() == expect
    fsck_clean(m)
