"""POSIX behaviour of a real cryptfs mount: names, directories, links, renames, metadata.

Every test works through the kernel on a live FUSE mount and checks what a
real filesystem would give: bytes, sizes, names and errno values.  The data
path (truncate, sparse files, mmap, concurrency, the randomized shadow test)
is in test_posix_io.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

from conftest import Mount, daemon_gone, run_cli

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


# -- helpers -------------------------------------------------------------------------------
def renameat2(old: Path | str | bytes, new: Path | str | bytes, flags: int) -> None:
    res = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new),
                          ctypes.c_uint(flags))
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(new))


def errno_of(fn, *args, **kwargs) -> int:  # type: ignore[no-untyped-def]
    """Run ``fn`` and return the errno it fails with (failing the test if it succeeds)."""
    try:
        fn(*args, **kwargs)
    except OSError as e:
        return int(e.errno or 0)
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} unexpectedly succeeded")


def tree_dir(m: Mount) -> Path:
    return m.backing / "tree"


def backing_names(m: Mount) -> list[str]:
    """Every backing name below tree/ (relative paths), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(tree_dir(m)):
        rel = os.path.relpath(dirpath, tree_dir(m))
        for n in dirnames + filenames:
            out.append(os.path.normpath(os.path.join(rel, n)))
    return sorted(out)


def check_backing_layout(m: Mount) -> dict[str, int]:
    """The backing tree holds no stray side files: every directory has its
    .diriv, every ``L.<h>.name`` has its ``L.<h>`` and vice versa, and no
    temporaries (``T.*``) or other dotted names are left.  Returns counts."""
    counts = {"dirs": 0, "long": 0, "short": 0}
    for dirpath, dirnames, filenames in os.walk(tree_dir(m)):
        names = set(dirnames) | set(filenames)
        counts["dirs"] += 1
        assert ".diriv" in filenames, f"{dirpath} has no .diriv"
        for n in names:
            if n == ".diriv":
                continue
            if "." not in n:
                counts["short"] += 1
                continue
            assert n.startswith("L."), f"stray backing entry {dirpath}/{n}"
            if n.endswith(".name"):
                assert n[: -len(".name")] in names, f"orphan side file {dirpath}/{n}"
                assert os.path.isfile(os.path.join(dirpath, n))
            else:
                assert n.count(".") == 1, f"stray backing entry {dirpath}/{n}"
                assert n + ".name" in names, f"long entry without side file {dirpath}/{n}"
                counts["long"] += 1
    return counts


def stop_mount(m: Mount) -> None:
    """Unmount and wait until the daemon has exited.

    Like ``Mount.stop`` but does not wait for the zombie to be reaped (the
    sandbox's init reaps only every few seconds)."""
    pid = m.pid
    if os.path.ismount(m.mnt):
        res = subprocess.run(["fusermount3", "-u", str(m.mnt)], capture_output=True)
        assert res.returncode == 0, res.stderr  # no descriptor may be left open
    deadline = time.monotonic() + 10
    while not daemon_gone(pid):
        assert time.monotonic() < deadline, f"daemon {pid} did not exit"
        time.sleep(0.01)
    assert not os.path.ismount(m.mnt)


def fsck_clean(m: Mount) -> str:
    """Unmount and run ``cryptfs fsck``; it must report a clean volume."""
    stop_mount(m)
    res = run_cli("fsck", str(m.backing), "--passphrase-file", str(m.passfile))
    assert res.stdout.rstrip().endswith("clean"), res.stdout
    assert "damaged" not in res.stdout
    return res.stdout


def fsck_and_remount(m: Mount) -> str:
    """Unmount, check the volume with fsck (must be clean), mount again."""
    out = fsck_clean(m)
    m.start()
    return out


def remount(m: Mount) -> None:
    stop_mount(m)
    m.start()


def name_of_len(prefix: str, n: int) -> str:
    assert len(prefix) <= n
    return prefix + "x" * (n - len(prefix))


# -- regular files and directories -----------------------------------------------------------
def test_regular_file_basics(mount: Mount) -> None:
    p = mount.path("a.txt")
    assert errno_of(os.open, p, os.O_RDONLY) == errno.ENOENT
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
    try:
        assert os.fstat(fd).st_size == 0
        assert os.read(fd, 100) == b""
        assert os.write(fd, b"hello world") == 11
        assert os.pread(fd, 5, 6) == b"world"
        assert os.pread(fd, 100, 11) == b""
        assert os.pread(fd, 100, 1000) == b""
        assert os.fstat(fd).st_size == 11
    finally:
        os.close(fd)
    st = os.stat(p)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == 11 and st.st_nlink == 1
    assert errno_of(os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600) == errno.EEXIST
    # a file used as a directory
    assert errno_of(os.open, mount.path("a.txt", "sub"), os.O_RDONLY) == errno.ENOTDIR
    assert errno_of(os.mkdir, mount.path("a.txt", "sub")) == errno.ENOTDIR
    # O_TRUNC empties it
    with open(p, "wb") as f:
        f.write(b"new")
    assert p.read_bytes() == b"new"
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert p.read_bytes() == b"" and p.stat().st_size == 0
    p.write_bytes(b"persisted")
    # empty file stays empty and readable after remount
    mount.path("empty").touch()
    remount(mount)
    assert p.read_bytes() == b"persisted"
    assert mount.path("empty").read_bytes() == b"" and mount.path("empty").stat().st_size == 0
    os.unlink(p)
    assert errno_of(os.stat, p) == errno.ENOENT
    assert errno_of(os.unlink, p) == errno.ENOENT
    assert sorted(os.listdir(mount.mnt)) == ["empty"]
    fsck_clean(mount)


def test_directories(mount: Mount) -> None:
    d = mount.path("d")
    os.mkdir(d, 0o750)
    st = os.stat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert st.st_nlink == 2
    assert errno_of(os.mkdir, d) == errno.EEXIST
    os.makedirs(mount.path("d", "e", "f", "g"))
    os.mkdir(mount.path("d", "e2"))
    assert os.stat(d).st_nlink == 4  # ., .. of e, .. of e2
    mount.path("d", "file").write_bytes(b"in d")
    mount.path("d", "e", "f", "g", "deep").write_bytes(b"deep down")
    assert sorted(os.listdir(d)) == ["e", "e2", "file"]
    kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
             for e in os.scandir(d)}
    assert kinds == {"e": (True, False), "e2": (True, False), "file": (False, True)}
    inos = {e.name: e.inode() for e in os.scandir(d)}
    assert inos["file"] == os.stat(mount.path("d", "file")).st_ino
    assert inos["e"] == os.stat(mount.path("d", "e")).st_ino
    assert errno_of(os.rmdir, d) == errno.ENOTEMPTY
    assert errno_of(os.rmdir, mount.path("d", "file")) == errno.ENOTDIR
    assert errno_of(os.unlink, mount.path("d", "e")) in (errno.EISDIR, errno.EPERM)
    assert errno_of(os.open, d, os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.rmdir, mount.path("nope")) == errno.ENOENT
    os.rmdir(mount.path("d", "e2"))
    assert os.stat(d).st_nlink == 3
    # creating and removing entries moves the directory's mtime
    os.utime(d, ns=(10**18, 10**18))
    mount.path("d", "tmpfile").write_bytes(b"")
    t_created = os.stat(d).st_mtime_ns
    assert t_created > 10**18
    os.utime(d, ns=(10**18, 10**18))
    os.unlink(mount.path("d", "tmpfile"))
    assert os.stat(d).st_mtime_ns > 10**18
    # ".." resolves to the parent, listing of the root is exact
    assert os.stat(mount.path("d", "e", "..")).st_ino == os.stat(d).st_ino
    assert sorted(os.listdir(mount.mnt)) == ["d"]
    remount(mount)
    assert mount.path("d", "e", "f", "g", "deep").read_bytes() == b"deep down"
    assert sorted(os.listdir(d)) == ["e", "file"]
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750
    # the backing tree holds one directory per directory, names encrypted
    names = backing_names(mount)
    assert not any(n in x for x in names for n in ("deep", "file", "/d/"))
    counts = check_backing_layout(mount)
    assert counts["dirs"] == 5  # root, d, e, f, g
    fsck_clean(mount)


# -- symlinks -------------------------------------------------------------------------------
def test_symlinks(mount: Mount) -> None:
    mount.path("target.txt").write_bytes(b"target content")
    os.mkdir(mount.path("dir"))
    mount.path("dir", "inner").write_bytes(b"inner content")
    os.symlink("target.txt", mount.path("rel"))
    os.symlink(str(mount.path("dir")), mount.path("abs_dir"))
    os.symlink("does/not/exist", mount.path("dangling"))
    assert os.readlink(mount.path("rel")) == "target.txt"
    assert mount.path("rel").read_bytes() == b"target content"
    assert mount.path("abs_dir", "inner").read_bytes() == b"inner content"
    assert sorted(os.listdir(mount.path("abs_dir"))) == ["inner"]
    lst = os.lstat(mount.path("rel"))
    assert stat.S_ISLNK(lst.st_mode) and lst.st_size == len("target.txt")
    assert os.stat(mount.path("rel")).st_ino == os.stat(mount.path("target.txt")).st_ino
    # dangling
    assert os.path.lexists(mount.path("dangling")) and not os.path.exists(mount.path("dangling"))
    assert os.readlink(mount.path("dangling")) == "does/not/exist"
    assert errno_of(os.open, mount.path("dangling"), os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.open, mount.path("rel"), os.O_RDONLY | os.O_NOFOLLOW) == errno.ELOOP
    assert errno_of(os.symlink, "x", mount.path("rel")) == errno.EEXIST
    assert errno_of(os.readlink, mount.path("target.txt")) == errno.EINVAL
    # creating the target through a dangling link's directory makes it resolve
    os.symlink("later", mount.path("to_later"))
    mount.path("later").write_bytes(b"now here")
    assert mount.path("to_later").read_bytes() == b"now here"
    # targets of many lengths, with bytes that are not UTF-8
    targets = {
        b"t1": b"a",
        b"t255": b"d/" * 127 + b"e",
        b"t1000": (b"seg\xff\xfe/" * 200)[:1000],
        b"t2999": b"y" * 2999,
        b"t3000": (b"long/" * 600)[:3000],
    }
    for name, target in targets.items():
        os.symlink(target, os.path.join(bytes(mount.mnt), name))
    for too_long in (3001, 4000, 4095):
        assert errno_of(os.symlink, b"z" * too_long,
                        os.path.join(bytes(mount.mnt), b"bad%d" % too_long)) == errno.ENAMETOOLONG
    for name, target in targets.items():
        p = os.path.join(bytes(mount.mnt), name)
        assert os.readlink(p) == target
        assert os.lstat(p).st_size == len(target)
    # the backing symlinks hold no plaintext target
    for dirpath, _dirs, files in os.walk(tree_dir(mount)):
        for n in files:
            full = os.path.join(dirpath, n)
            if os.path.islink(full):
                raw = os.readlink(full)
                assert "target" not in raw and "does" not in raw and "long/" not in raw
    remount(mount)
    for name, target in targets.items():
        assert os.readlink(os.path.join(bytes(mount.mnt), name)) == target
    assert os.readlink(mount.path("dangling")) == "does/not/exist"
    assert mount.path("rel").read_bytes() == b"target content"
    assert sorted(os.listdir(mount.mnt)) == sorted(
        ["target.txt", "dir", "rel", "abs_dir", "dangling", "to_later", "later"]
        + [n.decode() for n in targets])
    # removing a link leaves its target
    os.unlink(mount.path("rel"))
    assert mount.path("target.txt").read_bytes() == b"target content"
    out = fsck_clean(mount)
    assert "8 symlinks" in out  # abs_dir, dangling, to_later and the five long ones


# -- hard links -----------------------------------------------------------------------------
def test_hard_links(mount: Mount) -> None:
    a = mount.path("a")
    a.write_bytes(b"shared content")
    os.mkdir(mount.path("sub"))
    os.link(a, mount.path("b"))
    os.link(mount.path("b"), mount.path("sub", "c"))
    for p in (a, mount.path("b"), mount.path("sub", "c")):
        st = os.stat(p)
        assert st.st_nlink == 3 and st.st_ino == os.stat(a).st_ino
        assert p.read_bytes() == b"shared content"
    # a write through one name is seen through the others (open and closed)
    with open(mount.path("b"), "r+b") as f:
        f.seek(0)
        f.write(b"SHARED")
    assert a.read_bytes() == b"SHARED content"
    fd = os.open(mount.path("sub", "c"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b" + more")
        assert a.read_bytes() == b"SHARED content + more"
        assert os.stat(a).st_size == len(b"SHARED content + more")
    finally:
        os.close(fd)
    os.chmod(a, 0o600)
    assert stat.S_IMODE(os.stat(mount.path("sub", "c")).st_mode) == 0o600
    assert errno_of(os.link, a, mount.path("b")) == errno.EEXIST
    assert errno_of(os.link, mount.path("sub"), mount.path("sublink")) == errno.EPERM
    assert errno_of(os.link, mount.path("missing"), mount.path("x")) == errno.ENOENT
    # unlink one name: the others keep the data
    os.unlink(a)
    assert os.stat(mount.path("b")).st_nlink == 2
    assert mount.path("sub", "c").read_bytes() == b"SHARED content + more"
    remount(mount)
    assert os.stat(mount.path("b")).st_nlink == 2
    assert os.stat(mount.path("b")).st_ino == os.stat(mount.path("sub", "c")).st_ino
    assert mount.path("b").read_bytes() == b"SHARED content + more"
    os.unlink(mount.path("b"))
    st = os.stat(mount.path("sub", "c"))
    assert st.st_nlink == 1 and st.st_size == len(b"SHARED content + more")
    assert mount.path("sub", "c").read_bytes() == b"SHARED content + more"
    # a hard link to a symlink is a second symlink with the same target
    os.symlink("sub/c", mount.path("sl"))
    os.link(mount.path("sl"), mount.path("sl2"), follow_symlinks=False)
    assert os.readlink(mount.path("sl2")) == "sub/c"
    assert os.lstat(mount.path("sl")).st_nlink == 2
    assert mount.path("sl2").read_bytes() == b"SHARED content + more"
    assert sorted(os.listdir(mount.mnt)) == ["sl", "sl2", "sub"]
    fsck_clean(mount)


# -- rename ----------------------------------------------------------------------------------
def test_rename_over_existing_file(mount: Mount) -> None:
    mount.path("src").write_bytes(b"source")
    mount.path("dst").write_bytes(b"destination, longer")
    fd = os.open(mount.path("dst"), os.O_RDONLY)  # the replaced file stays readable
    try:
        src_ino = os.stat(mount.path("src")).st_ino
        os.rename(mount.path("src"), mount.path("dst"))
        assert sorted(os.listdir(mount.mnt)) == ["dst"]
        assert mount.path("dst").read_bytes() == b"source"
        assert os.stat(mount.path("dst")).st_ino == src_ino
        assert os.stat(mount.path("dst")).st_size == 6
        assert os.pread(fd, 100, 0) == b"destination, longer"
    finally:
        os.close(fd)
    assert errno_of(os.stat, mount.path("src")) == errno.ENOENT
    # rename onto itself and onto a hard link of itself change nothing
    os.rename(mount.path("dst"), mount.path("dst"))
    os.link(mount.path("dst"), mount.path("hl"))
    os.rename(mount.path("dst"), mount.path("hl"))
    assert sorted(os.listdir(mount.mnt)) == ["dst", "hl"]
    assert mount.path("hl").read_bytes() == b"source"
    # a file cannot replace a directory, nor a directory a file
    os.mkdir(mount.path("dir"))
    assert errno_of(os.rename, mount.path("dst"), mount.path("dir")) == errno.EISDIR
    assert errno_of(os.rename, mount.path("dir"), mount.path("dst")) == errno.ENOTDIR
    assert errno_of(os.rename, mount.path("nope"), mount.path("x")) == errno.ENOENT
    remount(mount)
    assert mount.path("dst").read_bytes() == b"source"
    assert sorted(os.listdir(mount.mnt)) == ["dir", "dst", "hl"]
    check_backing_layout(mount)
    fsck_clean(mount)


def test_rename_across_directories(mount: Mount) -> None:
    os.makedirs(mount.path("a", "deep"))
    os.mkdir(mount.path("b"))
    mount.path("a", "deep", "f").write_bytes(b"moving file")
    mount.path("b", "g").write_bytes(b"to be replaced")
    os.rename(mount.path("a", "deep", "f"), mount.path("b", "f"))
    assert os.listdir(mount.path("a", "deep")) == []
    assert mount.path("b", "f").read_bytes() == b"moving file"
    os.rename(mount.path("b", "f"), mount.path("a", "g2"))
    os.rename(mount.path("a", "g2"), mount.path("b", "g"))
    assert sorted(os.listdir(mount.path("b"))) == ["g"]
    assert mount.path("b", "g").read_bytes() == b"moving file"
    # the same plaintext name in two directories has different backing names
    mount.path("a", "same").write_bytes(b"1")
    mount.path("b", "same").write_bytes(b"2")
    os.rename(mount.path("a", "same"), mount.path("a", "deep", "same"))
    assert mount.path("a", "deep", "same").read_bytes() == b"1"
    assert mount.path("b", "same").read_bytes() == b"2"
    remount(mount)
    assert sorted(os.listdir(mount.path("a"))) == ["deep"]
    assert sorted(os.listdir(mount.path("a", "deep"))) == ["same"]
    assert sorted(os.listdir(mount.path("b"))) == ["g", "same"]
    assert mount.path("b", "g").read_bytes() == b"moving file"
    assert mount.path("a", "deep", "same").read_bytes() == b"1"
    check_backing_layout(mount)
    fsck_clean(mount)


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "f1": b"one",
        "sub/f2": b"two" * 3000,
        "sub/deeper/f3": b"",
        "sub/deeper/f4": bytes(range(256)) * 40,
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.symlink("sub/f2", root / "link")
    return files


def _check_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data, rel
    assert os.readlink(root / "link") == "sub/f2"
    assert (root / "link").read_bytes() == files["sub/f2"]
    assert sorted(os.listdir(root)) == ["f1", "link", "sub"]
    assert sorted(os.listdir(root / "sub")) == ["deeper", "f2"]


def test_rename_directories(mount: Mount) -> None:
    os.mkdir(mount.path("x"))
    os.mkdir(mount.path("y"))
    files = _make_tree(mount.path("x", "tree"))
    nlink_x, nlink_y = os.stat(mount.path("x")).st_nlink, os.stat(mount.path("y")).st_nlink
    os.rename(mount.path("x", "tree"), mount.path("y", "moved"))
    assert os.listdir(mount.path("x")) == []
    assert os.stat(mount.path("x")).st_nlink == nlink_x - 1
    assert os.stat(mount.path("y")).st_nlink == nlink_y + 1
    _check_tree(mount.path("y", "moved"), files)
    # over an empty directory
    os.mkdir(mount.path("empty"))
    os.rename(mount.path("y", "moved"), mount.path("empty"))
    _check_tree(mount.path("empty"), files)
    assert sorted(os.listdir(mount.mnt)) == ["empty", "x", "y"]
    # onto a non-empty directory: ENOTEMPTY, both untouched
    os.mkdir(mount.path("full"))
    mount.path("full", "keep").write_bytes(b"keep me")
    assert errno_of(os.rename, mount.path("empty"), mount.path("full")) == errno.ENOTEMPTY
    assert errno_of(os.rename, mount.path("x"), mount.path("full")) == errno.ENOTEMPTY
    assert mount.path("full", "keep").read_bytes() == b"keep me"
    _check_tree(mount.path("empty"), files)
    # a directory cannot move into itself
    assert errno_of(os.rename, mount.path("empty"), mount.path("empty", "sub", "in")) == \
        errno.EINVAL
    # rename a directory that was opened and is being listed
    dfd = os.open(mount.path("empty", "sub"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(mount.path("empty"), mount.path("renamed"))
        assert sorted(os.listdir(dfd)) == ["deeper", "f2"]
    finally:
        os.close(dfd)
    remount(mount)
    _check_tree(mount.path("renamed"), files)
    assert sorted(os.listdir(mount.mnt)) == ["full", "renamed", "x", "y"]
    counts = check_backing_layout(mount)
    assert counts["dirs"] == 7  # root, x, y, full, renamed, sub, deeper
    fsck_clean(mount)


def test_renameat2_noreplace(mount: Mount) -> None:
    mount.path("a").write_bytes(b"A")
    mount.path("b").write_bytes(b"B")
    os.mkdir(mount.path("d"))
    assert errno_of(renameat2, mount.path("a"), mount.path("b"), RENAME_NOREPLACE) == errno.EEXIST
    assert errno_of(renameat2, mount.path("d"), mount.path("b"), RENAME_NOREPLACE) == errno.EEXIST
    assert mount.path("a").read_bytes() == b"A" and mount.path("b").read_bytes() == b"B"
    renameat2(mount.path("a"), mount.path("d", "c"), RENAME_NOREPLACE)
    assert mount.path("d", "c").read_bytes() == b"A"
    assert sorted(os.listdir(mount.mnt)) == ["b", "d"]
    long_new = name_of_len("long-", 230)
    renameat2(mount.path("d", "c"), mount.path(long_new), RENAME_NOREPLACE)
    assert mount.path(long_new).read_bytes() == b"A"
    assert errno_of(renameat2, mount.path("b"), mount.path(long_new), RENAME_NOREPLACE) == \
        errno.EEXIST
    assert sorted(os.listdir(mount.mnt)) == sorted(["b", "d", long_new])
    remount(mount)
    assert mount.path(long_new).read_bytes() == b"A"
    assert mount.path("b").read_bytes() == b"B"
    assert check_backing_layout(mount)["long"] == 1
    fsck_clean(mount)


def test_renameat2_whiteout_is_refused_not_taken_for_a_plain_rename(mount: Mount) -> None:
    """RENAME_WHITEOUT (4, overlayfs's) leaves a whiteout where the source was;
    cryptfs cannot, and did a plain rename instead. Root may ask for it (it
    needs CAP_MKNOD): the answer is EINVAL, as from a filesystem without it."""
    mount.path("a").write_bytes(b"stays")
    assert errno_of(renameat2, mount.path("a"), mount.path("b"), 4) == errno.EINVAL
    assert mount.path("a").read_bytes() == b"stays" and not mount.path("b").exists()


def test_renameat2_exchange(mount: Mount) -> None:
    os.mkdir(mount.path("d1"))
    os.mkdir(mount.path("d2"))
    mount.path("d1", "f").write_bytes(b"file in d1")
    mount.path("d2", "g").write_bytes(b"file in d2, longer")
    ino_f = os.stat(mount.path("d1", "f")).st_ino
    renameat2(mount.path("d1", "f"), mount.path("d2", "g"), RENAME_EXCHANGE)
    assert mount.path("d1", "f").read_bytes() == b"file in d2, longer"
    assert mount.path("d2", "g").read_bytes() == b"file in d1"
    assert os.stat(mount.path("d2", "g")).st_ino == ino_f
    # a file and a directory trade places
    os.mkdir(mount.path("d2", "sub"))
    mount.path("d2", "sub", "inner").write_bytes(b"inner")
    renameat2(mount.path("d1", "f"), mount.path("d2", "sub"), RENAME_EXCHANGE)
    assert mount.path("d1", "f", "inner").read_bytes() == b"inner"
    assert mount.path("d2", "sub").read_bytes() == b"file in d2, longer"
    assert os.path.isdir(mount.path("d1", "f")) and os.path.isfile(mount.path("d2", "sub"))
    # long and short names, in different directories
    long1 = name_of_len("L1-", 200)
    long2 = name_of_len("L2-", 255)
    mount.path("d1", long1).write_bytes(b"long one")
    mount.path("d2", long2).write_bytes(b"long two")
    renameat2(mount.path("d1", long1), mount.path("d2", long2), RENAME_EXCHANGE)
    renameat2(mount.path("d1", long1), mount.path("d1", "f"), RENAME_EXCHANGE)
    assert mount.path("d1", "f").read_bytes() == b"long two"
    assert mount.path("d1", long1, "inner").read_bytes() == b"inner"
    assert mount.path("d2", long2).read_bytes() == b"long one"
    assert errno_of(renameat2, mount.path("d1", "f"), mount.path("d1", "missing"),
                    RENAME_EXCHANGE) == errno.ENOENT
    assert errno_of(renameat2, mount.path("d1", "f"), mount.path("d2"),
                    RENAME_EXCHANGE | RENAME_NOREPLACE) == errno.EINVAL
    remount(mount)
    assert sorted(os.listdir(mount.path("d1"))) == sorted(["f", long1])
    assert sorted(os.listdir(mount.path("d2"))) == sorted(["g", "sub", long2])
    assert mount.path("d1", "f").read_bytes() == b"long two"
    assert mount.path("d1", long1, "inner").read_bytes() == b"inner"
    assert mount.path("d2", long2).read_bytes() == b"long one"
    assert mount.path("d2", "g").read_bytes() == b"file in d1"
    assert mount.path("d2", "sub").read_bytes() == b"file in d2, longer"
    assert check_backing_layout(mount)["long"] == 2
    fsck_clean(mount)


# -- names ------------------------------------------------------------------------------------
def test_name_length_limits(mount: Mount) -> None:
    mnt = bytes(mount.mnt)
    n255 = b"n" * 255
    utf8_255 = "\u00e9".encode() * 127 + b"z"  # 127 two-byte characters + 1 = 255 bytes
    assert len(utf8_255) == 255
    for n in (n255, utf8_255):
        with open(os.path.join(mnt, n), "wb") as f:
            f.write(n[:10])
    os.mkdir(os.path.join(mnt, b"d" * 255))
    os.symlink(b"t", os.path.join(mnt, b"s" * 255))
    for bad in (b"n" * 256, "\u00e9".encode() * 128, b"q" * 1000):
        p = os.path.join(mnt, bad)
        assert errno_of(os.open, p, os.O_CREAT | os.O_WRONLY, 0o644) == errno.ENAMETOOLONG
        assert errno_of(os.mkdir, p) == errno.ENAMETOOLONG
        assert errno_of(os.symlink, b"t", p) == errno.ENAMETOOLONG
        assert errno_of(os.rename, os.path.join(mnt, n255), p) == errno.ENAMETOOLONG
        assert errno_of(os.stat, p) == errno.ENAMETOOLONG
    assert sorted(os.listdir(mnt)) == sorted([n255, utf8_255, b"d" * 255, b"s" * 255])
    # rename between 255-byte names and short names, and into the 255-byte directory
    os.rename(os.path.join(mnt, n255), os.path.join(mnt, b"d" * 255, b"m" * 255))
    os.rename(os.path.join(mnt, utf8_255), os.path.join(mnt, b"short"))
    os.rename(os.path.join(mnt, b"short"), os.path.join(mnt, b"r" * 255))
    remount(mount)
    assert sorted(os.listdir(mnt)) == sorted([b"r" * 255, b"d" * 255, b"s" * 255])
    assert os.listdir(os.path.join(mnt, b"d" * 255)) == [b"m" * 255]
    with open(os.path.join(mnt, b"d" * 255, b"m" * 255), "rb") as f:
        assert f.read() == n255[:10]
    with open(os.path.join(mnt, b"r" * 255), "rb") as f:
        assert f.read() == utf8_255[:10]
    assert os.readlink(os.path.join(mnt, b"s" * 255)) == b"t"
    # backing names never exceed NAME_MAX
    for n in backing_names(mount):
        assert len(os.path.basename(n)) <= 255
    assert check_backing_layout(mount)["long"] == 4
    fsck_clean(mount)


def test_non_utf8_names(mount: Mount) -> None:
    mnt = bytes(mount.mnt)
    names = [b"\xff\xfe", b"latin1-\xe9t\xe9", b"\x80", b"ctl\x01\x7f", b"a\xc3(" * 70]
    for i, n in enumerate(names):
        with open(os.path.join(mnt, n), "wb") as f:
            f.write(b"content %d" % i)
    os.mkdir(os.path.join(mnt, b"dir\xfe"))
    assert sorted(os.listdir(mnt)) == sorted(names + [b"dir\xfe"])
    assert sorted(e.name for e in os.scandir(mnt)) == sorted(names + [b"dir\xfe"])
    for i, n in enumerate(names):
        assert os.stat(os.path.join(mnt, n)).st_size == len(b"content %d" % i)
    # rename between non-UTF-8 names, into the non-UTF-8 directory
    os.rename(os.path.join(mnt, b"\xff\xfe"), os.path.join(mnt, b"dir\xfe", b"\xfe\xff"))
    os.rename(os.path.join(mnt, b"a\xc3(" * 70), os.path.join(mnt, b"dir\xfe", b"\xc0" * 200))
    assert sorted(os.listdir(os.path.join(mnt, b"dir\xfe"))) == [b"\xc0" * 200, b"\xfe\xff"]
    # names differing only in case or normalisation are distinct
    with open(os.path.join(mnt, "caf\u00e9".encode()), "wb") as f:
        f.write(b"nfc")
    with open(os.path.join(mnt, "cafe\u0301".encode()), "wb") as f:
        f.write(b"nfd")
    with open(os.path.join(mnt, b"CTL\x01\x7f"), "wb") as f:
        f.write(b"upper")
    remount(mount)
    with open(os.path.join(mnt, b"dir\xfe", b"\xfe\xff"), "rb") as f:
        assert f.read() == b"content 0"
    with open(os.path.join(mnt, b"dir\xfe", b"\xc0" * 200), "rb") as f:
        assert f.read() == b"content 4"
    with open(os.path.join(mnt, "caf\u00e9".encode()), "rb") as f:
        assert f.read() == b"nfc"
    with open(os.path.join(mnt, "cafe\u0301".encode()), "rb") as f:
        assert f.read() == b"nfd"
    with open(os.path.join(mnt, b"ctl\x01\x7f"), "rb") as f:
        assert f.read() == b"content 3"
    assert sorted(os.listdir(mnt)) == sorted([
        b"latin1-\xe9t\xe9", b"\x80", b"ctl\x01\x7f", b"CTL\x01\x7f", b"dir\xfe",
        "caf\u00e9".encode(), "cafe\u0301".encode()])
    for n in list(os.listdir(mnt)):
        p = os.path.join(mnt, n)
        if os.path.isdir(p):
            for m in os.listdir(p):
                os.unlink(os.path.join(p, m))
            os.rmdir(p)
        else:
            os.unlink(p)
    assert os.listdir(mnt) == []
    assert backing_names(mount) == [".diriv"]
    fsck_clean(mount)


def test_long_names_and_side_files(mount: Mount) -> None:
    """Names > 175 bytes are stored as L.<hash> plus a side file; every
    operation on them keeps exactly one side file per long entry."""
    long_a = name_of_len("file-a-", 176)
    long_b = name_of_len("file-b-", 240)
    long_c = name_of_len("file-c-", 255)
    long_d = name_of_len("dir-", 200)
    long_s = name_of_len("sym-", 180)
    os.mkdir(mount.path("p"))
    os.mkdir(mount.path("q"))
    mount.path("p", long_a).write_bytes(b"AAA")
    mount.path("p", "short").write_bytes(b"SHORT")
    os.mkdir(mount.path("p", long_d))
    mount.path("p", long_d, long_b).write_bytes(b"BBB")
    os.symlink(long_a, mount.path("p", long_s))
    os.link(mount.path("p", long_a), mount.path("q", long_c))
    assert check_backing_layout(mount)["long"] == 5
    assert sorted(os.listdir(mount.path("p"))) == sorted([long_a, "short", long_d, long_s])
    assert mount.path("p", long_s).read_bytes() == b"AAA"
    assert os.stat(mount.path("q", long_c)).st_nlink == 2
    # 175 bytes is still a short backing name
    mount.path("q", name_of_len("edge-", 175)).write_bytes(b"175")
    assert check_backing_layout(mount)["long"] == 5
    # long -> long in another directory
    os.rename(mount.path("p", long_a), mount.path("q", long_b))
    check_backing_layout(mount)
    # long -> short, short -> long
    os.rename(mount.path("q", long_b), mount.path("p", "now-short"))
    os.rename(mount.path("p", "short"), mount.path("q", long_a))
    check_backing_layout(mount)
    # a long-named directory with contents moves out and back in
    os.rename(mount.path("p", long_d), mount.path("q", "d-short"))
    assert mount.path("q", "d-short", long_b).read_bytes() == b"BBB"
    os.rename(mount.path("q", "d-short"), mount.path("q", long_d))
    assert mount.path("q", long_d, long_b).read_bytes() == b"BBB"
    # a long name moved out of its directory and over an existing long name
    os.rename(mount.path("q", long_d, long_b), mount.path("q", long_a))  # replaces SHORT
    assert mount.path("q", long_a).read_bytes() == b"BBB"
    assert os.listdir(mount.path("q", long_d)) == []
    # a long-named directory over an empty long-named directory elsewhere
    long_e = name_of_len("empty-dir-", 210)
    os.mkdir(mount.path("p", long_e))
    os.mkdir(mount.path("p", long_e, "child"))
    mount.path("p", long_e, "child", "x").write_bytes(b"xx")
    os.mkdir(mount.path("q", long_e))
    os.rename(mount.path("p", long_e), mount.path("q", long_e))
    assert mount.path("q", long_e, "child", "x").read_bytes() == b"xx"
    check_backing_layout(mount)
    assert errno_of(os.rename, mount.path("q", long_d), mount.path("q", long_e)) == \
        errno.ENOTEMPTY
    os.unlink(mount.path("q", long_e, "child", "x"))
    os.rmdir(mount.path("q", long_e, "child"))
    os.rename(mount.path("q", long_d), mount.path("q", long_e))  # long over empty long
    os.rename(mount.path("q", long_e), mount.path("q", long_d))
    check_backing_layout(mount)
    # same directory, long -> long
    os.rename(mount.path("q", long_a), mount.path("q", long_b))
    assert mount.path("q", long_b).read_bytes() == b"BBB"
    counts = check_backing_layout(mount)
    assert counts["long"] == 4  # p/long_s, q/long_c, q/long_d, q/long_b
    expect_p = sorted(["now-short", long_s])
    expect_q = sorted([long_c, long_d, long_b, name_of_len("edge-", 175)])
    assert sorted(os.listdir(mount.path("p"))) == expect_p
    assert sorted(os.listdir(mount.path("q"))) == expect_q
    assert mount.path("p", "now-short").read_bytes() == b"AAA"
    assert mount.path("q", long_c).read_bytes() == b"AAA"
    assert os.stat(mount.path("q", long_c)).st_nlink == 2
    remount(mount)
    assert sorted(os.listdir(mount.path("p"))) == expect_p
    assert sorted(os.listdir(mount.path("q"))) == expect_q
    assert mount.path("q", long_b).read_bytes() == b"BBB"
    assert os.readlink(mount.path("p", long_s)) == long_a
    # removal of every kind of long entry removes its side file
    os.unlink(mount.path("p", long_s))
    os.unlink(mount.path("q", long_c))
    os.rmdir(mount.path("q", long_d))
    os.unlink(mount.path("q", long_b))
    assert check_backing_layout(mount)["long"] == 0
    assert not any(os.path.basename(n).startswith("L.") for n in backing_names(mount))
    assert mount.path("p", "now-short").read_bytes() == b"AAA"
    assert os.stat(mount.path("p", "now-short")).st_nlink == 1
    fsck_clean(mount)


# -- extended attributes -----------------------------------------------------------------------
def test_user_xattrs(mount: Mount) -> None:
    f = mount.path("f")
    f.write_bytes(b"data")
    os.mkdir(mount.path("d"))
    big = bytes((i * 7 + 3) % 256 for i in range(3500))
    values = {
        "user.plain": b"PLAINTEXT-XATTR-VALUE",
        "user.empty": b"",
        "user.binary": bytes(range(256)),
        "user.nul": b"\x00\x00a\x00",
        "user.\u00e9t\u00e9": "\u00fcnicode".encode(),
    }
    for k, v in values.items():
        os.setxattr(f, k, v)
    os.setxattr(mount.path("d"), "user.on-dir", b"DIRECTORY-XATTR")
    os.setxattr(mount.path("d"), "user.big", big)
    for k, v in values.items():
        assert os.getxattr(f, k) == v
    assert os.getxattr(mount.path("d"), "user.big") == big
    assert os.getxattr(mount.path("d"), "user.on-dir") == b"DIRECTORY-XATTR"
    assert sorted(os.listxattr(f)) == sorted(values)
    assert sorted(os.listxattr(mount.path("d"))) == ["user.big", "user.on-dir"]
    assert errno_of(os.getxattr, f, "user.missing") == errno.ENODATA
    assert errno_of(os.removexattr, f, "user.missing") == errno.ENODATA
    assert errno_of(os.setxattr, f, "user.plain", b"x", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, f, "user.new", b"x", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(f, "user.plain", b"replaced", os.XATTR_REPLACE)
    os.setxattr(f, "user.created", b"created", os.XATTR_CREATE)
    assert os.getxattr(f, "user.plain") == b"replaced"
    os.removexattr(f, "user.binary")
    assert errno_of(os.getxattr, f, "user.binary") == errno.ENODATA
    expect = dict(values, **{"user.plain": b"replaced", "user.created": b"created"})
    del expect["user.binary"]
    assert sorted(os.listxattr(f)) == sorted(expect)
    # only user.* is stored; other namespaces are refused
    for ns in ("trusted.x", "security.x"):
        e = errno_of(os.setxattr, f, ns, b"v")
        assert e in (errno.EOPNOTSUPP, errno.EPERM), (ns, errno.errorcode.get(e))
        assert errno_of(os.getxattr, f, ns) in (errno.ENODATA, errno.EOPNOTSUPP)
    assert sorted(os.listxattr(f)) == sorted(expect)
    # user.* on a symlink: not permitted, as on Linux filesystems
    os.symlink("f", mount.path("sl"))
    assert errno_of(os.setxattr, mount.path("sl"), "user.x", b"v",
                    follow_symlinks=False) == errno.EPERM
    # xattrs of hard links are shared; they survive rename
    os.link(f, mount.path("f2"))
    assert os.getxattr(mount.path("f2"), "user.plain") == b"replaced"
    os.rename(f, mount.path("d", "moved"))
    f = mount.path("d", "moved")
    # the backing objects hold neither plaintext names nor values
    for dirpath, dirs, files in os.walk(tree_dir(mount)):
        for n in dirs + files:
            full = os.path.join(dirpath, n)
            if os.path.islink(full):
                continue
            for xn in os.listxattr(full):
                if xn == "user.cryptfs-layout":  # the size hint of FORMAT.md: 3 bytes
                    assert len(os.getxattr(full, xn)) == 3
                    continue
                assert xn.startswith("user.cryptfs."), xn
                raw = os.getxattr(full, xn)
                for word in (b"plain", b"PLAINTEXT", b"DIRECTORY", b"created", b"replaced",
                             "\u00fcnicode".encode(), b"on-dir", big[:64]):
                    assert word not in xn.encode() and word not in raw
    remount(mount)
    for k, v in expect.items():
        assert os.getxattr(f, k) == v
    assert sorted(os.listxattr(f)) == sorted(expect)
    assert os.getxattr(mount.path("d"), "user.big") == big
    assert f.read_bytes() == b"data"
    fsck_clean(mount)


# -- metadata ----------------------------------------------------------------------------------
def test_chmod_chown_utimens(mount: Mount) -> None:
    f = mount.path("f")
    f.write_bytes(b"meta")
    os.mkdir(mount.path("d"))
    os.symlink("f", mount.path("sl"))
    for mode in (0o600, 0o644, 0o4755, 0o2711, 0o1777, 0o000):
        os.chmod(f, mode)
        assert stat.S_IMODE(os.stat(f).st_mode) == mode
    os.chmod(f, 0o640)
    os.chmod(mount.path("d"), 0o711)
    assert stat.S_IMODE(os.stat(mount.path("d")).st_mode) == 0o711
    assert stat.S_ISDIR(os.stat(mount.path("d")).st_mode)
    # chown, with -1 keeping a field
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(f, -1, 4321)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    os.chown(f, 2000, -1)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (2000, 4321)
    os.chown(mount.path("d"), 3000, 3001)
    # lchown changes the link, not the target
    os.lchown(mount.path("sl"), 4000, 4001)
    lst = os.lstat(mount.path("sl"))
    assert (lst.st_uid, lst.st_gid) == (4000, 4001)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (2000, 4321)
    # new entries belong to the creator (root)
    mount.path("mine").write_bytes(b"")
    assert (os.stat(mount.path("mine")).st_uid, os.stat(mount.path("mine")).st_gid) == (0, 0)
    # utimens with nanoseconds
    t_a, t_m = 1_234_567_890_123_456_789, 1_111_111_111_987_654_321
    os.utime(f, ns=(t_a, t_m))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (t_a, t_m)
    os.utime(mount.path("d"), ns=(t_a + 1, t_m + 1))
    assert os.stat(mount.path("d")).st_mtime_ns == t_m + 1
    # UTIME_OMIT keeps one of the two times
    omit = (1 << 30) - 2

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    ts = (Timespec * 2)(Timespec(77, 123), Timespec(0, omit))
    assert _libc.utimensat(AT_FDCWD, os.fsencode(f), ts, 0) == 0
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (77_000_000_123, t_m)
    ts = (Timespec * 2)(Timespec(0, omit), Timespec(88, 456))
    assert _libc.utimensat(AT_FDCWD, os.fsencode(f), ts, 0) == 0
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (77_000_000_123, 88_000_000_456)
    os.utime(f, ns=(t_a, t_m))
    # on the symlink itself (AT_SYMLINK_NOFOLLOW): the target's times stay
    os.utime(mount.path("sl"), ns=(500_000_000_001, 600_000_000_002), follow_symlinks=False)
    lst = os.lstat(mount.path("sl"))
    assert (lst.st_atime_ns, lst.st_mtime_ns) == (500_000_000_001, 600_000_000_002)
    assert os.stat(f).st_mtime_ns == t_m
    # utime(None) sets "now"; a write moves mtime forward
    before = time.time_ns()
    os.utime(mount.path("mine"))
    assert os.stat(mount.path("mine")).st_mtime_ns >= before - 2_000_000_000
    future = 4_000_000_000 * 10**9  # year 2096
    os.utime(mount.path("mine"), ns=(future, future))
    assert os.stat(mount.path("mine")).st_mtime_ns == future
    with open(mount.path("mine"), "ab") as fh:
        fh.write(b"x")
    assert before - 2_000_000_000 <= os.stat(mount.path("mine")).st_mtime_ns < future
    # size is plaintext size, not backing size
    assert os.stat(f).st_size == 4
    remount(mount)
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (2000, 4321)
    assert (st.st_atime_ns, st.st_mtime_ns) == (t_a, t_m)
    st = os.stat(mount.path("d"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (3000, 3001, 0o711)
    lst = os.lstat(mount.path("sl"))
    assert (lst.st_uid, lst.st_gid, lst.st_mtime_ns) == (4000, 4001, 600_000_000_002)
    assert f.read_bytes() == b"meta"
    fsck_clean(mount)


def test_statvfs(mount: Mount) -> None:
    sv = os.statvfs(mount.mnt)
    assert sv.f_namemax == 255
    assert sv.f_bsize > 0 and sv.f_frsize > 0
    assert sv.f_blocks > 0 and 0 <= sv.f_bavail <= sv.f_bfree <= sv.f_blocks
    assert sv.f_files > 0 and 0 <= sv.f_ffree <= sv.f_files
    back = os.statvfs(mount.backing)
    # the numbers are those of the backing filesystem
    assert sv.f_blocks * sv.f_frsize == back.f_blocks * back.f_frsize
    # the data occupies backing space, and the free space reported is the backing's
    fd = os.open(mount.path("big"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        chunk = os.urandom(1 << 20)
        for _ in range(16):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.stat(mount.path("big")).st_size == 16 << 20
    assert os.stat(mount.path("big")).st_blocks * 512 >= 16 << 20
    sv2, back2 = os.statvfs(mount.path("big")), os.statvfs(mount.backing)
    assert sv2.f_namemax == 255
    assert abs(sv2.f_bfree * sv2.f_frsize - back2.f_bfree * back2.f_frsize) < 256 << 20


# -- many entries ------------------------------------------------------------------------------
def test_ten_thousand_entries(mount: Mount) -> None:
    n = 10_000
    d = mount.path("many")
    os.mkdir(d)
    t0 = time.monotonic()
    # every 20th name is long (> 175 bytes: hashed backing name plus side file)
    names = [f"entry-{i:05d}-{'x' * (i % 40)}" if i % 20 else f"long-{i:05d}-{'y' * 200}"
             for i in range(n)]
    for i, name in enumerate(names):
        fd = os.open(os.path.join(d, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            if i % 100 == 0:
                os.write(fd, name.encode())
        finally:
            os.close(fd)
    assert len(os.listdir(d)) == n
    assert sorted(os.listdir(d)) == sorted(names)
    seen = {}
    with os.scandir(d) as it:
        for e in it:
            seen[e.name] = (e.is_file(follow_symlinks=False), e.inode())
    assert sorted(seen) == sorted(names)
    assert all(kind for kind, _ in seen.values())
    assert len({ino for _, ino in seen.values()}) == n
    for i, name in enumerate(names):
        st = os.stat(os.path.join(d, name))
        assert st.st_size == (len(name) if i % 100 == 0 else 0)
        assert st.st_ino == seen[name][1]
    assert (d / names[500]).read_bytes() == names[500].encode()
    assert check_backing_layout(mount)["long"] == n // 20
    remount(mount)
    assert sorted(os.listdir(d)) == sorted(names)
    assert (d / names[9900]).read_bytes() == names[9900].encode()
    for name in names:
        os.unlink(os.path.join(d, name))
    assert os.listdir(d) == []
    assert list(os.scandir(d)) == []
    os.rmdir(d)
    assert os.listdir(mount.mnt) == []
    assert backing_names(mount) == [".diriv"]
    assert time.monotonic() - t0 < 60


def test_readdir_while_directory_changes(mount: Mount) -> None:
    """Entries neither added nor removed during a listing appear exactly once."""
    d = mount.path("churn")
    os.mkdir(d)
    n = 3000
    for i in range(n):
        os.close(os.open(os.path.join(d, f"f{i:04d}"), os.O_CREAT | os.O_WRONLY, 0o644))
    seen: list[str] = []
    with os.scandir(d) as it:
        for k, e in enumerate(it):
            seen.append(e.name)
            if k == 100:
                for i in range(0, n, 2):  # remove the even ones, add new ones
                    name = f"f{i:04d}"
                    if name not in seen:
                        os.unlink(os.path.join(d, name))
                for i in range(500):
                    os.close(os.open(os.path.join(d, f"new{i}"), os.O_CREAT | os.O_WRONLY))
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    stable = {f"f{i:04d}" for i in range(1, n, 2)}
    assert stable <= set(seen)
    assert set(seen) <= {f"f{i:04d}" for i in range(n)} | {f"new{i}" for i in range(500)}
    final = set(os.listdir(d))
    assert final == stable | {f"f{i:04d}" for i in range(0, n, 2) if f"f{i:04d}" in
                              set(seen[:101])} | {f"new{i}" for i in range(500)}


def test_create_mode_is_not_masked_by_the_daemon(mount: Mount) -> None:
    """The caller's umask applies to new entries, the daemon's does not.

    With umask 0, open(O_CREAT, 0666) must give a 0666 file (as mkdir(0777)
    gives a 0777 directory); the mount daemon runs with umask 022."""
    old = os.umask(0o022)
    try:
        remount(mount)  # the daemon inherits umask 022 from the CLI
        os.umask(0)
        os.close(os.open(mount.path("f666"), os.O_CREAT | os.O_WRONLY, 0o666))
        os.close(os.open(mount.path("f777"), os.O_CREAT | os.O_WRONLY, 0o777))
        os.mkdir(mount.path("d777"), 0o777)
        os.mkfifo(mount.path("fifo666"), 0o666)
        os.umask(0o077)
        os.close(os.open(mount.path("f600"), os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(mount.path("d700"), 0o777)
    finally:
        os.umask(old)
    modes = {n: oct(stat.S_IMODE(os.stat(mount.path(n)).st_mode))
             for n in ("f666", "f777", "d777", "fifo666", "f600", "d700")}
    assert modes == {"f666": "0o666", "f777": "0o777", "d777": "0o777", "fifo666": "0o666",
                     "f600": "0o600", "d700": "0o700"}


def test_setgid_directories_and_special_files(mount: Mount) -> None:
    d = mount.path("sg")
    os.mkdir(d)
    os.chown(d, 0, 777)
    os.chmod(d, 0o2775)
    os.mkdir(d / "sub", 0o755)
    (d / "f").write_bytes(b"x")
    os.symlink("f", d / "l")
    for n in ("sub", "f", "l"):
        assert os.lstat(d / n).st_gid == 777, n
    assert os.stat(d / "sub").st_mode & stat.S_ISGID  # inherited by subdirectories
    assert not os.stat(d / "f").st_mode & stat.S_ISGID
    # FIFOs and sockets are allowed, device nodes are not
    os.mkfifo(mount.path("fifo"))
    assert stat.S_ISFIFO(os.stat(mount.path("fifo")).st_mode)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(mount.path("sock")))
    finally:
        s.close()
    assert stat.S_ISSOCK(os.stat(mount.path("sock")).st_mode)
    assert errno_of(os.mknod, mount.path("null"), stat.S_IFCHR | 0o600,
                    os.makedev(1, 3)) == errno.EPERM
    # a FIFO on the mount passes data between a writer and a reader
    rfd = os.open(mount.path("fifo"), os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(mount.path("fifo"), os.O_WRONLY)
    try:
        os.write(wfd, b"through the fifo")
        assert os.read(rfd, 100) == b"through the fifo"
    finally:
        os.close(wfd)
        os.close(rfd)
    # open(O_CREAT) through a dangling symlink creates its target
    os.symlink("created-via-link", mount.path("dl"))
    fd = os.open(mount.path("dl"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"via link")
    finally:
        os.close(fd)
    assert mount.path("created-via-link").read_bytes() == b"via link"
    remount(mount)
    assert stat.S_ISFIFO(os.stat(mount.path("fifo")).st_mode)
    assert stat.S_ISSOCK(os.stat(mount.path("sock")).st_mode)
    assert os.lstat(d / "f").st_gid == 777 and os.stat(d).st_mode & stat.S_ISGID
    assert sorted(os.listdir(mount.mnt)) == ["created-via-link", "dl", "fifo", "sg", "sock"]
    fsck_clean(mount)


def test_copy_and_names_like_cryptfs_metadata(mount: Mount) -> None:
    """Plaintext names that look like cryptfs's own backing names are ordinary
    names; copies (sendfile, copy_file_range) give identical bytes."""
    tricky = [".diriv", "L.abc", "L.abc.name", "T.0123456789abcdef", ".hidden", "..."]
    data = os.urandom(100_000)
    for n in tricky:
        mount.path(n).write_bytes(n.encode() + data[:1000])
    assert sorted(os.listdir(mount.mnt)) == sorted(tricky)
    for n in tricky:
        assert mount.path(n).read_bytes() == n.encode() + data[:1000]
    mount.path("src").write_bytes(data)
    shutil.copyfile(mount.path("src"), mount.path("copy1"))
    src = os.open(mount.path("src"), os.O_RDONLY)
    dst = os.open(mount.path("copy2"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        copied = 0
        while copied < len(data):
            n = os.copy_file_range(src, dst, len(data) - copied)
            assert n > 0
            copied += n
    finally:
        os.close(src)
        os.close(dst)
    assert mount.path("copy1").read_bytes() == data
    assert mount.path("copy2").read_bytes() == data
    remount(mount)
    assert sorted(os.listdir(mount.mnt)) == sorted(tricky + ["src", "copy1", "copy2"])
    assert mount.path("copy2").read_bytes() == data
    assert mount.path(".diriv").read_bytes() == b".diriv" + data[:1000]
    check_backing_layout(mount)
    fsck_clean(mount)
