"""cryptfs.fuse on real mounts: tests/fusefs_memory.py served by the layer, used by real programs.

Each test mounts its own daemon (a subprocess), waits for the mount, fails fast if
the daemon died, and always unmounts in ``finally``.  The daemon's stderr must stay
free of handler failures.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import make_volume, require_fuse, run_cli
from cryptfs.fuse import is_mounted
from cryptfs.fuse.mountpoint import unmount_quietly
from cryptfs.mounttable import mounts_of_backing
from cryptfs.sysio import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from multiuser import ensure_user, run_as, shared_tempdir

pytestmark = pytest.mark.mount
FUSEFS = str(Path(__file__).parent / "fusefs_memory.py")
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


class MemFS:
    """One memory-filesystem daemon on ``mnt``."""

    def __init__(self, mnt: Path, *args: str) -> None:
        self.mnt = mnt
        self.args = list(args)
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> MemFS:
        self.mnt.mkdir(exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, FUSEFS, str(self.mnt), *self.args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 15
        while not is_mounted(str(self.mnt)):
            if self.proc.poll() is not None:
                raise AssertionError(f"memfs exited ({self.proc.returncode}): {self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError("memfs did not mount")
            time.sleep(0.02)
        return self

    def ctl(self, cmd: str) -> dict[str, object]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def stderr(self) -> str:
        assert self.proc is not None and self.proc.stderr
        return self.proc.stderr.read() if self.proc.poll() is not None else ""

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM: the daemon unmounts itself and exits.  Always leaves nothing mounted."""
        assert self.proc is not None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            return self.proc.returncode
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            unmount_quietly(str(self.mnt))


@pytest.fixture
def memfs(tmp_path: Path) -> Iterator[MemFS]:
    require_fuse()
    fs = MemFS(tmp_path / "mnt").start()
    try:
        yield fs
    finally:
        code = fs.stop()
        err = fs.stderr()
        assert code == 0, err
        assert "failed with" not in err, err
        assert not is_mounted(str(fs.mnt))


def run(*cmd: str, cwd: Path | None = None) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert res.returncode == 0, f"{cmd}: {res.stderr}"
    return res.stdout


def test_coreutils_work_on_the_mount(memfs: MemFS, tmp_path: Path) -> None:
    m = memfs.mnt
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    run("cp", str(src), str(m / "copy.bin"))
    assert (m / "copy.bin").read_bytes() == src.read_bytes()
    cat = subprocess.run(["cat", str(m / "copy.bin")], capture_output=True, timeout=60)
    assert cat.returncode == 0 and cat.stdout == src.read_bytes()
    run("dd", f"if={src}", f"of={m / 'dd.bin'}", "bs=64k", "status=none")
    assert run("cmp", str(src), str(m / "dd.bin")) == ""
    run("mkdir", "-p", str(m / "a/b/c"))
    (m / "a/b/c/note.txt").write_text("hello fuse\n")
    run("ln", str(m / "a/b/c/note.txt"), str(m / "hard.txt"))
    run("ln", "-s", "a/b/c/note.txt", str(m / "soft.txt"))
    assert run("cat", str(m / "soft.txt")) == "hello fuse\n"
    assert os.stat(m / "hard.txt").st_nlink == 2
    listing = run("ls", "-l", str(m))
    assert "soft.txt -> a/b/c/note.txt" in listing and "hard.txt" in listing
    run("mv", str(m / "a"), str(m / "moved"))
    assert (m / "moved/b/c/note.txt").read_text() == "hello fuse\n"
    run("rm", "-rf", str(m / "moved"))
    assert sorted(os.listdir(m)) == ["copy.bin", "dd.bin", "hard.txt", "soft.txt"]
    assert (m / "hard.txt").read_text() == "hello fuse\n"   # the other link keeps the data
    assert not (m / "soft.txt").exists()                     # dangling now


def test_python_file_calls(memfs: MemFS) -> None:
    m = memfs.mnt
    p = m / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o640)
    try:
        assert os.pwrite(fd, b"abcdef", 10) == 6
        assert os.pread(fd, 100, 0) == b"\0" * 10 + b"abcdef"
        os.ftruncate(fd, 4)
        assert os.fstat(fd).st_size == 4
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(p, 0o600)
    os.utime(p, ns=(1_000_000_000_123, 2_000_000_000_456))
    st = os.stat(p)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 2_000_000_000_456
    os.truncate(p, 0)
    assert p.read_bytes() == b""
    long_name = "n" * 255
    (m / long_name).write_bytes(b"long")
    assert (m / long_name).read_bytes() == b"long" and long_name in os.listdir(m)
    with pytest.raises(OSError) as info:
        (m / ("n" * 300)).write_bytes(b"x")
    assert info.value.errno == errno.ENAMETOOLONG
    vfs = os.statvfs(m)
    assert vfs.f_bsize == 4096 and vfs.f_namemax == 255
    with pytest.raises(FileNotFoundError):
        os.stat(m / "missing")
    os.mkdir(m / "d")
    (m / "d/x").write_text("x")
    with pytest.raises(OSError) as info:
        os.rmdir(m / "d")
    assert info.value.errno == errno.ENOTEMPTY


def test_rename_flags(memfs: MemFS) -> None:
    m = memfs.mnt
    (m / "a").write_text("A")
    (m / "b").write_text("B")
    with pytest.raises(OSError) as info:
        renameat2(-100, str(m / "a"), -100, str(m / "b"), RENAME_NOREPLACE)
    assert info.value.errno == errno.EEXIST
    renameat2(-100, str(m / "a"), -100, str(m / "b"), RENAME_EXCHANGE)
    assert ((m / "a").read_text(), (m / "b").read_text()) == ("B", "A")
    renameat2(-100, str(m / "a"), -100, str(m / "c"), RENAME_NOREPLACE)
    assert sorted(os.listdir(m)) == ["b", "c"]


def test_fallocate_modes(memfs: MemFS) -> None:
    p = memfs.mnt / "alloc"
    p.write_bytes(b"x" * 8192)
    fd = os.open(p, os.O_RDWR)
    try:
        assert libc.fallocate(fd, 0, 8192, 4096) == 0                      # preallocate, grows
        assert os.fstat(fd).st_size == 12288
        assert libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 65536) == 0      # keep size
        assert os.fstat(fd).st_size == 12288
        assert libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1000, 100) == 0
        assert libc.fallocate(fd, FALLOC_FL_ZERO_RANGE, 4000, 20000) == 0  # zero range, grows
        assert os.fstat(fd).st_size == 24000
        data = os.pread(fd, 30000, 0)
    finally:
        os.close(fd)
    expected = bytearray(b"x" * 8192 + bytes(4096))
    expected[1000:1100] = bytes(100)
    expected[4000:] = bytes(len(expected) - 4000)
    expected.extend(bytes(24000 - len(expected)))
    assert data == bytes(expected)
    fd = os.open(p, os.O_RDWR)
    try:
        res = libc.fallocate(fd, 0x08, 0, 4096)                            # COLLAPSE_RANGE: not here
        assert res == -1 and ctypes.get_errno() == errno.EOPNOTSUPP
    finally:
        os.close(fd)


def test_lseek_and_copy_file_range(memfs: MemFS) -> None:
    m = memfs.mnt
    (m / "src").write_bytes(b"0123456789")
    with open(m / "src", "rb") as s, open(m / "dst", "wb") as d:
        assert os.lseek(s.fileno(), 0, os.SEEK_HOLE) == 10
        assert os.lseek(s.fileno(), 3, os.SEEK_DATA) == 3
        assert os.copy_file_range(s.fileno(), d.fileno(), 6, 2, 0) == 6
    assert (m / "dst").read_bytes() == b"234567"


def test_xattrs(memfs: MemFS) -> None:
    p = memfs.mnt / "x"
    p.write_text("x")
    big = os.urandom(60000)
    os.setxattr(p, "user.small", b"v1")
    os.setxattr(p, "user.big", big)
    assert os.getxattr(p, "user.small") == b"v1" and os.getxattr(p, "user.big") == big
    assert sorted(os.listxattr(p)) == ["user.big", "user.small"]
    with pytest.raises(OSError) as info:
        os.setxattr(p, "user.small", b"v2", os.XATTR_CREATE)
    assert info.value.errno == errno.EEXIST
    os.removexattr(p, "user.small")
    with pytest.raises(OSError) as info:
        os.getxattr(p, "user.small")
    assert info.value.errno == errno.ENODATA
    assert os.listxattr(p) == ["user.big"]


def test_readdirplus_lists_1000_entries_without_lookups(memfs: MemFS) -> None:
    assert memfs.ctl("populate 1000")["ok"]
    memfs.ctl("reset")
    listing = run("ls", "-l", str(memfs.mnt)).splitlines()
    assert len(listing) == 1001 and listing[-1].endswith(" f00999")
    stats = memfs.ctl("stats")
    ops = stats["ops"]
    assert isinstance(ops, dict)
    assert ops.get("readdirplus", 0) >= 2               # more than one buffer's worth
    assert ops.get("lookup", 0) == 0, ops               # every stat answered from readdirplus
    assert (memfs.mnt / "f00500").read_text() == "500\n"


def test_mmap_shared_on_direct_io_files(memfs: MemFS) -> None:
    p = memfs.mnt / "dio-db"
    p.write_bytes(b"\0" * 8192)
    with open(p, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 8192, mmap.MAP_SHARED)
        mm[100:105] = b"hello"
        mm.flush()
        mm.close()
    assert p.read_bytes()[100:105] == b"hello"
    flags = memfs.ctl("stats")["flags"]
    assert isinstance(flags, int) and flags & (1 << 36)


def test_mmap_shared_on_direct_io_needs_the_init_flag(tmp_path: Path) -> None:
    require_fuse()
    fs = MemFS(tmp_path / "mnt", "--no-dio-mmap").start()
    try:
        p = fs.mnt / "dio-db"
        p.write_bytes(b"\0" * 4096)
        with open(p, "r+b") as f, pytest.raises(OSError) as info:
            mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED)
        assert info.value.errno == errno.ENODEV
    finally:
        assert fs.stop() == 0


def test_inval_entry_removes_a_name_deleted_behind_the_kernels_back(tmp_path: Path) -> None:
    require_fuse()
    fs = MemFS(tmp_path / "mnt", "--entry-timeout", "3600").start()
    try:
        p = fs.mnt / "gone"
        p.write_text("x")
        assert fs.ctl("hide gone")["ok"]
        assert p.exists()                    # the kernel trusts its hour-long entry
        assert fs.ctl("inval gone")["ok"]
        assert not p.exists()                # and forgets it when told
        assert "gone" not in os.listdir(fs.mnt)
    finally:
        assert fs.stop() == 0


def test_inval_inode_and_delete_notifications(tmp_path: Path) -> None:
    require_fuse()
    fs = MemFS(tmp_path / "mnt", "--entry-timeout", "3600", "--attr-timeout", "3600").start()
    try:
        p = fs.mnt / "f"
        p.write_text("x")
        os.chmod(p, 0o644)
        assert fs.ctl("chmod f 600")["ok"]
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644     # cached for an hour
        assert fs.ctl("inval-inode f")["ok"]
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600     # asked again
        (fs.mnt / "g").write_text("g")
        assert (fs.mnt / "g").exists()
        assert fs.ctl("delete g")["ok"]
        assert not (fs.mnt / "g").exists() and os.listdir(fs.mnt) == ["f"]
    finally:
        assert fs.stop() == 0


def test_a_blocked_read_is_interrupted_by_a_signal(memfs: MemFS) -> None:
    (memfs.mnt / "block").write_bytes(b"")
    reader = subprocess.Popen([sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read(10)",
                               str(memfs.mnt / "block")])
    deadline = time.monotonic() + 10
    while memfs.ctl("stats")["ops"].get("read", 0) < 1:  # type: ignore[union-attr]
        assert time.monotonic() < deadline and reader.poll() is None
        time.sleep(0.05)
    started = time.monotonic()
    reader.kill()
    reader.wait(10)                          # the daemon's timeout would be 30 s
    assert time.monotonic() - started < 5
    assert memfs.ctl("stats")["interrupts"] == 1
    assert os.listdir(memfs.mnt) == ["block"]   # the loop kept serving


def test_a_users_mount_that_names_a_volume_is_not_taken_for_it(tmp_path: Path,
                                                                 passfile: Path) -> None:
    """Any user may mount a FUSE filesystem of their own whose source field
    names a root-owned volume (fsname=cryptfs:/srv/backing): root's mount of
    that volume was then refused as "already mounted", and rotate and
    recover took the user's mount for the volume's.  Only a mount made by
    root, or by the backing directory's owner, counts now."""
    require_fuse()
    user = "cfs-alice"
    pw = ensure_user(user)
    backing = make_volume(tmp_path / "backing")
    base = shared_tempdir("cryptfs-fuse-")
    fake = base / "fake"
    fake.mkdir()
    os.chown(fake, pw.pw_uid, pw.pw_gid)
    fs = MemFS(fake, "--user", user, "--fsname", f"cryptfs:{backing.resolve()}",
               "--subtype", "cryptfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        fs.start()
        line = next(ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                    if f" {fake} " in ln)
        assert f"fuse.cryptfs cryptfs:{backing.resolve()}" in line, line  # (the forgery holds)
        assert mounts_of_backing(str(backing)) == []
        run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile))
        try:
            assert mounts_of_backing(str(backing)) == [str(mnt)]
            (mnt / "f").write_text("served by the real mount")
        finally:
            run_cli("unmount", str(mnt))
        assert mounts_of_backing(str(backing)) == []
        # the owner of a backing directory may mount it: theirs counts
        os.chown(backing, pw.pw_uid, pw.pw_gid)
        assert mounts_of_backing(str(backing)) == [str(fake)]
    finally:
        fs.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_unprivileged_mount_through_fusermount3() -> None:
    require_fuse()
    user = "cfs-alice"
    pw = ensure_user(user)
    base = shared_tempdir("cryptfs-fuse-")
    mnt = base / "mnt"
    mnt.mkdir()
    os.chown(mnt, pw.pw_uid, pw.pw_gid)
    fs = MemFS(mnt, "--user", user)
    try:
        fs.start()
        line = next(ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                    if f" {mnt} " in ln)
        assert "fuse.memfs" in line and f"user_id={pw.pw_uid}" in line
        assert run_as(user, "sh", "-c", f"echo mine > {mnt}/f && cat {mnt}/f").stdout == b"mine\n"
        st = run_as(user, "stat", "-c", "%u", f"{mnt}/f").stdout.strip()
        assert st == str(pw.pw_uid).encode()
        with pytest.raises(PermissionError):   # no allow_other: not even root gets in
            os.listdir(mnt)
        assert fs.stop() == 0                  # SIGTERM -> fusermount3 -u
        assert not is_mounted(str(mnt))
    finally:
        fs.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_sigterm_unmounts_even_while_the_mount_is_busy(tmp_path: Path) -> None:
    require_fuse()
    fs = MemFS(tmp_path / "mnt").start()
    try:
        (fs.mnt / "f").write_text("held")
        holder = subprocess.Popen(["sleep", "60"], cwd=fs.mnt)   # a cwd inside: EBUSY
        try:
            assert fs.proc is not None
            fs.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while is_mounted(str(fs.mnt)):                      # detached lazily at once
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert fs.proc.poll() is None                       # still serving the holder
        finally:
            holder.kill()
            holder.wait()
        assert fs.proc.wait(10) == 0                            # then ends cleanly (ENODEV)
        assert "failed with" not in fs.stderr()
    finally:
        fs.stop()


def test_writeback_cache_mount(tmp_path: Path) -> None:
    require_fuse()
    fs = MemFS(tmp_path / "mnt", "--writeback").start()
    try:
        data = os.urandom(1 << 20)
        (fs.mnt / "w").write_bytes(data)
        with open(fs.mnt / "w", "r+b") as f:
            f.seek(5)
            f.write(b"XYZ")
        expected = data[:5] + b"XYZ" + data[8:]
        assert (fs.mnt / "w").read_bytes() == expected
        assert fs.ctl("stats")["flags"] & (1 << 16)  # type: ignore[operator]
    finally:
        assert fs.stop() == 0


