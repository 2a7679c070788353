"""cryptfs.fs.closer: forgotten inodes' descriptors closed off the request loop."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cryptfs.fs import closer
from cryptfs.fs.closer import Closer


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


def _open_on(st: os.stat_result) -> list[int]:
    """This process's descriptors of the file ``st`` (by device and inode, so a
    descriptor number reused for another file does not count)."""
    held = []
    for name in os.listdir("/proc/self/fd"):
        try:
            cur = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue  # (the listing's own descriptor, closed by now)
        if (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
            held.append(int(name))
    return held


def test_every_descriptor_handed_over_is_closed_by_drain(tmp_path: Path) -> None:
    c = Closer()
    files = []
    for i in range(50):
        (tmp_path / f"f{i}").write_bytes(b"")
        files.append(os.stat(tmp_path / f"f{i}"))
    fds = [os.open(tmp_path / f"f{i}", os.O_RDONLY) for i in range(50)]
    assert all(_open_on(st) == [fd] for st, fd in zip(files, fds, strict=True))
    for fd in fds:
        c.close(fd)
    c.drain()
    assert not any(_open_on(st) for st in files)
    # usable again after a drain (the mount drains once, at its end)
    fd = os.open(tmp_path, os.O_PATH)
    c.close(fd)
    c.drain()
    assert not _is_open(fd)


def test_an_unlinked_file_is_freed_once_its_last_descriptor_is_closed(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 1_000_000)
    fd = os.open(p, os.O_RDONLY)
    st = os.fstat(fd)
    os.unlink(p)
    assert _open_on(st) == [fd]  # (unlinked, still held: not freed yet)
    c = Closer()
    c.close(fd)
    c.drain()
    assert _open_on(st) == []  # no descriptor left: the kernel frees it


def test_beyond_the_bound_the_caller_closes(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setattr(closer, "MAX_PENDING", 0)
    c = Closer()
    fd = os.open(tmp_path, os.O_PATH)
    c.close(fd)
    assert not _is_open(fd)  # closed at once, on this thread
    c.drain()
