"""The request handlers called directly, without a mount."""

from __future__ import annotations

import errno
import logging
import os
import stat

import pytest

from conftest import unlock
from cryptfs.fuse import FuseError
from cryptfs.fuse.requests import EmptyIn
from cryptfs.ops import ROOT, CryptOperations

CTX = EmptyIn()  # the request as a handler sees it: uid 0, gid 0
CTX.uid = CTX.gid = CTX.pid = 0


@pytest.fixture(autouse=True)
def daemon_umask():
    """The mount daemon runs with umask 0 (the kernel applies the caller's);
    so do these tests, restoring the test process's umask afterwards."""
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.fixture
def ops(backing):
    vol = unlock(backing)
    o = CryptOperations(vol)
    yield o
    o.close()
    vol.close()


def run(handler, *args):
    return handler(*args)


def test_create_write_read_lookup(ops) -> None:
    fi, attr = run(ops.create, ROOT, b"a.txt", stat.S_IFREG | 0o640, os.O_RDWR, CTX)
    assert stat.S_IMODE(attr.attr.mode) == 0o640 and attr.attr.size == 0
    assert run(ops.write, fi.fh, 0, b"hello world") == 11
    assert run(ops.read, fi.fh, 6, 100) == b"world"
    run(ops.release, fi.fh)
    entry = run(ops.lookup, ROOT, b"a.txt", CTX)
    assert entry.nodeid == attr.nodeid and entry.attr.size == 11
    fi2 = run(ops.open, entry.nodeid, os.O_RDONLY, CTX)
    assert run(ops.read, fi2.fh, 0, 100) == b"hello world"
    run(ops.release, fi2.fh)
    missing = run(ops.lookup, ROOT, b"nope", CTX)
    assert missing.nodeid == 0  # a cacheable negative entry


def test_names_symlinks_and_xattrs_are_encrypted_below(ops, backing) -> None:
    d = run(ops.mkdir, ROOT, b"Customers", stat.S_IFDIR | 0o755, CTX)
    run(ops.symlink, d.nodeid, b"link", b"/secret/target", CTX)
    fi, f = run(ops.create, d.nodeid, b"zhang.csv", stat.S_IFREG | 0o600, os.O_RDWR, CTX)
    run(ops.release, fi.fh)
    run(ops.setxattr, f.nodeid, b"user.owner", b"Zhang Wei", CTX)
    assert run(ops.getxattr, f.nodeid, b"user.owner", CTX) == b"Zhang Wei"
    assert run(ops.listxattr, f.nodeid, CTX) == [b"user.owner"]
    link = run(ops.lookup, d.nodeid, b"link", CTX)
    assert run(ops.readlink, link.nodeid, CTX) == b"/secret/target"
    assert link.attr.size == len(b"/secret/target")
    everything = b""
    for root, dirs, files in os.walk(backing / "tree"):
        for n in dirs + files:
            everything += n.encode() + b"\n"
            p = os.path.join(root, n)
            if os.path.islink(p):
                everything += os.readlink(p).encode()
            elif os.path.isfile(p):
                everything += open(p, "rb").read()
                everything += b"".join(os.getxattr(p, x) + x.encode() for x in os.listxattr(p))
    for plain in (b"Customers", b"zhang", b"link", b"/secret/target", b"Zhang Wei", b"owner"):
        assert plain not in everything


def test_errors_come_out_as_fuse_errors(ops) -> None:
    with pytest.raises(FuseError) as e:
        run(ops.mkdir, ROOT, b"x" * 256, stat.S_IFDIR | 0o755, CTX)
    assert e.value.errno == errno.ENAMETOOLONG
    run(ops.mkdir, ROOT, b"d", stat.S_IFDIR | 0o755, CTX)
    with pytest.raises(FuseError) as e:
        run(ops.mkdir, ROOT, b"d", stat.S_IFDIR | 0o755, CTX)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(FuseError) as e:
        run(ops.unlink, ROOT, b"absent", CTX)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(FuseError) as e:
        run(ops.setxattr, ROOT, b"trusted.x", b"v", CTX)
    assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(FuseError) as e:
        run(ops.mknod, ROOT, b"dev", stat.S_IFCHR | 0o600, os.makedev(1, 3), CTX)
    assert e.value.errno == errno.EPERM


def test_corrupt_block_is_eio_and_one_log_line(ops, backing, caplog) -> None:
    fi, attr = run(ops.create, ROOT, b"f", stat.S_IFREG | 0o600, os.O_RDWR, CTX)
    run(ops.write, fi.fh, 0, b"S" * 20000)
    run(ops.release, fi.fh)
    (victim,) = [p for p in (backing / "tree").iterdir() if "." not in p.name]
    raw = bytearray(victim.read_bytes())
    raw[-100] ^= 0x40  # inside the final block
    victim.write_bytes(bytes(raw))
    fi = run(ops.open, attr.nodeid, os.O_RDONLY, CTX)
    assert run(ops.read, fi.fh, 0, 4096) == b"S" * 4096  # block 0 is intact
    with caplog.at_level(logging.ERROR, logger="cryptfs"), pytest.raises(FuseError) as e:
        run(ops.read, fi.fh, 16384, 4096)
    assert e.value.errno == errno.EIO
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"integrity failure: inode {attr.nodeid} block 4: authentication failed"]
    assert run(ops.read, fi.fh, 4096, 10) == b"S" * 10  # the handler survived
    run(ops.release, fi.fh)


def test_rename_and_link_keep_inode_and_content(ops) -> None:
    d1 = run(ops.mkdir, ROOT, b"d1", stat.S_IFDIR | 0o755, CTX)
    d2 = run(ops.mkdir, ROOT, b"d2", stat.S_IFDIR | 0o755, CTX)
    fi, f = run(ops.create, d1.nodeid, b"f", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    run(ops.write, fi.fh, 0, b"payload")
    run(ops.rename, d1.nodeid, b"f", d2.nodeid, b"g", 0, CTX)
    assert run(ops.read, fi.fh, 0, 100) == b"payload"  # still open across the rename
    run(ops.release, fi.fh)
    moved = run(ops.lookup, d2.nodeid, b"g", CTX)
    assert moved.nodeid == f.nodeid
    linked = run(ops.link, f.nodeid, d1.nodeid, b"h", CTX)
    assert linked.attr.nlink == 2
    run(ops.unlink, d2.nodeid, b"g", CTX)
    h = run(ops.lookup, d1.nodeid, b"h", CTX)
    assert h.attr.nlink == 1 and h.attr.size == 7


def test_failed_create_of_a_long_name_leaves_no_side_file(tmp_path) -> None:
    """Out of inodes: the create fails, and neither its side file nor a
    temporary is left behind to make the directory look non-empty."""
    import subprocess

    from conftest import make_volume

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=40", "tmpfs", str(small)],
                   check=True)
    try:
        vol = unlock(make_volume(small / "backing"))
        o = CryptOperations(vol)
        try:
            d = run(o.mkdir, ROOT, b"d", stat.S_IFDIR | 0o755, CTX)
            i = 0
            with pytest.raises(FuseError) as e:
                while True:  # use up the inodes
                    fi, _ = run(o.create, ROOT, b"f%d" % i, stat.S_IFREG | 0o644, os.O_RDWR, CTX)
                    run(o.release, fi.fh)
                    i += 1
            assert e.value.errno == errno.ENOSPC
            with pytest.raises(FuseError) as e:
                run(o.create, d.nodeid, b"L" * 200, stat.S_IFREG | 0o644, os.O_RDWR, CTX)
            assert e.value.errno == errno.ENOSPC
            sub = next(p for p in (small / "backing" / "tree").iterdir() if p.is_dir())
            assert sorted(p.name for p in sub.iterdir()) == [".diriv"]
            run(o.rmdir, ROOT, b"d", CTX)  # empty, so it can go
            assert run(o.lookup, ROOT, b"d", CTX).nodeid == 0
        finally:
            o.close()
            vol.close()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_config_that_could_not_be_read_is_tried_again(ops, backing, caplog) -> None:
    """A re-read of the config that fails for a while (here: out of descriptors, as a
    storage outage would make it fail) is tried again at the next look; a change made
    meanwhile is not left unseen until the config changes once more."""
    import resource
    import time

    from cryptfs import follow

    vol = unlock(backing)
    try:
        vol.update_config(lambda c: setattr(c.slots[0], "label", "changed"))
    finally:
        vol.close()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
    try:
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as e:
                assert e.errno == errno.EMFILE
                break
        with caplog.at_level(logging.WARNING, logger="cryptfs"):
            assert ops._refresh_config() == set()  # the stat works, the read does not
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "the volume's config changed but cannot be used" in caplog.text
    assert ops.config.slots[0].label == "owner"
    ops._refresh_config()  # at once: not read on every request while it fails
    assert ops.config.slots[0].label == "owner"
    time.sleep(follow.CHECK_EVERY)
    ops._refresh_config()
    assert ops.config.slots[0].label == "changed"
    assert caplog.text.count("cannot be used") == 1


def _ctx(uid: int) -> EmptyIn:
    c = EmptyIn()
    c.uid = c.gid = uid
    c.pid = 0
    return c


def test_a_create_that_meets_another_servers_file_opens_it_by_its_mode(backing) -> None:
    """Two servers' mounts of one backing directory: server A's create without
    O_EXCL finds the name that server B made after A's lookup (the publish meets
    EEXIST).  A opens B's file as open(2) would, after checking the file's mode
    itself (the kernel checked only the directory); O_EXCL stays EEXIST."""
    vols = [unlock(backing), unlock(backing)]
    a, b = (CryptOperations(v, shared_storage=True) for v in vols)
    try:
        fi, _ = run(b.create, ROOT, b"x", stat.S_IFREG | 0o600, os.O_RDWR, _ctx(1000))
        run(b.write, fi.fh, 0, b"written on server B")
        run(b.release, fi.fh)
        with pytest.raises(FuseError) as e:  # not the owner: 0600 keeps it out
            run(a.create, ROOT, b"x", stat.S_IFREG | 0o666, os.O_RDWR, _ctx(2000))
        assert e.value.errno == errno.EACCES
        with pytest.raises(FuseError) as e:
            run(a.create, ROOT, b"x", stat.S_IFREG | 0o600, os.O_RDWR | os.O_EXCL, _ctx(1000))
        assert e.value.errno == errno.EEXIST
        fi, attr = run(a.create, ROOT, b"x", stat.S_IFREG | 0o666, os.O_RDWR, _ctx(1000))
        assert stat.S_IMODE(attr.attr.mode) == 0o600 and attr.attr.uid == 1000  # B's file
        assert run(a.read, fi.fh, 0, 100) == b"written on server B"  # not a new, empty one
        run(a.release, fi.fh)
        names = [n for n in os.listdir(backing / "tree") if not n.startswith(".")]
        assert len(names) == 1  # and no temporary of A's left beside it
    finally:
        a.close()
        b.close()
        for v in vols:
            v.close()


def test_only_the_most_recent_headers_are_kept_between_opens(ops, monkeypatch) -> None:
    """A header kept between opens costs about 2.4 KB: beyond KEPT_HEADERS the one
    kept longest ago goes (that file's next open authenticates it in full); a
    forgotten inode keeps none; dropping the keys drops them all."""
    import cryptfs.fs.core as core

    monkeypatch.setattr(core, "KEPT_HEADERS", 3)
    made = []
    for i in range(5):
        fi, entry = run(ops.create, ROOT, f"f{i}".encode(), stat.S_IFREG | 0o600, os.O_RDWR, CTX)
        assert run(ops.write, fi.fh, 0, f"content {i}".encode()) == 9
        run(ops.release, fi.fh)
        made.append(ops._inodes[entry.nodeid])
    assert [i.checked is not None for i in made] == [False, False, True, True, True]
    assert list(ops._kept) == made[2:]
    # the oldest file opens (its header authenticated in full) and is kept again
    fi = run(ops.open, made[0].ino, os.O_RDONLY, CTX)
    assert run(ops.read, fi.fh, 0, 100) == b"content 0"
    run(ops.release, fi.fh)
    assert list(ops._kept) == [made[3], made[4], made[0]] and made[2].checked is None
    run(ops.forget, [(made[4].ino, 1)])
    assert made[4].ino not in ops._inodes and list(ops._kept) == [made[3], made[0]]
    ops._drop_keys()
    assert not ops._kept and all(i.checked is None for i in made)
