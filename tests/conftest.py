"""Shared fixtures: throw-away volumes and real FUSE mounts.

Mount tests need root and /dev/fuse.  Where they cannot get them they fail
(loudly), never skip: CI runs as root with FUSE available.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from multiuser import Shared

from cryptfs.config import Kdf
from cryptfs.secret import Secret
from cryptfs.volume import Volume, init_volume, open_volume

PASSPHRASE = b"correct horse battery staple"
# Cheap Argon2id for tests (the CLI refuses less than 8 MiB, the default is 128 MiB).
TEST_KDF = Kdf(ops=1, mem_kib=8 * 1024)
CRYPTFS = [sys.executable, "-m", "cryptfs.cli.main"]


def run_cli(*args: str, check: bool = True, input: bytes | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(CRYPTFS + list(args), capture_output=True, text=True,
                         input=input.decode() if input is not None else None, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"cryptfs {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stdout}{res.stderr}")
    return res


def require_fuse() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        pytest.fail("mount tests need root, /dev/fuse and fusermount3 "
                    "(run the suite through .ci/run / scripts/run test)")


@pytest.fixture
def passfile(tmp_path: Path) -> Path:
    p = tmp_path / "passphrase"
    p.write_bytes(PASSPHRASE + b"\n")
    return p


def make_volume(backing: Path, mode: str = "aes-256-gcm") -> Path:
    vol = init_volume(str(backing), mode, Secret(PASSPHRASE), TEST_KDF)
    vol.close()
    return backing


def unlock(backing: Path) -> Volume:
    return open_volume(str(backing), Secret(PASSPHRASE))


@pytest.fixture(params=["aes-256-gcm", "xchacha20-poly1305"])
def any_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    return make_volume(tmp_path / "backing")


@dataclass
class Mount:
    backing: Path
    mnt: Path
    log: Path
    pidfile: Path
    passfile: Path | None = None

    @property
    def pid(self) -> int:
        return int(self.pidfile.read_text())

    def mount_args(self) -> list[str]:
        """How this mount is unlocked (a passphrase mount; see multiuser.SharedMount)."""
        assert self.passfile is not None
        return ["--passphrase-file", str(self.passfile)]

    def start(self, *extra: str) -> None:
        require_fuse()
        self.mnt.mkdir(exist_ok=True)
        if self.pidfile.exists():
            self.pidfile.unlink()
        run_cli("mount", str(self.backing), str(self.mnt), *self.mount_args(),
                "--log-file", str(self.log), "--pid-file", str(self.pidfile), *extra)
        deadline = time.monotonic() + 10
        while not os.path.ismount(self.mnt):
            if time.monotonic() > deadline:
                raise AssertionError(f"mount did not appear; log:\n{self.log_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Unmount and wait for the daemon to exit (always safe to call)."""
        pid = None
        try:
            pid = self.pid
        except (OSError, ValueError):
            pass
        if os.path.ismount(self.mnt) or _fuse_listed(self.mnt):
            res = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            if res.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        if pid is not None:
            _wait_exit(pid)

    def kill(self) -> None:
        """SIGKILL the daemon and clear the dead mount."""
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        _wait_exit(pid)
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def path(self, *parts: str) -> Path:
        return self.mnt.joinpath(*parts)


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A real tmpfs on a new directory ``where`` (``-o options``), unmounted after."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(fs: Path) -> Path:
    """Fill the filesystem of directory ``fs`` to the last page with a file
    (returned: unlink it, or truncate it, to make room)."""
    filler = fs / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def _fuse_listed(mnt: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mnt) for line in f)


def daemon_gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as exited:
    this sandbox's init reaps only every second or two)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_exit(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not daemon_gone(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"daemon {pid} did not exit")
        time.sleep(0.01)


def new_mount(tmp_path: Path, backing: Path, passfile: Path, name: str = "mnt") -> Mount:
    return Mount(backing, tmp_path / name, tmp_path / f"{name}.log", tmp_path / f"{name}.pid",
                 passfile)


@pytest.fixture
def mount(tmp_path: Path, backing: Path, passfile: Path) -> Iterator[Mount]:
    """A mounted volume (AES-256-GCM default mode); unmounted afterwards."""
    m = new_mount(tmp_path, backing, passfile)
    m.start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def mount_any_mode(tmp_path: Path, any_mode: str, passfile: Path) -> Iterator[Mount]:
    """A mounted volume, once per content mode."""
    m = new_mount(tmp_path, make_volume(tmp_path / "backing", any_mode), passfile)
    m.start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def shared() -> Iterator[Shared]:
    """Users cfs-alice, cfs-bob (agents), cfs-carol (supervisor) and root with slots in one
    volume, a real key agent (no idle timeout, short backoff) and a shared --agent mount.
    Nobody is unlocked at the start."""
    from multiuser import shared_setup

    require_fuse()
    yield from shared_setup()
