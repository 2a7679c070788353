"""fallocate(2) on a real mount: preallocate, keep size, punch hole, zero range.

The modes are driven by real programs (util-linux ``fallocate``) and by
``os.posix_fallocate``; content is checked through the page cache and with
O_DIRECT (from the daemon), after a remount, and with fsck.  On the shared
mount, the attacks: an agent punching or zeroing through its masked view, and
a supervisor's zero range into a file an agent holds (its reads must end).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_masking import EACCES_LINE, OWN_HANDLE, _policy
from test_posix import fsck_clean, remount
from test_posix_io import check_content, pattern

from conftest import Mount
from multiuser import ScriptHolder, Shared, run_as

BS = 4096
MiB = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("fallocate") is None, reason="util-linux fallocate")


def backing_file(m: Mount) -> Path:
    (only,) = [Path(d, n) for d, _, fs in os.walk(m.backing / "tree") for n in fs
               if n != ".diriv"]
    return only


def fallocate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fallocate", *map(str, args)], capture_output=True, text=True,
                          check=False)


def test_posix_fallocate_grows_the_file_with_reserved_zeros(mount: Mount) -> None:
    p = mount.path("db")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"head")
        os.posix_fallocate(fd, 0, 3 * MiB + 5)
        assert os.fstat(fd).st_size == 3 * MiB + 5
        os.posix_fallocate(fd, 0, 10)  # (inside: nothing changes)
        assert os.fstat(fd).st_size == 3 * MiB + 5
    finally:
        os.close(fd)
    expect = b"head" + bytes(3 * MiB + 1)
    check_content(p, expect)
    # Reserved: the backing file holds (about) the whole ciphertext, no hole.
    assert os.stat(backing_file(mount)).st_blocks * 512 >= 3 * MiB
    assert b"head" not in backing_file(mount).read_bytes()
    remount(mount)
    check_content(p, expect)
    fsck_clean(mount)


def test_keep_size_reserves_without_growing(mount: Mount) -> None:
    p = mount.path("log")
    p.write_bytes(b"x" * 100)
    before = os.stat(backing_file(mount)).st_blocks
    res = fallocate("-n", "-l", MiB, p)
    assert res.returncode == 0, res.stderr
    assert os.stat(p).st_size == 100
    assert os.stat(backing_file(mount)).st_blocks * 512 >= before * 512 + MiB - BS
    check_content(p, b"x" * 100)
    remount(mount)
    check_content(p, b"x" * 100)
    fsck_clean(mount)


def test_punch_hole_reads_zeros_and_frees_whole_blocks(mount: Mount) -> None:
    p = mount.path("img")
    data = bytearray(pattern("img", 64 * BS + 123))
    p.write_bytes(data)
    full = os.stat(backing_file(mount)).st_blocks
    res = fallocate("-p", "-o", 5000, "-l", 40 * BS, p)  # partial blocks at both ends
    assert res.returncode == 0, res.stderr
    data[5000:5000 + 40 * BS] = bytes(40 * BS)
    assert os.stat(p).st_size == len(data)
    check_content(p, bytes(data))
    assert os.stat(backing_file(mount)).st_blocks < full - 30 * BS // 512  # holes, really
    # The final block (and a range past the end) is zeroed, never a hole; the size stays.
    res = fallocate("-p", "-o", 63 * BS, "-l", 10 * BS, p)
    assert res.returncode == 0, res.stderr
    data[63 * BS:] = bytes(len(data) - 63 * BS)
    check_content(p, bytes(data))
    remount(mount)
    check_content(p, bytes(data))
    fsck_clean(mount)


def test_zero_range_inside_and_past_the_end(mount: Mount) -> None:
    p = mount.path("vm")
    data = bytearray(pattern("vm", 10 * BS + 7))
    p.write_bytes(data)
    res = fallocate("-z", "-o", 100, "-l", 9000, p)
    assert res.returncode == 0, res.stderr
    data[100:9100] = bytes(9000)
    check_content(p, bytes(data))
    res = fallocate("-z", "-o", 10 * BS, "-l", 3 * BS, p)  # past the end: grows
    assert res.returncode == 0, res.stderr
    data[10 * BS:] = bytes(3 * BS)
    check_content(p, bytes(data))
    res = fallocate("-z", "-n", "-o", 12 * BS, "-l", 5 * BS, p)  # keep size: zeros up to the end
    assert res.returncode == 0, res.stderr
    data[12 * BS:] = bytes(len(data) - 12 * BS)
    check_content(p, bytes(data))
    remount(mount)
    check_content(p, bytes(data))
    fsck_clean(mount)


def _written_by(pid: int) -> int:
    """Bytes the process has passed to write(2) and friends (/proc/PID/io wchar)."""
    io = dict(ln.split(": ") for ln in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(io["wchar"])


def test_a_large_zero_range_writes_no_zeros(mount: Mount) -> None:
    """A zero range was written as sealed blocks of zeros, one after another on
    the request loop: a user's ZERO_RANGE of 3 GiB over a file grown sparse held
    every other user of a shared mount for 3.6 s.  Whole blocks now become
    holes, as for PUNCH_HOLE, and are reserved again."""
    p = mount.path("disk.img")
    data = bytearray(pattern("disk", 3 * BS + 10))
    p.write_bytes(data)
    os.truncate(p, 256 * MiB)  # (cheap: the file grows sparse)
    data += bytes(256 * MiB - len(data))
    before = _written_by(mount.pid)
    res = fallocate("-z", "-o", 1000, "-l", 256 * MiB - 2000, p)
    assert res.returncode == 0, res.stderr
    assert _written_by(mount.pid) - before < 64 * 1024  # (the two edge blocks, the header)
    data[1000:256 * MiB - 1000] = bytes(256 * MiB - 2000)
    assert os.stat(p).st_size == 256 * MiB
    assert os.stat(backing_file(mount)).st_blocks * 512 >= 250 * MiB  # (space stays allocated)
    with open(p, "rb") as f:
        assert f.read(3 * BS + 10) == bytes(data[:3 * BS + 10])
        f.seek(256 * MiB - 5000)
        assert f.read() == bytes(data[-5000:])
    remount(mount)
    check_content(p, bytes(data))
    fsck_clean(mount)


def test_modes_it_cannot_do_are_refused_and_change_nothing(mount: Mount) -> None:
    p = mount.path("f")
    data = pattern("f", 8 * BS)
    p.write_bytes(data)
    for flag in ("-c", "-i"):  # collapse range, insert range
        res = fallocate(flag, "-o", BS, "-l", BS, p)
        assert res.returncode != 0 and "not supported" in res.stderr, (flag, res.stderr)
    check_content(p, data)


# -- the shared mount: who may change what -----------------------------------------------------
CSV = b"surname,gender,phone\nWang,F,13812341234\nSmith,M,13912345678\n"


def test_an_agent_cannot_punch_or_zero_through_its_masked_view(shared: Shared) -> None:
    """A masked view may only append rows; fallocate would overwrite (punch,
    zero) or extend the bytes the agent cannot see: refused, file intact."""
    for who in ("root", "cfs-alice", "cfs-carol"):
        assert shared.unlock(who).returncode == 0
    shared.path("calls").mkdir(mode=0o777)
    os.chmod(shared.path("calls"), 0o777)
    f = shared.path("calls", "customers.csv")
    f.write_bytes(CSV)
    os.chmod(f, 0o666)
    _policy(shared, "--mask", "*.csv", "--column", "surname=keep", "--column", "gender=keep",
            "--column", "phone=first:3")
    assert b"13812341234" not in run_as("cfs-alice", "cat", str(f)).stdout  # (a masked view)
    for args in (("-p", "-o", "0", "-l", "30"), ("-z", "-o", "0", "-l", "30"),
                 ("-l", "100000"), ("-n", "-l", "100000")):
        res = run_as("cfs-alice", "fallocate", *args, str(f))
        assert res.returncode != 0 and b"Permission denied" in res.stderr, (args, res.stderr)
    assert run_as("cfs-carol", "cat", str(f)).stdout == CSV
    assert os.stat(f).st_size == len(CSV)


def test_a_zero_range_by_someone_else_ends_the_agents_own_reads(shared: Shared) -> None:
    """fallocate changes the plaintext like a write: a file an agent created under
    a mask and holds open, zeroed by a supervisor, is no longer the agent's own."""
    for who in ("root", "cfs-alice", "cfs-carol"):
        assert shared.unlock(who).returncode == 0
    shared.path("calls").mkdir(mode=0o777)
    os.chmod(shared.path("calls"), 0o777)
    _policy(shared, "--mask", "*.csv", "--column", "surname=keep")
    f = shared.path("calls", "own.csv")
    holder = ScriptHolder("cfs-alice", f, OWN_HANDLE)
    try:
        assert holder.do("write customer_id,pin,surname") == "written"
        assert holder.do("write CUST-9,0000,Agent") == "written"
        assert holder.do("read") != EACCES_LINE
        res = run_as("cfs-carol", "fallocate", "-z", "-o", "5", "-l", "10", str(f))
        assert res.returncode == 0, res.stderr
        assert holder.do("read") == EACCES_LINE
    finally:
        holder.end()
