"""POSIX data-path behaviour of a real cryptfs mount.

Open-but-unlinked files, truncate, sparse and >4 GiB files, O_APPEND from
several processes, shared mmap, fsync, locks, concurrent writers, atomic
replacement, and a randomized shadow test against a plain file.

Where it matters, data is read back with O_DIRECT: that bypasses the
kernel's page cache, so the bytes come from the cryptfs daemon (decrypted
from the backing file), not from pages the kernel still holds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import random
import struct
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_posix import (
    backing_names,
    check_backing_layout,
    errno_of,
    fsck_and_remount,
    fsck_clean,
    remount,
)

from conftest import Mount

BS = 4096
GiB = 1 << 30
MiB = 1 << 20


# -- helpers -------------------------------------------------------------------------------
def read_direct(path: Path | str, off: int = 0, length: int | None = None) -> bytes:
    """Read through the daemon (O_DIRECT: no page cache)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return pread_all(fd, off, length)
    finally:
        os.close(fd)


def pread_all(fd: int, off: int = 0, length: int | None = None) -> bytes:
    if length is None:
        length = max(0, os.fstat(fd).st_size - off)
    out = bytearray()
    while len(out) < length:
        chunk = os.pread(fd, min(length - len(out), 1 << 20), off + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def read_all(path: Path | str) -> bytes:
    """Read through the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return pread_all(fd)
    finally:
        os.close(fd)


def check_content(path: Path | str, expect: bytes) -> None:
    assert os.stat(path).st_size == len(expect)
    got = read_all(path)
    assert len(got) == len(expect)
    assert got == expect, f"cached read differs at {_first_diff(got, expect)}"
    got = read_direct(path)
    assert len(got) == len(expect)
    assert got == expect, f"direct read differs at {_first_diff(got, expect)}"


def _first_diff(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def run_children(target: Callable[..., Any], args_list: list[tuple[Any, ...]],
                 timeout: float = 120) -> None:
    """Run ``target(*args)`` in one forked process per args; all must succeed."""
    pids = []
    for args in args_list:
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                target(*args)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    deadline = time.monotonic() + timeout
    codes = {}
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
            raise AssertionError("child processes timed out")
        time.sleep(0.005)
    assert list(codes.values()) == [0] * len(pids), codes


def child_result(fn: Callable[[], int]) -> int:
    """Run ``fn`` in a forked child; return its small integer result (the exit code)."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = fn()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def pattern(seed: str, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- open files that lose their name ---------------------------------------------------------
def test_unlinked_open_file_keeps_working(mount: Mount) -> None:
    p = mount.path("doomed")
    data = pattern("doomed", 10_000)
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    fd2 = os.open(p, os.O_RDONLY)
    try:
        os.write(fd, data)
        os.unlink(p)
        assert os.listdir(mount.mnt) == []
        assert errno_of(os.stat, p) == errno.ENOENT
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 20_000, 0) == data
        # keeps writing: in place, past the end with a hole, then fsync
        os.pwrite(fd, b"PATCH", 4094)
        os.pwrite(fd, b"tail", 30_000)
        os.fsync(fd)
        os.fdatasync(fd)
        expect = bytearray(data + bytes(20_000) + b"tail")
        expect[4094:4099] = b"PATCH"
        assert os.fstat(fd).st_size == 30_004
        assert pread_all(fd) == bytes(expect)
        assert pread_all(fd2) == bytes(expect)
        # a fresh open of the unlinked file (through /proc) reads from the daemon
        assert read_direct(f"/proc/self/fd/{fd}") == bytes(expect)
        os.ftruncate(fd, 5000)
        os.fsync(fd)
        assert read_direct(f"/proc/self/fd/{fd2}") == bytes(expect[:5000])
        assert os.fstat(fd2).st_size == 5000
        # a new file of the same name is a different file
        p.write_bytes(b"new one")
        assert os.pread(fd, 100, 0) == bytes(expect[:100])
        assert p.read_bytes() == b"new one"
    finally:
        os.close(fd)
        os.close(fd2)
    assert os.listdir(mount.mnt) == ["doomed"]
    assert len(backing_names(mount)) == 2  # .diriv and the new file
    remount(mount)
    assert mount.path("doomed").read_bytes() == b"new one"
    fsck_clean(mount)


def test_renamed_open_file_keeps_working(mount: Mount) -> None:
    os.mkdir(mount.path("elsewhere"))
    p = mount.path("orig")
    long_name = "renamed-" + "r" * 220
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"first part;")
        os.rename(p, mount.path("elsewhere", long_name))
        os.write(fd, b"second part;")
        os.fsync(fd)
        assert mount.path("elsewhere", long_name).read_bytes() == b"first part;second part;"
        mount.path("victim").write_bytes(b"to be replaced")
        os.rename(mount.path("elsewhere", long_name), mount.path("victim"))
        os.write(fd, b"third")
        os.fdatasync(fd)
        assert read_direct(mount.path("victim")) == b"first part;second part;third"
    finally:
        os.close(fd)
    assert sorted(os.listdir(mount.mnt)) == ["elsewhere", "victim"]
    assert os.listdir(mount.path("elsewhere")) == []
    assert check_backing_layout(mount)["long"] == 0
    remount(mount)
    assert mount.path("victim").read_bytes() == b"first part;second part;third"
    fsck_clean(mount)


# -- truncate and holes ----------------------------------------------------------------------
def test_truncate_up_and_down(mount: Mount) -> None:
    p = mount.path("t")
    expect = bytearray(pattern("trunc", 3 * BS + 100))
    p.write_bytes(expect)
    sizes = [5000, 8192, 4096, 4095, 4097, 0, 1, 12288, 100_000, 40_000, 65_536, 65_535,
             3, 3 * BS, 2 * BS + 1, 0, 7, 1 << 20, 4096 * 3 + 17, 0]
    fd = os.open(p, os.O_RDWR)
    try:
        for i, size in enumerate(sizes):
            if i % 3 == 0:
                os.truncate(p, size)  # by path
            else:
                os.ftruncate(fd, size)
            if size < len(expect):
                del expect[size:]
            else:
                expect += bytes(size - len(expect))
            check_content(p, bytes(expect))
            assert os.fstat(fd).st_size == size
            # refill part of the file so the next cut has data to cut
            if i % 2 == 0 and size > 10:
                chunk = pattern(f"fill{i}", min(size, 6000) - 5)
                os.pwrite(fd, chunk, 5)
                expect[5 : 5 + len(chunk)] = chunk
                check_content(p, bytes(expect))
        # O_TRUNC on open
        os.pwrite(fd, b"x" * 9000, 0)
        expect[:] = b"x" * 9000
    finally:
        os.close(fd)
    check_content(p, bytes(expect))
    os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))
    check_content(p, b"")
    p.write_bytes(b"after O_TRUNC")
    remount(mount)
    check_content(p, b"after O_TRUNC")
    fsck_clean(mount)


def test_sparse_files_and_writes_past_eof(mount: Mount) -> None:
    p = mount.path("sparse")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"head", 0)
        os.pwrite(fd, b"far", MiB + 5)
        assert os.fstat(fd).st_size == MiB + 8
        expect = bytearray(MiB + 8)
        expect[:4] = b"head"
        expect[MiB + 5:] = b"far"
        assert pread_all(fd) == bytes(expect)
        assert read_direct(p, BS * 10, BS) == bytes(BS)  # a hole reads as zeros
        # fill part of the hole, straddling a block boundary
        os.pwrite(fd, b"middle", 100 * BS - 3)
        expect[100 * BS - 3 : 100 * BS + 3] = b"middle"
        # a write past EOF that starts mid-block
        os.pwrite(fd, b"further", 2 * MiB + 1234)
        expect += bytes(2 * MiB + 1234 - len(expect)) + b"further"
        # truncate into the hole and past it again
        os.ftruncate(fd, 50 * BS + 10)
        del expect[50 * BS + 10 :]
        os.ftruncate(fd, 300 * BS)
        expect += bytes(300 * BS - len(expect))
        os.fsync(fd)
    finally:
        os.close(fd)
    check_content(p, bytes(expect))
    # the backing file is sparse too
    backing = [os.path.join(d, n) for d, _, fs in os.walk(mount.backing / "tree")
               for n in fs if n != ".diriv"]
    assert len(backing) == 1
    assert os.stat(backing[0]).st_blocks * 512 < 300 * BS // 4
    remount(mount)
    check_content(p, bytes(expect))
    fsck_clean(mount)


def test_file_over_4gib_written_sparsely(mount: Mount) -> None:
    p = mount.path("huge")
    pieces = {
        0: b"start",
        2**32 - 3: b"ABCDEF",  # across the 4 GiB boundary
        2**32 + BS - 2: b"straddle",  # across a block boundary above 4 GiB
        2**32 + 3 * BS: b"B" * BS,  # one whole block
        5 * GiB: b"five GiB end",
    }
    size = 5 * GiB + len(b"five GiB end")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for off, data in pieces.items():
            assert os.pwrite(fd, data, off) == len(data)
        assert os.fstat(fd).st_size == size
        os.fsync(fd)
    finally:
        os.close(fd)

    def check() -> None:
        assert os.stat(p).st_size == size
        dfd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        cfd = os.open(p, os.O_RDONLY)
        try:
            for f in (dfd, cfd):
                for off, data in pieces.items():
                    assert os.pread(f, len(data), off) == data
                    assert os.pread(f, len(data) + 20, off - 10 if off else 0)[
                        (10 if off else 0):][: len(data)] == data
                assert os.pread(f, 16, 2**32 - 8) == bytes(5) + b"ABC" + b"DEF" + bytes(5)
                assert os.pread(f, BS, 3 * GiB) == bytes(BS)
                assert os.pread(f, 100, 2**32 + 2 * BS) == bytes(100)
                assert os.pread(f, 100, size - 5) == b"B end"
                assert os.pread(f, 100, size) == b""
                assert os.pread(f, 100, 6 * GiB) == b""
        finally:
            os.close(dfd)
            os.close(cfd)

    check()
    backing = [os.path.join(d, n) for d, _, fs in os.walk(mount.backing / "tree")
               for n in fs if n != ".diriv"]
    assert len(backing) == 1
    assert os.stat(backing[0]).st_size > 5 * GiB
    assert os.stat(backing[0]).st_blocks * 512 < 4 * MiB
    t0 = time.monotonic()
    out = fsck_and_remount(mount)
    assert "1 files" in out
    assert time.monotonic() - t0 < 30
    check()
    # cut it back below 4 GiB + a few blocks, then small: fsck must stay clean
    os.truncate(p, 2**32 + 1)
    assert os.stat(p).st_size == 2**32 + 1
    assert read_direct(p, 2**32 - 3, 100) == b"ABCD"
    os.truncate(p, 10_000)
    check_content(p, b"start" + bytes(10_000 - 5))
    fsck_clean(mount)


def test_a_file_cannot_grow_past_what_its_ciphertext_can_hold(mount: Mount) -> None:
    """The kernel lets a FUSE file reach 2**63 - 1 bytes, but the block
    overhead puts such a file's ciphertext past the largest offset: a write
    near 2**63 logged an internal error (OverflowError) and gave EIO. It is
    EFBIG now, as a file too large for its filesystem, and nothing is lost."""
    largest = 2**63 - 1  # (off_t)
    p = mount.path("edge")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, b"far but fine", 2**40) == 12  # (ext4 stops at 16 TiB)
        os.fsync(fd)
        os.pwrite(fd, b"x" * 100, largest - 4096)  # (the page cache takes it ...)
        with pytest.raises(OSError) as e:
            os.fsync(fd)  # (... the mount refuses it)
        assert e.value.errno == errno.EFBIG
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, largest)
        assert e.value.errno == errno.EFBIG
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    remount(mount)
    assert os.stat(p).st_size == 2**40 + 12
    with open(p, "rb") as f:
        f.seek(2**40 - 4)
        assert f.read(100) == bytes(4) + b"far but fine"
    log = mount.log.read_text()
    assert "internal error" not in log and "Traceback" not in log, log
    fsck_clean(mount)


def test_large_single_writes(mount: Mount) -> None:
    """Writes far larger than one FUSE request, through the cache and O_DIRECT."""
    p = mount.path("large")
    data = pattern("large", 5 * MiB + 123)
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)
    expect = bytearray(data)
    patch = pattern("patch", 3 * MiB + 7)
    fd = os.open(p, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwrite(fd, patch, 1 * MiB + 4093) == len(patch)
        expect[MiB + 4093 : MiB + 4093 + len(patch)] = patch
        assert os.pwrite(fd, patch, 6 * MiB + 1) == len(patch)  # past EOF: a hole first
        expect += bytes(6 * MiB + 1 - len(expect)) + patch
    finally:
        os.close(fd)
    check_content(p, bytes(expect))
    remount(mount)
    check_content(p, bytes(expect))
    fsck_clean(mount)


# -- O_APPEND from several processes ----------------------------------------------------------
REC = 64


def _record(proc: int, i: int) -> bytes:
    head = b"<p%d r%04d " % (proc, i)
    return head + bytes([65 + proc]) * (REC - len(head) - 1) + b">"


def _appender(path: str, proc: int, n: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(n):
            assert os.write(fd, _record(proc, i)) == REC
            if i % 97 == 0:
                os.fsync(fd)
    finally:
        os.close(fd)


def test_o_append_from_several_processes(mount: Mount) -> None:
    p = mount.path("log")
    p.write_bytes(b"")
    procs, n = 4, 500
    run_children(_appender, [(str(p), k, n) for k in range(procs)])

    def check() -> None:
        for data in (read_all(p), read_direct(p)):
            assert len(data) == procs * n * REC
            recs = [data[i : i + REC] for i in range(0, len(data), REC)]
            assert sorted(recs) == sorted(_record(k, i) for k in range(procs) for i in range(n))
            # each process's records are in its own order
            for k in range(procs):
                mine = [r for r in recs if r.startswith(b"<p%d " % k)]
                assert mine == [_record(k, i) for i in range(n)]

    check()
    remount(mount)
    check()
    fsck_clean(mount)


# -- mmap ---------------------------------------------------------------------------------------
def test_shared_writable_mmap(mount: Mount) -> None:
    p = mount.path("mapped")
    size = 3 * BS + 1000
    expect = bytearray(pattern("mmap", size))
    p.write_bytes(expect)
    fd = os.open(p, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            assert mm[:] == expect
            for off, data in ((0, b"MAPPED-AT-ZERO"), (BS - 3, b"across-block"),
                              (2 * BS + 100, b"x" * 3000), (size - 4, b"END!")):
                mm[off : off + len(data)] = data
                expect[off : off + len(data)] = data
            mm.flush()  # msync(MS_SYNC)
            # another descriptor (through the page cache) and the daemon see it
            assert os.pread(fd, size, 0) == expect
            assert read_direct(p) == expect
            mm[10:20] = b"0123456789"
            expect[10:20] = b"0123456789"
        finally:
            mm.close()
        # a file grown with ftruncate can be mapped and written in the new part
        os.ftruncate(fd, size + 2 * BS)
        expect += bytes(2 * BS)
        mm = mmap.mmap(fd, size + 2 * BS)
        try:
            mm[size + BS : size + BS + 5] = b"grown"
            expect[size + BS : size + BS + 5] = b"grown"
            mm.flush()
        finally:
            mm.close()
    finally:
        os.close(fd)
    check_content(p, bytes(expect))
    remount(mount)
    check_content(p, bytes(expect))
    fsck_clean(mount)


# -- fsync ----------------------------------------------------------------------------------------
def test_fsync_and_fdatasync(mount: Mount) -> None:
    os.mkdir(mount.path("d"))
    p = mount.path("d", "synced")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"a" * 5000)
        os.fsync(fd)
        assert read_direct(p) == b"a" * 5000  # on the daemon's side after fsync
        os.pwrite(fd, b"b" * 10, 4090)
        os.fdatasync(fd)
        assert read_direct(p) == b"a" * 4090 + b"b" * 10 + b"a" * 900
        os.ftruncate(fd, 100)
        os.fsync(fd)
    finally:
        os.close(fd)
    rfd = os.open(p, os.O_RDONLY)  # fsync on a read-only descriptor is allowed
    try:
        os.fsync(rfd)
        os.fdatasync(rfd)
    finally:
        os.close(rfd)
    dfd = os.open(mount.path("d"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    os.sync()
    # the data reached the backing file: its size matches 100 bytes of plaintext
    backing = [os.path.join(dp, n) for dp, _, fs in os.walk(mount.backing / "tree")
               for n in fs if n != ".diriv"]
    assert len(backing) == 1
    sizes = os.stat(backing[0]).st_size
    assert 100 < sizes < 100 + 200
    remount(mount)
    assert p.read_bytes() == b"a" * 100
    fsck_clean(mount)


# -- locks ----------------------------------------------------------------------------------------
def _try_lockf(path: str, cmd: int, length: int, start: int) -> int:
    """0: got the lock, 1: refused as a conflict, 2: other error."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, cmd, length, start)
        return 0
    except OSError as e:
        return 1 if e.errno in (errno.EACCES, errno.EAGAIN) else 2
    finally:
        os.close(fd)


def _getlk_pid(path: str, ltype: int, start: int, length: int) -> int:
    """F_GETLK: pid of a process holding a conflicting lock, or 0."""
    fd = os.open(path, os.O_RDWR)
    try:
        fl = struct.pack("@hhqqi4x", ltype, os.SEEK_SET, start, length, 0)
        res = fcntl.fcntl(fd, fcntl.F_GETLK, fl)
        l_type, _, _, _, l_pid = struct.unpack("@hhqqi4x", res)
        return 0 if l_type == fcntl.F_UNLCK else l_pid
    finally:
        os.close(fd)


def test_posix_byte_range_locks(mount: Mount) -> None:
    p = str(mount.path("locked"))
    mount.path("locked").write_bytes(b"x" * 1000)
    fd = os.open(p, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)  # bytes 0..99
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 100, 500)  # bytes 500..599 shared
        nb = fcntl.LOCK_NB
        assert child_result(lambda: _try_lockf(p, fcntl.LOCK_EX | nb, 50, 50)) == 1
        assert child_result(lambda: _try_lockf(p, fcntl.LOCK_SH | nb, 1, 99)) == 1
        assert child_result(lambda: _try_lockf(p, fcntl.LOCK_EX | nb, 100, 100)) == 0
        assert child_result(lambda: _try_lockf(p, fcntl.LOCK_SH | nb, 10, 550)) == 0
        assert child_result(lambda: _try_lockf(p, fcntl.LOCK_EX | nb, 10, 550)) == 1
        me = os.getpid()
        assert child_result(lambda: int(_getlk_pid(p, fcntl.F_WRLCK, 0, 10) == me)) == 1
        assert child_result(lambda: int(_getlk_pid(p, fcntl.F_RDLCK, 520, 10) == me)) == 0
        assert child_result(lambda: int(_getlk_pid(p, fcntl.F_WRLCK, 520, 10) == me)) == 1
        assert child_result(lambda: _getlk_pid(p, fcntl.F_WRLCK, 200, 10)) == 0
        # a blocking request waits until the holder lets go
        parent_pid = os.getpid()

        def blocking() -> int:
            t0 = time.monotonic()
            rc = _try_lockf(p, fcntl.LOCK_EX, 10, 0)
            waited = time.monotonic() - t0
            return rc if waited >= 0.2 else 3

        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                code = blocking()
            finally:
                os._exit(code)
        time.sleep(0.4)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # still waiting
        fcntl.lockf(fd, fcntl.LOCK_UN, 100, 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.getpid() == parent_pid
        assert child_result(lambda: _try_lockf(p, fcntl.LOCK_EX | nb, 100, 0)) == 0
        assert child_result(lambda: _try_lockf(p, fcntl.LOCK_EX | nb, 0, 0)) == 1  # whole file
    finally:
        os.close(fd)
    assert child_result(lambda: _try_lockf(p, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)) == 0
    assert mount.path("locked").read_bytes() == b"x" * 1000


def _try_flock(path: str, op: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, op)
        return 0
    except OSError as e:
        return 1 if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else 2
    finally:
        os.close(fd)


def test_flock_between_processes(mount: Mount) -> None:
    p = str(mount.path("flocked"))
    mount.path("flocked").write_bytes(b"f")
    nb = fcntl.LOCK_NB
    fd = os.open(p, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert child_result(lambda: _try_flock(p, fcntl.LOCK_EX | nb)) == 1
        assert child_result(lambda: _try_flock(p, fcntl.LOCK_SH | nb)) == 1
        fcntl.flock(fd, fcntl.LOCK_SH)  # downgrade
        assert child_result(lambda: _try_flock(p, fcntl.LOCK_SH | nb)) == 0
        assert child_result(lambda: _try_flock(p, fcntl.LOCK_EX | nb)) == 1
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert child_result(lambda: _try_flock(p, fcntl.LOCK_EX | nb)) == 0
        fcntl.flock(fd, fcntl.LOCK_EX | nb)
        # the lock belongs to the open file description: a second open conflicts,
        # even in the same process
        fd2 = os.open(p, os.O_RDONLY)
        try:
            assert errno_of(fcntl.flock, fd2, fcntl.LOCK_EX | nb) == errno.EWOULDBLOCK
        finally:
            os.close(fd2)
    finally:
        os.close(fd)  # closing releases it
    assert child_result(lambda: _try_flock(p, fcntl.LOCK_EX | nb)) == 0


# -- concurrent writers ---------------------------------------------------------------------------
CHUNKS = [4096, 1000, 4097, 333, 8191, 1, 4095, 12_288, 777]


def _region_writer(path: str, k: int, direct: bool) -> None:
    data = pattern(f"region{k}", MiB)
    fd = os.open(path, os.O_WRONLY | (os.O_DIRECT if direct else 0))
    try:
        pos, i = 0, 0
        while pos < MiB:
            n = min(CHUNKS[(i + k) % len(CHUNKS)], MiB - pos)
            assert os.pwrite(fd, data[pos : pos + n], k * MiB + pos) == n
            pos += n
            i += 1
        os.fsync(fd)
    finally:
        os.close(fd)


def test_concurrent_writers_of_one_file(mount: Mount) -> None:
    p = mount.path("shared")
    p.write_bytes(b"")
    # two write through the page cache, two straight to the daemon (O_DIRECT:
    # unaligned offsets and lengths reach cryptfs as they are)
    run_children(_region_writer, [(str(p), k, k >= 2) for k in range(4)])
    expect = b"".join(pattern(f"region{k}", MiB) for k in range(4))
    check_content(p, expect)
    remount(mount)
    check_content(p, expect)
    fsck_clean(mount)


# -- atomic replacement ---------------------------------------------------------------------------
def _version(i: int) -> bytes:
    return (b"version %06d|" % i) * 700  # 10,500 bytes: three blocks


def _replacer(d: str, n: int) -> None:
    for i in range(1, n + 1):
        tmp = os.path.join(d, "target.tmp")
        with open(tmp, "wb") as f:
            f.write(_version(i))
        os.rename(tmp, os.path.join(d, "target"))


def test_reader_never_sees_atomically_replaced_file_missing(mount: Mount) -> None:
    d = str(mount.mnt)
    target = os.path.join(d, "target")
    with open(target, "wb") as f:
        f.write(_version(0))
    n = 400
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _replacer(d, n)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    seen: set[int] = set()
    reads = enoent = done = status = 0
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            try:
                fd = os.open(target, os.O_RDONLY)
            except FileNotFoundError:
                enoent += 1
                continue
            try:
                data = pread_all(fd)
            finally:
                os.close(fd)
            reads += 1
            v = int(data[8:14])
            assert data == _version(v), f"torn or mixed content in read {reads}"
            seen.add(v)
            if done:
                break
    finally:
        if not done:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert enoent == 0, f"{enoent} of {reads + enoent} opens failed with ENOENT"
    assert n in seen and len(seen) > 10, (reads, len(seen))
    assert sorted(os.listdir(d)) == ["target"]
    assert read_direct(target) == _version(n)
    remount(mount)
    assert read_all(target) == _version(n)
    assert len(backing_names(mount)) == 2
    fsck_clean(mount)
