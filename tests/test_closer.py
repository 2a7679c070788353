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


def test_every_descriptor_handed_over_is_closed_by_drain(tmp_path: Path) -> None:
    c = Closer()
    fds = [os.open(tmp_path, os.O_PATH) for _ in range(50)]
    for fd in fds:
        c.close(fd)
    c.drain()
    assert not any(_is_open(fd) for fd in fds)
    # usable again after a drain (the mount drains once, at its end)
    fd = os.open(tmp_path, os.O_PATH)
    c.close(fd)
    c.drain()
    assert not _is_open(fd)


def test_an_unlinked_file_is_freed_once_its_last_descriptor_is_closed(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 1_000_000)
    fd = os.open(p, os.O_RDONLY)
    ino = os.fstat(fd).st_ino
    os.unlink(p)
    c = Closer()
    c.close(fd)
    c.drain()
    assert not _is_open(fd)
    assert not any(os.stat(q).st_ino == ino for q in tmp_path.iterdir())


def test_beyond_the_bound_the_caller_closes(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setattr(closer, "MAX_PENDING", 0)
    c = Closer()
    fd = os.open(tmp_path, os.O_PATH)
    c.close(fd)
    assert not _is_open(fd)  # closed at once, on this thread
    c.drain()
