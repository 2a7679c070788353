#!/usr/bin/env python3
"""Side-by-side benchmark: a plain directory, cryptfs (each content mode), gocryptfs, securefs.

Run as root (FUSE mounts, drop_caches), from the repository::

    .venv/bin/python bench/bench.py                 # full run: median of 3 runs each
    .venv/bin/python bench/bench.py --quick         # 1 run, small sizes (development)
    .venv/bin/python bench/bench.py --runs 5 --out bench/results/x.md
    .venv/bin/python bench/bench.py --profile       # where cryptfs spends its time (py-spy)
    .venv/bin/python bench/bench.py --on-juicefs --runs 1   # every backing dir on JuiceFS

Workloads (the same on every filesystem, all data checked against a checksum):

* ``seq``   - sequential write of 512 MiB in 128 KiB requests (fsync and close timed),
              then, after unmount + remount + drop_caches, a sequential read in 128 KiB
              requests;
* ``rand``  - a 256 MiB file; 4096 random 4 KiB reads (cold cache, readahead off via
              POSIX_FADV_RANDOM) and 4096 random 4 KiB writes (fsync timed), at fixed
              seeded 4 KiB-aligned offsets;
* ``small`` - 5,000 files of 1-4 KiB in one directory: create+write, listdir+stat (cold),
              read, delete;
* ``tar``   - ``tar -xf`` of a real source tree of ~10k files (built once from this
              machine's /usr/include, /usr/lib/python3.11 and /usr/share/perl), then
              ``rm -rf`` of the result (cold).

With ``--on-juicefs`` (bench/juicefs_mode.py) every target's backing directory is on a
private redis + JuiceFS volume: JuiceFS alone, gocryptfs and cryptfs over it, each without
and with its shared-storage option, compared as ratios.

Every figure is the median over the runs; runs rotate the order of the filesystems so
that noise from other work on the machine spreads over all of them.  Only the stdlib is
used (py-spy is installed into the venv for ``--profile``).
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from juicefs_mode import JuiceStorage

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KiB = 1024
MiB = 1024 * KiB
CHUNK = 128 * KiB  # request size of the sequential workloads
PAGE = 4 * KiB  # request size of the random workloads
PASSPHRASE = "bench passphrase, not a secret"
SEED = 20240611
BUG_DIR = Path("/tmp/bugs")
TAR_ROOTS = ["usr/include", "usr/lib/python3.11", "usr/share/perl"]
TAR_ROOTS_QUICK = ["usr/include/linux"]
TAR_ROOTS_MEDIUM = ["usr/include/linux", "usr/share/perl"]


# -- sizes ---------------------------------------------------------------------------------------
@dataclass
class Sizes:
    seq_mib: int = 512
    rand_mib: int = 256
    rand_ops: int = 4096
    small_files: int = 5000
    tar_roots: list[str] = field(default_factory=lambda: list(TAR_ROOTS))

    @classmethod
    def quick(cls) -> Sizes:
        return cls(seq_mib=64, rand_mib=32, rand_ops=512, small_files=500,
                   tar_roots=list(TAR_ROOTS_QUICK))

    @classmethod
    def medium(cls) -> Sizes:
        """Between the two: where the full sizes take too long (on JuiceFS, about 35 min
        for one run of its five filesystems on 2 loaded CPUs)."""
        return cls(seq_mib=256, rand_mib=64, rand_ops=1024, small_files=2000,
                   tar_roots=list(TAR_ROOTS_MEDIUM))


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    workload: str


def figures(s: Sizes, tar_desc: str) -> list[Figure]:
    n = f"{s.small_files:,}"
    return [
        Figure("seq_write", f"seq write {s.seq_mib} MiB, 128 KiB req, +fsync", "MiB/s", True,
               "seq"),
        Figure("seq_read", f"seq read {s.seq_mib} MiB, 128 KiB req, cold", "MiB/s", True, "seq"),
        Figure("rand_read", f"random 4 KiB read, {s.rand_mib} MiB file, cold", "ops/s", True,
               "rand"),
        Figure("rand_write", f"random 4 KiB write, {s.rand_mib} MiB file, +fsync", "ops/s", True,
               "rand"),
        Figure("small_create", f"{n} small files: create+write", "s", False, "small"),
        Figure("small_stat", f"{n} small files: listdir+stat, cold", "s", False, "small"),
        Figure("small_read", f"{n} small files: read", "s", False, "small"),
        Figure("small_delete", f"{n} small files: delete", "s", False, "small"),
        Figure("small_total", f"{n} small files: total of 4 phases", "s", False, "small"),
        Figure("tar_extract", f"tar -xf {tar_desc}", "s", False, "tar"),
        Figure("tar_rm", "rm -rf of the extracted tree, cold", "s", False, "tar"),
    ]


WORKLOADS = ["seq", "rand", "small", "tar"]


# -- small helpers -------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, flush=True)


def run(cmd: list[str], check: bool = True, timeout: float | None = 600,
        **kw: object) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                         **kw)  # type: ignore[call-overload]
    if check and res.returncode != 0:
        raise RuntimeError(f"command failed ({res.returncode}): {shlex.join(cmd)}\n"
                           f"{(res.stdout + res.stderr).strip()[-3000:]}")
    return res  # type: ignore[no-any-return]


def fuse_mounts() -> dict[str, str]:
    """mountpoint -> fstype for every FUSE mount this process can see."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) >= 5 and rfields and rfields[0].startswith("fuse"):
                out[fields[4].encode().decode("unicode_escape")] = rfields[0]
    return out


def is_mounted(mnt: Path) -> bool:
    return str(mnt) in fuse_mounts()


def wait_mounted(mnt: Path, proc: subprocess.Popen[bytes] | None = None,
                 timeout: float = 90, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before {mnt} was mounted")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {mnt} not mounted after {timeout:.0f} s")
        time.sleep(0.02)


def fuse_unmount(mnt: Path) -> None:
    """Unmount a FUSE mount (retrying while busy, lazily as a last resort)."""
    deadline = time.monotonic() + 20
    last = ""
    while is_mounted(mnt):
        for cmd in (["fusermount3", "-u", str(mnt)], ["fusermount", "-u", str(mnt)],
                    ["umount", str(mnt)]):
            if shutil.which(cmd[0]):
                res = run(cmd, check=False)
                if res.returncode == 0:
                    return
                last = (res.stderr or res.stdout).strip()
        if time.monotonic() > deadline:
            log(f"  ! {mnt} busy ({last}); lazy unmount")
            run(["umount", "-l", str(mnt)], check=False)
            return
        time.sleep(0.25)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is as good as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_pid_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


_drop_warned = False


def drop_caches() -> None:
    global _drop_warned
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        if not _drop_warned:
            log(f"  ! cannot drop caches ({e}): cold-cache figures are not cold")
            _drop_warned = True


def write_all(fd: int, data: memoryview | bytes) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        if n <= 0:
            raise OSError(f"short write ({n})")
        mv = mv[n:]


def version_of(cmd: list[str]) -> str:
    try:
        res = run(cmd, check=False, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (res.stdout + res.stderr).strip().splitlines()[0] if (res.stdout + res.stderr) else "?"


def deb_version(pkg: str) -> str:
    res = run(["dpkg-query", "-W", "-f=${Version}", pkg], check=False)
    return res.stdout.strip() if res.returncode == 0 else "not installed"


def git(*args: str) -> str:
    res = run(["git", "-C", str(REPO), *args], check=False)
    return res.stdout.strip() if res.returncode == 0 else "?"


def code_version() -> str:
    """The commit of the working tree, and whether the package's sources differ from it."""
    dirs = package_dirs()
    dirty = git("status", "--porcelain", "--", *sorted(set(dirs.values())))
    head = git("log", "-1", "--format=%h %s")
    return head + (" (+ uncommitted changes in the package)" if dirty else "")


def package_dirs() -> dict[str, str]:
    """cryptfs's package_dir mapping from setup.cfg (package -> folder of the repo)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    out = {}
    for line in cfg.get("options", "package_dir", fallback="").splitlines():
        if "=" in line:
            pkg, d = (x.strip() for x in line.split("=", 1))
            out[pkg] = d
    return out or {"cryptfs": "cryptfs"}


def snapshot_code(dest: Path) -> None:
    """Copy cryptfs's sources and run every cryptfs process from the copy (PYTHONPATH).

    The working tree may change while a long benchmark runs (other work on the machine):
    the copy makes one run measure one version of the code.
    """
    os.chdir(dest.parent)  # not the repository: '' on sys.path would find its cryptfs/ first
    for pkg, d in sorted(package_dirs().items()):
        shutil.copytree(REPO / d, dest / pkg.replace(".", "/"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    os.environ["PYTHONPATH"] = str(dest) + (
        os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    res = run([sys.executable, "-c", "import cryptfs.ops, cryptfs.modes; "
               "print(cryptfs.ops.__file__); print(cryptfs.modes.__file__)"])
    if any(not ln.startswith(str(dest)) for ln in res.stdout.split()):
        raise SystemExit(f"the code snapshot is not what gets imported:\n{res.stdout}")


def snapshot_or_clean(workdir: Path) -> None:
    try:
        snapshot_code(workdir / "code")
    except BaseException:
        os.chdir("/")
        shutil.rmtree(workdir, ignore_errors=True)
        raise


class VerifyError(Exception):
    """Data read back differs from what was written (or a listing/size is wrong)."""


# -- deterministic data --------------------------------------------------------------------------
class Pattern:
    """Pseudo-random bytes from a seed; chunk ``i`` of a stream is a slice of one buffer."""

    SPAN = 8 * MiB

    def __init__(self, seed: int) -> None:
        self.buf = random.Random(seed).randbytes(self.SPAN + CHUNK)
        self.mv = memoryview(self.buf)

    def chunk(self, i: int) -> memoryview:
        off = (i * 8 * 4099) % self.SPAN
        return self.mv[off : off + CHUNK]

    def at(self, off: int, n: int) -> memoryview:
        """Bytes ``off .. off+n`` of the stream of chunks (must not cross a chunk)."""
        i, within = divmod(off, CHUNK)
        assert within + n <= CHUNK
        return self.chunk(i)[within : within + n]

    def piece(self, i: int, n: int) -> bytes:
        off = (i * 4111 * 8) % self.SPAN
        return bytes(self.mv[off : off + n])


_hash_cache: dict[int, str] = {}


def stream_sha256(pat: Pattern, n_chunks: int) -> str:
    if n_chunks not in _hash_cache:
        h = hashlib.sha256()
        for i in range(n_chunks):
            h.update(pat.chunk(i))
        _hash_cache[n_chunks] = h.hexdigest()
    return _hash_cache[n_chunks]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(mv):
            h.update(mv[:n])
    return h.hexdigest()


# -- the filesystems -----------------------------------------------------------------------------
class Target:
    """One filesystem under test, in its own throw-away directory."""

    name = ""
    is_cryptfs = False
    is_peer = False

    def __init__(self, base: Path) -> None:
        self.base = base
        self.backing = base / "backing"
        self.mnt = base / "mnt"
        self.passfile = base / "passphrase"
        self.logfile = base / "daemon.log"
        self._log_seen = 0

    @property
    def root(self) -> Path:
        return self.mnt

    def create(self) -> None:
        self.base.mkdir(parents=True)
        self.backing.mkdir()
        self.mnt.mkdir()
        self.passfile.write_text(PASSPHRASE + "\n")

    def mount(self) -> None:
        raise NotImplementedError

    def unmount(self) -> None:
        raise NotImplementedError

    def cold(self) -> None:
        """Make every cache cold: unmount, drop the kernel's caches, mount again."""
        self.unmount()
        drop_caches()
        self.mount()

    def check_alive(self) -> None:
        if not is_mounted(self.mnt):
            raise RuntimeError(f"{self.name}: {self.mnt} is no longer mounted (daemon died?)")

    def new_log_problems(self) -> list[str]:
        """Error lines the daemon logged since the last call."""
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return []
        new, self._log_seen = text[self._log_seen :], len(text)
        keys = ("ERROR", "Traceback", "integrity failure", "internal error", "CRITICAL")
        return [ln for ln in new.splitlines() if any(k in ln for k in keys)]

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def destroy(self) -> None:
        try:
            self.unmount()
        finally:
            if is_mounted(self.mnt):
                run(["umount", "-l", str(self.mnt)], check=False)
            shutil.rmtree(self.base, ignore_errors=True)
            if not self.backing.is_relative_to(self.base):  # on shared storage (--on-juicefs)
                shutil.rmtree(self.backing, ignore_errors=True)


class Plain(Target):
    name = "plain"

    @property
    def root(self) -> Path:
        return self.backing

    def mount(self) -> None:
        pass

    def unmount(self) -> None:
        pass

    def check_alive(self) -> None:
        pass


def cryptfs_cmd() -> list[str]:
    # the same as .venv/bin/cryptfs, but honours PYTHONPATH (the code snapshot) first
    return [sys.executable, "-m", "cryptfs.cli.main"]


class Cryptfs(Target):
    is_cryptfs = True
    # The KDF cost only affects unlocking (not measured): keep mounts quick.
    KDF = ["--kdf-memory", "8", "--kdf-iterations", "1"]

    def __init__(self, base: Path, mode: str, profiler: Profiler | None = None) -> None:
        super().__init__(base)
        self.mode = mode
        self.name = f"cryptfs-{mode}"
        self.pidfile = base / "daemon.pid"
        self.pid: int | None = None
        self.profiler = profiler
        self.proc: subprocess.Popen[bytes] | None = None

    def create(self) -> None:
        super().create()
        run(cryptfs_cmd() + ["init", "--no-recovery-key", "--mode", self.mode, "--passphrase-file",
                             str(self.passfile), *self.KDF, str(self.backing)])

    def mount_args(self) -> list[str]:
        return ["mount", str(self.backing), str(self.mnt), "--passphrase-file",
                str(self.passfile), "--pid-file", str(self.pidfile)]

    def mount(self) -> None:
        if self.pidfile.exists():
            self.pidfile.unlink()
        if self.profiler is not None:
            self.proc = self.profiler.start(
                [sys.executable, "-m", "cryptfs.cli.main"] + self.mount_args() + ["-f"],
                self.logfile)
            wait_mounted(self.mnt, self.proc, what="cryptfs under py-spy")
        else:
            run(cryptfs_cmd() + self.mount_args() + ["--log-file", str(self.logfile)])
            wait_mounted(self.mnt, what="cryptfs")
        deadline = time.monotonic() + 10
        while not self.pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.pid = int(self.pidfile.read_text())

    def unmount(self) -> None:
        if is_mounted(self.mnt):
            res = run(cryptfs_cmd() + ["unmount", str(self.mnt)], check=False)
            if res.returncode != 0:
                log(f"  ! cryptfs unmount failed: {(res.stderr or res.stdout).strip()}")
                fuse_unmount(self.mnt)
        if self.pid is not None:
            if not wait_pid_exit(self.pid, 60):
                write_bug("daemon-hang", f"{self.name}: daemon did not exit after unmount",
                          f"The daemon (pid {self.pid}) was still running 60 s after "
                          f"`cryptfs unmount {self.mnt}` returned.\n", self)
                os.kill(self.pid, signal.SIGKILL)
            self.pid = None
        if self.proc is not None:
            self.proc.wait(timeout=120)
            if self.profiler is not None:
                self.profiler.stop(self.proc)
            self.proc = None

    def check_alive(self) -> None:
        super().check_alive()
        if self.pid is not None and not pid_alive(self.pid):
            raise RuntimeError(f"{self.name}: daemon {self.pid} died")


class CryptfsNoPoll(Cryptfs):
    """The passphrase mount with ``--idle-poll 0``: the request loop sleeps in the kernel
    after every answer instead of polling /dev/fuse for the next request."""

    def __init__(self, base: Path) -> None:
        super().__init__(base, "aes-256-gcm")
        self.name = "cryptfs-nopoll"

    def mount_args(self) -> list[str]:
        return super().mount_args() + ["--idle-poll", "0"]


class CryptfsShared(Cryptfs):
    """cryptfs aes-256-gcm with ``--shared-storage`` (docs/MULTISERVER.md: the coherence rule
    for a backing directory that other servers mount too)."""

    def __init__(self, base: Path) -> None:
        super().__init__(base, "aes-256-gcm")
        self.name = "cryptfs-shared"

    def mount_args(self) -> list[str]:
        return super().mount_args() + ["--shared-storage"]


class CryptfsAudit(Cryptfs):
    """cryptfs with an access log (--audit-log): every access is recorded."""

    def __init__(self, base: Path, profiler: Profiler | None = None) -> None:
        super().__init__(base, "aes-256-gcm", profiler)
        self.name = "cryptfs-audit"
        self.logdir = base / "auditlog"

    def create(self) -> None:
        super().create()
        run(cryptfs_cmd() + ["audit", "init", str(self.logdir)])

    def mount_args(self) -> list[str]:
        return super().mount_args() + ["--audit-log", str(self.logdir)]

    def log_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.logdir.glob("segment-*.log"))


class CryptfsAgent(Cryptfs):
    """cryptfs as a shared mount (--agent): a real key agent, root unlocked in it.
    Every lookup, stat, read and write reaches the daemon (no kernel caching)."""

    def __init__(self, base: Path) -> None:
        super().__init__(base, "aes-256-gcm")
        self.name = "cryptfs-agent"
        self.socket = base / "agent.sock"
        self.agent: subprocess.Popen[bytes] | None = None

    def mount_args(self) -> list[str]:
        return ["mount", str(self.backing), str(self.mnt), "--agent", "--agent-socket",
                str(self.socket), "--pid-file", str(self.pidfile)]

    def mount(self) -> None:
        if self.agent is None:
            self.agent = subprocess.Popen(
                [sys.executable, "-m", "cryptfs.keyagent.daemon", "--socket", str(self.socket),
                 "--idle-timeout", "0", "--log-file", str(self.base / "agent.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while not self.socket.exists():
                if time.monotonic() > deadline or self.agent.poll() is not None:
                    raise RuntimeError("the key agent did not start")
                time.sleep(0.02)
        super().mount()
        run(cryptfs_cmd() + ["unlock", str(self.backing), "--passphrase-file",
                             str(self.passfile), "--agent-socket", str(self.socket)])
        deadline = time.monotonic() + 10
        while "uid 0 unlocked" not in (self.logfile.read_text() if self.logfile.exists() else ""):
            if time.monotonic() > deadline:
                raise RuntimeError("the agent mount never saw the unlock")
            time.sleep(0.02)

    def destroy(self) -> None:
        try:
            super().destroy()
        finally:
            if self.agent is not None:
                self.agent.terminate()
                self.agent.wait(30)
                self.agent = None


class _ForegroundPeer(Target):
    """A peer filesystem run as a foreground daemon and unmounted with fusermount."""

    is_peer = True

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.proc: subprocess.Popen[bytes] | None = None

    def mount_command(self) -> list[str]:
        raise NotImplementedError

    def mount(self) -> None:
        with open(self.logfile, "ab") as lf:
            self.proc = subprocess.Popen(self.mount_command(), stdin=subprocess.DEVNULL,
                                         stdout=lf, stderr=lf)
        wait_mounted(self.mnt, self.proc, what=self.name)

    def unmount(self) -> None:
        fuse_unmount(self.mnt)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def new_log_problems(self) -> list[str]:
        return []


class Gocryptfs(_ForegroundPeer):
    name = "gocryptfs"

    def create(self) -> None:
        super().create()
        run(["gocryptfs", "-init", "-quiet", "-passfile", str(self.passfile), str(self.backing)])

    def mount_command(self) -> list[str]:
        return ["gocryptfs", "-fg", "-quiet", "-passfile", str(self.passfile),
                str(self.backing), str(self.mnt)]


class GocryptfsShared(Gocryptfs):
    """gocryptfs with ``-sharedstorage`` (no stat caching, no hard-link tracking)."""

    name = "gocryptfs-shared"

    def mount_command(self) -> list[str]:
        cmd = super().mount_command()
        return cmd[:1] + ["-sharedstorage"] + cmd[1:]


class Securefs(_ForegroundPeer):
    name = "securefs"

    def create(self) -> None:
        super().create()
        # 0.13 defaults: format 4 ("lite": one backing file per file), 4 KiB blocks, Argon2id
        run(["securefs", "create", "--pass", PASSPHRASE, str(self.backing)])

    def mount_command(self) -> list[str]:
        return ["securefs", "mount", "--pass", PASSPHRASE, str(self.backing), str(self.mnt)]


TARGETS: dict[str, Callable[[Path], Target]] = {
    "plain": Plain,
    "cryptfs-aes-256-gcm": lambda b: Cryptfs(b, "aes-256-gcm"),
    "cryptfs-xchacha20-poly1305": lambda b: Cryptfs(b, "xchacha20-poly1305"),
    "cryptfs-agent": CryptfsAgent,
    "cryptfs-audit": CryptfsAudit,
    "cryptfs-nopoll": CryptfsNoPoll,
    "gocryptfs": Gocryptfs,
    "securefs": Securefs,
    "cryptfs-shared": CryptfsShared,
    "gocryptfs-shared": GocryptfsShared,
}
SHORT = {"plain": "plain", "cryptfs-aes-256-gcm": "cryptfs aes", "cryptfs-xchacha20-poly1305":
         "cryptfs xchacha", "cryptfs-agent": "cryptfs agent", "cryptfs-audit": "cryptfs audit",
         "cryptfs-nopoll": "cryptfs no-poll", "gocryptfs": "gocryptfs",
         "securefs": "securefs", "cryptfs-shared": "cryptfs shared",
         "gocryptfs-shared": "gocryptfs shared"}
CRYPTFS_NAMES = [n for n in TARGETS if n.startswith("cryptfs")]
PEER_NAMES = ["gocryptfs", "securefs"]
# what runs without --fs: the local comparison, or the one on JuiceFS
DEFAULT_FS = [n for n in TARGETS if not n.endswith("-shared") and n != "cryptfs-nopoll"]
JUICEFS_FS = ["plain", "gocryptfs", "gocryptfs-shared", "cryptfs-aes-256-gcm", "cryptfs-shared"]


# -- bug reports ---------------------------------------------------------------------------------
_bugs_written: list[str] = []


def write_bug(short: str, title: str, body: str, target: Target | None = None) -> None:
    BUG_DIR.mkdir(parents=True, exist_ok=True)
    mode = getattr(target, "mode", "")
    name = f"bench-{short}" + (f"-{mode.split('-')[0]}" if mode else "")
    path = BUG_DIR / f"{name}.md"
    text = [f"# {title}", "",
            f"Found by bench/bench.py on {datetime.datetime.now().isoformat(timespec='seconds')} "
            f"(kernel {platform.release()}, {os.cpu_count()} CPUs).", "", body, ""]
    if target is not None:
        text += ["## Daemon log (tail)", "", "```", target.log_tail(), "```", ""]
    text += ["## Reproduce", "", "```",
             f"cd {REPO}",
             f".venv/bin/python bench/bench.py --quick --fs {getattr(target, 'name', 'plain')} "
             f"--workloads {short.split('-')[0] if short.split('-')[0] in WORKLOADS else 'all'}",
             "```", ""]
    path.write_text("\n".join(text))
    _bugs_written.append(str(path))
    log(f"  ! bug report written: {path}")


# -- workloads -----------------------------------------------------------------------------------
@dataclass
class Ctx:
    sizes: Sizes
    pat: Pattern
    pat2: Pattern
    tarball: Path | None = None
    notes: set[str] = field(default_factory=set)
    settle: float = 0.0  # seconds to wait before a timed create phase (settle_deletions)


# ext4 without a journal (this VM's root filesystem: /sys/fs/ext4/DEV/journal_task reads
# "<none>") does not give out again an inode freed less than 60 s ago (360 s while its
# inode table block is dirty and cached): ext4's recently_deleted(), RECENTCY_MIN and
# RECENTCY_DIRTY.  A new inode's allocation then walks past every such inode of its
# block group, one inode table lookup each, so right after thousands of deletions (a
# delete phase, rm -rf, often of the target that ran just before) a create cost up to
# 0.8 ms instead of 15 µs, whichever filesystem was being measured (perf: find_inode_bit
# -> recently_deleted under ext4_create).  With --no-scratch every timed create phase
# therefore starts after a sync and this long: the sync makes the blocks clean, and a
# block no longer cached counts as written back.  It helps, but does not remove the
# walk; the default (a new journaled ext4 per run, scratch_ext4) does.
DELETE_SETTLE_S = 6.0


def unjournaled_ext4(path: Path) -> bool:
    """Whether ``path`` is on ext4 without a journal (see DELETE_SETTLE_S)."""
    res = run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", str(path)], check=False)
    parts = res.stdout.split()
    if len(parts) != 2 or parts[0] != "ext4":
        return False
    dev = os.path.basename(os.path.realpath(parts[1]))
    try:
        return Path(f"/sys/fs/ext4/{dev}/journal_task").read_text().strip() == "<none>"
    except OSError:
        return False


# The size of the scratch filesystem (--scratch): a sparse file, so only what the run
# writes takes room.  Every target runs (and is removed) in turn: the largest need is
# one target's 512 MiB sequential file plus the extracted tarball.
SCRATCH_GIB = 16


@contextlib.contextmanager
def scratch_ext4(parent: Path) -> Iterator[tuple[Path, str]]:
    """A new ext4 with its journal (mkfs's defaults) on a loop device over a sparse file
    in ``parent``, mounted for the run and removed after it: every target starts on the
    same empty filesystem, whatever the machine's own is (this VM's root is ext4 without
    a journal, where a create right after mass deletions costs up to 0.8 ms: see
    DELETE_SETTLE_S).  The loop device does direct I/O, so the page cache holds each
    block once.  Yields the mount point and a description for the machine line."""
    image = parent / "scratch.img"
    mnt = parent / "scratch"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(SCRATCH_GIB * 2**30)
    dev = ""
    mounted = False
    try:
        dev = run(["losetup", "--find", "--show", "--direct-io=on", str(image)]).stdout.strip()
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
        run(["mount", dev, str(mnt)])
        mounted = True
        yield mnt, (f"ext4 with journal, new for this run ({SCRATCH_GIB} GiB sparse file "
                    f"on a loop device with direct I/O; --no-scratch: the directory as is)")
    finally:
        if mounted:
            run(["umount", str(mnt)], check=False)
        if dev:
            run(["losetup", "-d", dev], check=False)
        image.unlink(missing_ok=True)


def settle_deletions(c: Ctx) -> None:
    if c.settle:
        os.sync()
        time.sleep(c.settle)


def wl_seq(t: Target, c: Ctx) -> dict[str, float]:
    n = c.sizes.seq_mib * MiB // CHUNK
    path = t.root / "seq.bin"
    want = stream_sha256(c.pat, n)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for i in range(n):
            write_all(fd, c.pat.chunk(i))
        os.fsync(fd)
    finally:
        os.close(fd)
    t_write = time.perf_counter() - t0

    t.cold()
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(mv):
            total += k
    t_read = time.perf_counter() - t0
    if total != n * CHUNK:
        raise VerifyError(f"seq read returned {total} bytes, wrote {n * CHUNK}")
    got = file_sha256(path)  # untimed second pass (served from the cache the read filled)
    if got != want:
        raise VerifyError(f"seq read-back checksum mismatch: {got} != {want}")
    os.unlink(path)
    mib = n * CHUNK / MiB
    return {"seq_write": mib / t_write, "seq_read": mib / t_read}


def _fadvise_random(fd: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def wl_rand(t: Target, c: Ctx) -> dict[str, float]:
    n_chunks = c.sizes.rand_mib * MiB // CHUNK
    n_pages = c.sizes.rand_mib * MiB // PAGE
    ops = c.sizes.rand_ops
    path = t.root / "rand.bin"
    rng = random.Random(SEED + 1)
    r_offs = [rng.randrange(n_pages) * PAGE for _ in range(ops)]
    w_offs = [rng.randrange(n_pages) * PAGE for _ in range(ops)]
    w_data = [c.pat2.piece(j, PAGE) for j in range(ops)]

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for i in range(n_chunks):
            write_all(fd, c.pat.chunk(i))
        os.fsync(fd)
    finally:
        os.close(fd)

    t.cold()
    got: list[bytes] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _fadvise_random(fd)
        t0 = time.perf_counter()
        for off in r_offs:
            got.append(os.pread(fd, PAGE, off))
        t_read = time.perf_counter() - t0
    finally:
        os.close(fd)
    for off, data in zip(r_offs, got, strict=True):
        if data != c.pat.at(off, PAGE):
            raise VerifyError(f"random read at offset {off}: wrong data "
                              f"({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")

    t.cold()
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        _fadvise_random(fd)
        t0 = time.perf_counter()
        for off, data in zip(w_offs, w_data, strict=True):
            if os.pwrite(fd, data, off) != PAGE:
                raise OSError("short pwrite")
        os.fsync(fd)
    finally:
        os.close(fd)
    t_write = time.perf_counter() - t0

    expect = bytearray(b"".join(c.pat.chunk(i) for i in range(n_chunks)))
    for off, data in zip(w_offs, w_data, strict=True):
        expect[off : off + PAGE] = data
    want = hashlib.sha256(expect).hexdigest()
    del expect
    t.cold()
    got_hash = file_sha256(path)
    if got_hash != want:
        raise VerifyError(f"after random writes (and a remount) the file's checksum is "
                          f"{got_hash}, expected {want}")
    os.unlink(path)
    return {"rand_read": ops / t_read, "rand_write": ops / t_write}


def wl_small(t: Target, c: Ctx) -> dict[str, float]:
    n = c.sizes.small_files
    d = t.root / "small"
    rng = random.Random(SEED + 2)
    names = [f"file{i:05d}.txt" for i in range(n)]
    paths = [str(d / nm) for nm in names]
    datas = [c.pat.piece(i, rng.randint(1 * KiB, 4 * KiB)) for i in range(n)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    os.mkdir(d)

    settle_deletions(c)
    t0 = time.perf_counter()
    for p, data in zip(paths, datas, strict=True):
        fd = os.open(p, flags, 0o644)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
    t_create = time.perf_counter() - t0

    t.cold()
    t0 = time.perf_counter()
    listing = os.listdir(d)
    sts = [os.stat(p) for p in paths]
    t_stat = time.perf_counter() - t0
    if sorted(listing) != names:
        raise VerifyError(f"listdir of {n} files returned {len(listing)} names, "
                          f"missing e.g. {sorted(set(names) - set(listing))[:3]}, "
                          f"extra e.g. {sorted(set(listing) - set(names))[:3]}")
    for p, st, data in zip(paths, sts, datas, strict=True):
        if st.st_size != len(data):
            raise VerifyError(f"stat {p}: size {st.st_size}, wrote {len(data)}")

    bad = []
    t0 = time.perf_counter()
    for p, data in zip(paths, datas, strict=True):
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.read(fd, 8 * KiB) != data:
                bad.append(p)
        finally:
            os.close(fd)
    t_read = time.perf_counter() - t0
    if bad:
        raise VerifyError(f"{len(bad)} small files read back wrong, e.g. {bad[:3]}")

    t0 = time.perf_counter()
    for p in paths:
        os.unlink(p)
    os.rmdir(d)
    t_delete = time.perf_counter() - t0
    return {"small_create": t_create, "small_stat": t_stat, "small_read": t_read,
            "small_delete": t_delete,
            "small_total": t_create + t_stat + t_read + t_delete}


def wl_tar(t: Target, c: Ctx) -> dict[str, float]:
    assert c.tarball is not None
    dest = t.root / "tree"
    os.mkdir(dest)
    settle_deletions(c)
    with open(c.tarball, "rb") as f:  # the archive itself comes from the page cache
        while f.read(4 * MiB):
            pass
    t0 = time.perf_counter()
    run(["tar", "-xf", str(c.tarball), "-C", str(dest)])
    t_x = time.perf_counter() - t0

    t.cold()
    res = run(["tar", "-df", str(c.tarball), "-C", str(dest)], check=False)
    diffs = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    mtime_only = [ln for ln in diffs if ln.endswith(": Mod time differs")]
    other = [ln for ln in diffs if ln not in mtime_only]
    if other or (res.returncode != 0 and not mtime_only):
        raise VerifyError(f"tar --compare after extraction: {len(other)} differences:\n"
                          + "\n".join(other[:40]))
    if mtime_only:
        note = f"{t.name}: tar --compare: {len(mtime_only)} files' mtimes not preserved"
        c.notes.add(note)
        if t.is_cryptfs:
            write_bug("tar-mtime", f"{t.name}: mtimes not preserved by tar -x",
                      "tar --compare after extraction (and a remount):\n\n```\n"
                      + "\n".join(mtime_only[:40]) + "\n```\n", t)
    t.cold()
    t0 = time.perf_counter()
    run(["rm", "-rf", str(dest)])
    t_rm = time.perf_counter() - t0
    if dest.exists():
        raise VerifyError(f"{dest} still exists after rm -rf")
    return {"tar_extract": t_x, "tar_rm": t_rm}


WL_FUNCS: dict[str, Callable[[Target, Ctx], dict[str, float]]] = {
    "seq": wl_seq, "rand": wl_rand, "small": wl_small, "tar": wl_tar,
}


def build_tarball(roots: list[str], out: Path) -> str:
    """A deterministic archive of a real source tree on this machine; returns a description."""
    present = [r for r in roots if (Path("/") / r).is_dir()]
    if not present:
        raise SystemExit(f"none of {roots} exists: cannot build the tarball")
    run(["tar", "-cf", str(out), "--sort=name", "--exclude=__pycache__", "-C", "/", *present])
    res = run(["tar", "-tvf", str(out)])
    lines = res.stdout.splitlines()
    files = sum(1 for ln in lines if ln.startswith("-"))
    h = hashlib.sha256(out.read_bytes()).hexdigest()[:16]
    return (f"{len(lines):,} entries ({files:,} files) from /{', /'.join(present)}, "
            f"{out.stat().st_size / MiB:.0f} MiB, sha256 {h}…")


# -- tools ---------------------------------------------------------------------------------------
def ensure_tools(need_peers: bool) -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench.py must run as root (FUSE mounts, drop_caches)")
    missing = [p for p, exe in (("fuse3", "fusermount3"), ("gocryptfs", "gocryptfs"),
                                ("securefs", "securefs"))
               if (need_peers or p == "fuse3") and not shutil.which(exe)]
    if missing:
        log(f"installing Debian packages: {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-q"], env=env, timeout=900)
        run(["apt-get", "install", "-y", "-q", *missing], env=env, timeout=900)


def fuse_wake_here() -> str:
    """The kernel's ``fuse.wake_here`` parameter, where it has one (docs/PERFORMANCE.md: its
    effect fits a reply that wakes the waiting process on the replying CPU); every mount
    of a run shares it."""
    try:
        return Path("/sys/module/fuse/parameters/wake_here").read_text().strip()
    except OSError:
        return "(no such parameter)"


def machine_info() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    try:
        import pyfuse3  # type: ignore[import-not-found]
        pyfuse3_v = pyfuse3.__version__
    except Exception:  # noqa: BLE001
        pyfuse3_v = "?"
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        openssl = backend.openssl_version_text()
    except Exception:  # noqa: BLE001
        openssl = "?"
    st = os.statvfs(tempfile.gettempdir())
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "os": version_of(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3_v,
        "cryptfs": version_of(cryptfs_cmd() + ["--version"]) + "; code: " + code_version(),
        "openssl (cryptography)": openssl,
        "gocryptfs": version_of(["gocryptfs", "-version"]),
        "securefs": f"{deb_version('securefs')} (Debian package)",
        "libfuse3": deb_version("libfuse3-3"),
        "backing filesystem": version_of(["findmnt", "-no", "FSTYPE,SOURCE", "-T",
                                          tempfile.gettempdir()]),
        "kernel fuse wake_here": fuse_wake_here(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "tmp free": f"{st.f_bavail * st.f_frsize / 2**30:.0f} GiB",
    }


# -- the benchmark -------------------------------------------------------------------------------
@dataclass
class Results:
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, fs: str, key: str, v: float) -> None:
        self.values.setdefault(fs, {}).setdefault(key, []).append(v)

    def median(self, fs: str, key: str) -> float | None:
        vs = self.values.get(fs, {}).get(key)
        return statistics.median(vs) if vs else None

    def value(self, fs: str, fig: Figure, how: str = "median") -> float | None:
        """The median, or the best run ("best": the fastest, less disturbed by other load)."""
        vs = self.values.get(fs, {}).get(fig.key)
        if not vs:
            return None
        if how == "best":
            return max(vs) if fig.higher_is_better else min(vs)
        return statistics.median(vs)


def run_one(name: str, base: Path, ctx: Ctx, workloads: list[str], res: Results,
            run_no: int, storage: Path | None = None) -> None:
    t = TARGETS[name](base)
    if storage is not None:  # the backing directory on shared storage (--on-juicefs)
        t.backing = storage / base.name
    log(f"[run {run_no}] {name}")
    try:
        t.create()
        t.mount()
        for wl in workloads:
            t0 = time.monotonic()
            try:
                vals = WL_FUNCS[wl](t, ctx)
                t.check_alive()
            except Exception as e:  # noqa: BLE001 - record, report, go on
                tb = traceback.format_exc()
                msg = f"run {run_no} {name} {wl}: {type(e).__name__}: {e}"
                res.errors.append(msg)
                log(f"  ! {msg}")
                if t.is_cryptfs:
                    kind = "wrong data" if isinstance(e, VerifyError) else "error"
                    write_bug(f"{wl}-{'data' if isinstance(e, VerifyError) else 'error'}",
                              f"{name}: {kind} in the `{wl}` benchmark workload",
                              f"Workload `{wl}` failed on {name} (run {run_no}).\n\n"
                              f"```\n{tb}```\n", t)
                with contextlib.suppress(Exception):
                    t.unmount()
                try:
                    t.mount()
                except Exception as e2:  # noqa: BLE001
                    res.errors.append(f"run {run_no} {name}: remount failed: {e2}")
                    break
                continue
            finally:
                problems = t.new_log_problems()
                if problems:
                    msg = f"run {run_no} {name} {wl}: daemon logged errors: {problems[:5]}"
                    res.errors.append(msg)
                    log(f"  ! {msg}")
                    write_bug(f"{wl}-log", f"{name}: daemon logged errors during `{wl}`",
                              "Log lines:\n\n```\n" + "\n".join(problems[:50]) + "\n```\n", t)
            for k, v in vals.items():
                res.add(name, k, v)
            shown = ", ".join(f"{k}={v:.3g}" for k, v in vals.items())
            log(f"  {wl:5s} {shown}   ({time.monotonic() - t0:.0f} s)")
    finally:
        t.destroy()


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "ops/s":
        return f"{v:,.0f}"
    if unit == "MiB/s":
        return f"{v:,.1f}"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}"


def ratio(res: Results, fs: str, fig: Figure, how: str = "median"
          ) -> tuple[float | None, str]:
    v = res.value(fs, fig, how)
    peers = [(p, res.value(p, fig, how)) for p in PEER_NAMES]
    peers = [(p, x) for p, x in peers if x is not None]
    if v is None or not peers or v <= 0:
        return None, ""
    if fig.higher_is_better:
        best, bv = max(peers, key=lambda px: px[1])  # type: ignore[arg-type,return-value]
        return v / bv, best  # type: ignore[operator]
    best, bv = min(peers, key=lambda px: px[1])  # type: ignore[arg-type,return-value]
    return bv / v, best  # type: ignore[operator]


def table(res: Results, figs: list[Figure], names: list[str], markdown: bool,
          how: str = "median") -> str:
    cryptfs = [n for n in names if n in CRYPTFS_NAMES]
    head = (["figure", "unit"] + [SHORT[n] for n in names]
            + [f"{SHORT[n].replace('cryptfs ', '')} ÷ best peer" for n in cryptfs]
            + ["best peer"])
    rows = []
    for fig in figs:
        if all(res.value(n, fig, how) is None for n in names):
            continue
        unit = fig.unit + (" ↑" if fig.higher_is_better else " ↓")
        row = [fig.label, unit] + [fmt(res.value(n, fig, how), fig.unit) for n in names]
        best = ""
        for n in cryptfs:
            r, best = ratio(res, n, fig, how)
            row.append("-" if r is None else f"{r:.2f}×")
        row.append(best)
        rows.append(row)
    if markdown:
        out = ["| " + " | ".join(head) + " |",
               "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 3) + ["---"]) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [head] + rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def speed_ratio(res: Results, a: str, b: str, fig: Figure, how: str = "median") -> float | None:
    """a ÷ b oriented as speed: > 1 when a is faster (throughput a/b, time b/a)."""
    va, vb = res.value(a, fig, how), res.value(b, fig, how)
    if va is None or vb is None or va <= 0 or vb <= 0:
        return None
    return va / vb if fig.higher_is_better else vb / va


# (column, numerator, denominator) of the table of the run on JuiceFS
JUICEFS_RATIOS = [
    ("cryptfs ÷ gocryptfs", "cryptfs-aes-256-gcm", "gocryptfs"),
    ("shared: cryptfs ÷ gocryptfs", "cryptfs-shared", "gocryptfs-shared"),
    ("cryptfs ÷ JuiceFS", "cryptfs-aes-256-gcm", "plain"),
    ("shared: cryptfs ÷ JuiceFS", "cryptfs-shared", "plain"),
    ("cryptfs shared ÷ cryptfs", "cryptfs-shared", "cryptfs-aes-256-gcm"),
    ("gocryptfs shared ÷ gocryptfs", "gocryptfs-shared", "gocryptfs"),
]
JUICEFS_SHORT = {"plain": "JuiceFS alone"}
DIRECTION_JUICEFS = (
    "Every backing directory on one JuiceFS volume (bench/juicefs_mode.py). \"shared\" is "
    "cryptfs `--shared-storage` and gocryptfs `-sharedstorage`. Ratios are oriented as "
    "speed: **> 1 means the first is faster**, < 1 slower (throughput a/b, times b/a); "
    "\"cryptfs shared ÷ cryptfs\" is what the coherence rule keeps of the speed.")


def juicefs_table(res: Results, figs: list[Figure], names: list[str], markdown: bool,
                  how: str = "median") -> str:
    """The figures of each target on JuiceFS and the ratios of JUICEFS_RATIOS."""
    ratios = [r for r in JUICEFS_RATIOS if r[1] in names and r[2] in names]
    head = (["figure", "unit"] + [JUICEFS_SHORT.get(n, SHORT[n]) for n in names]
            + [r[0] for r in ratios])
    rows = []
    for fig in figs:
        if all(res.value(n, fig, how) is None for n in names):
            continue
        row = [fig.label, fig.unit + (" ↑" if fig.higher_is_better else " ↓")]
        row += [fmt(res.value(n, fig, how), fig.unit) for n in names]
        for _, a, b in ratios:
            r = speed_ratio(res, a, b, fig, how)
            row.append("-" if r is None else f"{r:.2f}×")
        rows.append(row)
    return render_table(head, rows, markdown)


def render_table(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(head) + " |",
               "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [head] + rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def runs_table(res: Results, figs: list[Figure], names: list[str],
               labels: dict[str, str] | None = None) -> str:
    head = ["figure"] + [(labels or {}).get(n, SHORT[n]) for n in names]
    out = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(names) + "|"]
    for fig in figs:
        cells = []
        for n in names:
            vs = res.values.get(n, {}).get(fig.key, [])
            cells.append(" / ".join(fmt(v, fig.unit) for v in vs) or "-")
        if any(c != "-" for c in cells):
            out.append(f"| {fig.label} ({fig.unit}) | " + " | ".join(cells) + " |")
    return "\n".join(out)


DIRECTION = ("Ratios are cryptfs ÷ the best of gocryptfs/securefs for that figure, oriented so "
             "that **> 1 means cryptfs is better** (faster) and < 1 means it is slower: for "
             "throughput figures (↑, MiB/s or ops/s) the ratio is cryptfs/best-peer, for "
             "times (↓, seconds) it is best-peer/cryptfs.")


def markdown_report(res: Results, figs: list[Figure], names: list[str], info: dict[str, str],
                    meta: dict[str, str], tar_desc: str, notes: set[str] | list[str],
                    on_juicefs: bool = False) -> str:
    tab = juicefs_table if on_juicefs else table
    lines = [
        f"# cryptfs benchmark: {meta.get('finished', '?')}", "",
        f"`{meta.get('command', '?')}` - {meta.get('runs', '?')} run(s) per figure; "
        f"wall time {meta.get('wall_min', '?')} min.", "",
        "## Machine", "",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- load average at end: {meta.get('load_end', '?')}", "",
        "## Results (median)", "", DIRECTION_JUICEFS if on_juicefs else DIRECTION, "",
        tab(res, figs, names, markdown=True), "",
        f"Tarball: {tar_desc}.", "",
        "## Results (best run)", "",
        "The fastest of the runs for each cell: on a shared machine the least disturbed run "
        "is often closer to the unloaded figure than the median. Same ratio convention.", "",
        tab(res, figs, names, markdown=True, how="best"), "",
        "## Every run", "", "Values in run order (runs rotate the order of filesystems).", "",
        runs_table(res, figs, names, JUICEFS_SHORT if on_juicefs else None), "",
    ]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in sorted(notes)] + [""]
    if res.errors:
        lines += ["## Errors", ""]
        lines += ["- " + e.splitlines()[0] + ("\n\n  ```\n  " + "\n  ".join(
            e.splitlines()[1:12]) + "\n  ```" if len(e.splitlines()) > 1 else "")
            for e in res.errors]
        lines.append("")
    if _bugs_written:
        lines += ["Bug reports: " + ", ".join(_bugs_written), ""]
    return "\n".join(lines)


def bench(args: argparse.Namespace) -> int:
    started = time.time()
    sizes = Sizes.quick() if args.quick else Sizes.medium() if args.medium else Sizes()
    names = args.fs
    ensure_tools(any(n in PEER_NAMES or n == "gocryptfs-shared" for n in names))
    workdir = Path(tempfile.mkdtemp(prefix="cryptfs-bench-", dir=args.dir))
    head_at_start = git("rev-parse", "HEAD")
    if not args.no_snapshot:
        snapshot_or_clean(workdir)
    res = Results()
    tar_desc = "(not run)"
    ctx = Ctx(sizes, Pattern(SEED), Pattern(SEED + 100))
    figs = figures(sizes, "of the tarball" if "tar" in args.workloads else "")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)  # (runs last)
        storage: JuiceStorage | None = None
        info = machine_info()
        rundir = workdir
        if args.scratch and not args.on_juicefs:
            try:
                rundir, about = stack.enter_context(scratch_ext4(workdir))
            except (RuntimeError, OSError) as e:  # (no loop device or mkfs here, say)
                os.chdir("/")
                raise SystemExit(f"bench.py: cannot make the scratch ext4 for the run: {e}\n"
                                 f"(--no-scratch runs in --dir's own filesystem)") from None
            except BaseException:
                os.chdir("/")
                raise
            info["backing filesystem"] = about
        elif not args.on_juicefs and unjournaled_ext4(workdir):
            ctx.settle = DELETE_SETTLE_S
        if args.on_juicefs:
            from juicefs_mode import juicefs_storage  # imports pytest (tests/juicefs.py)

            try:
                storage, about = stack.enter_context(juicefs_storage(args.dir))
            except BaseException:
                os.chdir("/")
                raise
            info.update(about)
        if ctx.settle:
            info["backing filesystem"] += (f" (no journal: each timed create phase starts "
                                           f"{ctx.settle:.0f} s after a sync)")
        log("machine: " + "; ".join(f"{k}={v}" for k, v in info.items()))
        try:
            if "tar" in args.workloads:
                ctx.tarball = workdir / "tree.tar"
                tar_desc = build_tarball(sizes.tar_roots, ctx.tarball)
                log(f"tarball: {tar_desc}")
            for r in range(args.runs):
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    run_one(name, rundir / f"run{r}-{name}", ctx, args.workloads, res, r + 1,
                            storage.dir if storage else None)
                    if storage is not None and not storage.alive():
                        res.errors.append(f"run {r + 1} {name}: the JuiceFS mount died:\n"
                                          + storage.log_tail())
                        raise RuntimeError("the JuiceFS mount died; its log:\n"
                                           + storage.log_tail())
        finally:
            for mp in fuse_mounts():
                if mp.startswith(str(workdir) + "/"):
                    fuse_unmount(Path(mp))
            os.chdir("/")
            # (the scratch ext4 is unmounted next, by the stack: then the rest)
            for d in rundir.iterdir() if rundir != workdir else ():
                shutil.rmtree(d, ignore_errors=True)

    if git("rev-parse", "HEAD") != head_at_start:
        note = (f"the repository's HEAD moved during the run ({head_at_start[:9]} -> "
                f"{git('rev-parse', '--short', 'HEAD')}); "
                + ("cryptfs ran from a snapshot taken at the start" if not args.no_snapshot
                   else "results may mix versions"))
        ctx.notes.add(note)
    log("")
    log(DIRECTION_JUICEFS if args.on_juicefs else DIRECTION)
    log((juicefs_table if args.on_juicefs else table)(res, figs, names, markdown=False))
    log(f"tarball: {tar_desc}")
    if res.errors:
        log("errors:\n  " + "\n  ".join(e.splitlines()[0][:300] for e in res.errors))
    for note in sorted(ctx.notes):
        log(f"note: {note}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]), "runs": str(args.runs),
            "wall_min": f"{(time.time() - started) / 60:.1f}",
            "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    out.write_text(markdown_report(res, figs, names, info, meta, tar_desc, ctx.notes,
                                   args.on_juicefs))
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "info": info, "sizes": sizes.__dict__, "runs": args.runs,
         "on_juicefs": args.on_juicefs,
         "tarball": tar_desc, "values": res.values, "errors": res.errors,
         "notes": sorted(ctx.notes), "bug_reports": _bugs_written}, indent=1))
    log(f"wrote {out} and {out.with_suffix('.json')}")
    return 1 if res.errors else 0


def render(args: argparse.Namespace) -> int:
    """Re-write the Markdown report (and print the table) from a saved .json."""
    data = json.loads(Path(args.render).read_text())
    sizes = Sizes(**data["sizes"])
    figs = figures(sizes, "of the tarball")
    res = Results(values=data["values"], errors=data.get("errors", []))
    on_juicefs = bool(data.get("on_juicefs"))
    names = [n for n in (JUICEFS_FS if on_juicefs else []) + list(TARGETS) if n in res.values]
    names = list(dict.fromkeys(names))
    meta = data.get("meta", {"runs": str(data.get("runs", "?"))})
    _bugs_written.extend(data.get("bug_reports", []))
    log((juicefs_table if on_juicefs else table)(res, figs, names, markdown=False))
    out = Path(args.out)
    out.write_text(markdown_report(res, figs, names, data["info"], meta, data["tarball"],
                                   data.get("notes", []), on_juicefs))
    log(f"wrote {out}")
    return 0


# -- profiling -----------------------------------------------------------------------------------
class Profiler:
    """Runs the cryptfs daemon (foreground) under ``py-spy record``, one file per mount."""

    def __init__(self, outdir: Path, rate: int, native: bool) -> None:
        self.outdir = outdir
        self.rate = rate
        self.native = native
        self.files: list[Path] = []
        self.exe = str(Path(sys.executable).parent / "py-spy")

    def start(self, cmd: list[str], logfile: Path) -> subprocess.Popen[bytes]:
        out = self.outdir / f"raw-{len(self.files)}.txt"
        self.files.append(out)
        spy = [self.exe, "record", "--format", "raw", "--rate", str(self.rate), "--idle",
               "-o", str(out)] + (["--native"] if self.native else [])
        with open(logfile, "ab") as lf:
            return subprocess.Popen(spy + ["--", *cmd], stdin=subprocess.DEVNULL, stdout=lf,
                                    stderr=lf)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        pass

    def take(self) -> list[Path]:
        files, self.files = self.files, []
        return files


def frame_fn(frame: str) -> str:
    """'fn (file.py:12)' -> 'fn (file.py)', paths shortened; native frames keep their library."""
    name, _, rest = frame.partition(" (")
    where = rest.rstrip(")").rsplit(":", 1)[0]
    where = where.replace(str(REPO) + "/", "").replace(sys.prefix + "/", "")
    if "/code/cryptfs/" in where:  # the snapshot
        where = where.split("/code/", 1)[1]
    for marker in ("site-packages/", "lib/python3.11/", "lib/python3/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


def _is_idle(leaf: str) -> bool:
    return any(h in leaf for h in ("get_events", "epoll_wait", "epoll"))


# Frames present in (nearly) every request: not informative in the inclusive list.
_PLUMBING = ("run (trio/", "unrolled_run (", "async_wrapper.<locals>.wrapper (",
             "_edge.<locals>.deco.<locals>.wrapped (", "_session_loop", "serve (", "__Pyx_",
             "Py_DECREF", "__pyx_gb_7pyfuse3_97generator")
# What the less obvious frames are.
_NOTES = {
    "async_wrapper.<locals>.wrapper (_pyfuse3.py)":
        "pyfuse3's Cython request loop: read(/dev/fuse), dispatch, reply (writev)",
    "writev (libc.so.6)": "replying to the kernel (read data is copied here)",
    "read (libc.so.6)": "reading requests from /dev/fuse (write data is copied here)",
    "Core._maybe_drop (cryptfs/fs/core.py)":
        "close() of the O_PATH fd on FORGET: frees the unlinked backing inode",
}


def load_stacks(files: list[Path]) -> Counter[tuple[str, ...]]:
    """py-spy raw stacks of the serving loop only (from ``serve``: startup and KDF left out)."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for fp in files:
        if not fp.exists():
            continue
        for line in fp.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [frame_fn(f) for f in stack.split(";")]
            idx = next((i for i, f in enumerate(frames) if f.startswith("serve (")), None)
            if idx is None or not any(f.startswith("run (trio/") for f in frames[idx:]):
                continue
            stacks[tuple(frames[idx + 1 :])] += int(count)
    return stacks


def summarise(files: list[Path], top: int = 10) -> str:
    stacks = load_stacks(files)
    total = sum(stacks.values())
    if not total:
        return "  (no samples)"
    busy = {s: c for s, c in stacks.items() if s and not _is_idle(s[-1])}
    btotal = sum(busy.values()) or 1
    selfc: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for s, c in busy.items():
        selfc[s[-1]] += c
        for fn in set(s):
            incl[fn] += c
    out = [f"  {total} samples of the serving loop: {1 - btotal / total:.0%} idle (waiting in "
           f"epoll for the next request), {btotal / total:.0%} busy; percentages are of the "
           f"busy samples.",
           f"  top {top} functions by self time:"]
    out += [f"    {c / btotal:6.1%}  {fn}" + (f"  - {_NOTES[fn]}" if fn in _NOTES else "")
            for fn, c in selfc.most_common(top)]
    out.append(f"  top {top} functions by inclusive time (request plumbing left out):")
    shown = 0
    for fn, c in incl.most_common():
        if any(fn.startswith(p) for p in _PLUMBING):
            continue
        out.append(f"    {c / btotal:6.1%}  {fn}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(out)


def ensure_pyspy() -> None:
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        log("installing py-spy into the venv")
        run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], timeout=900)


# Which mount sessions of each workload are profiled, and under what name (the others,
# setting up a file or checking it, are left out).
PROFILE_SESSIONS: dict[str, list[tuple[str, list[int]]]] = {
    "small": [("small files: create, listdir+stat, read, delete", [0, 1])],
    "seq": [("sequential write (128 KiB requests, +fsync)", [0]),
            ("sequential read (cold, 128 KiB requests)", [1])],
    "rand": [("random 4 KiB reads (cold)", [1]), ("random 4 KiB writes (+fsync)", [2])],
    "tar": [("tar -xf", [0]), ("rm -rf (cold)", [2])],
}


def profile(args: argparse.Namespace) -> int:
    ensure_tools(need_peers=False)
    ensure_pyspy()
    sizes = Sizes.quick() if args.quick else Sizes()
    outdir = Path(args.out).parent / "profile"
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    workdir = Path(tempfile.mkdtemp(prefix="cryptfs-profile-", dir=args.dir))
    if not args.no_snapshot:
        snapshot_or_clean(workdir)
    prof = Profiler(outdir, args.profile_rate, args.native)
    ctx = Ctx(sizes, Pattern(SEED), Pattern(SEED + 100))
    workloads = args.workloads if args.workloads_given else ["small", "seq"]
    mode = args.profile_mode
    text = [f"cryptfs code: {code_version()}",
            f"py-spy profile of the cryptfs daemon ({mode}, mounted with -f under "
            f"`py-spy record --idle{' --native' if args.native else ''}`, "
            f"{args.profile_rate} Hz); raw stacks in {outdir}/"]
    try:
        if "tar" in workloads:
            ctx.tarball = workdir / "tree.tar"
            log(f"tarball: {build_tarball(sizes.tar_roots, ctx.tarball)}")
        t = (CryptfsAudit(workdir / "vol", profiler=prof) if mode == "audit"
             else Cryptfs(workdir / "vol", mode, profiler=prof))
        t.create()
        for wl in workloads:
            t.mount()
            try:
                vals = WL_FUNCS[wl](t, ctx)
            except Exception as e:
                write_bug(f"{wl}-profile", f"{t.name}: `{wl}` failed under the profiler",
                          f"```\n{traceback.format_exc()}```\n", t)
                raise SystemExit(f"{wl} failed under the profiler: {e}") from None
            finally:
                t.unmount()
            files = prof.take()
            shown = ", ".join(f"{k}={v:.3g}" for k, v in vals.items())
            for title, idx in PROFILE_SESSIONS[wl]:
                body = summarise([files[i] for i in idx if i < len(files)], args.profile_top)
                text += ["", f"== {title}   [under the profiler: {shown}]", body]
                log("\n".join(text[-3:]))
        t.destroy()
    finally:
        for mp in fuse_mounts():
            if mp.startswith(str(workdir) + "/"):
                fuse_unmount(Path(mp))
        os.chdir("/")
        shutil.rmtree(workdir, ignore_errors=True)
    (outdir / "summary.txt").write_text("\n".join(text) + "\n")
    log(f"wrote {outdir / 'summary.txt'}")
    return 0


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 run and small sizes (for development)")
    p.add_argument("--medium", action="store_true",
                   help="sizes between --quick and the full run: 256 MiB sequential, 64 MiB "
                        "file with 1,024 random ops, 2,000 small files, tar of "
                        "/usr/include/linux and /usr/share/perl")
    p.add_argument("--runs", type=int, help="runs per figure (default 3; 1 with --quick)")
    p.add_argument("--out", default=None,
                   help="Markdown report (a .json of raw values goes beside it; default "
                        "bench/results/latest.md, with --on-juicefs bench/results/juicefs.md)")
    p.add_argument("--dir", default=None,
                   help="parent of the throw-away directories (default /tmp)")
    p.add_argument("--no-scratch", dest="scratch", action="store_false",
                   help="run in --dir's own filesystem instead of a new ext4 (with its "
                        "journal) made on a loop device for the run")
    p.add_argument("--fs", default=None,
                   help=f"comma-separated filesystems of {','.join(TARGETS)} (default: "
                        f"{','.join(DEFAULT_FS)}; with --on-juicefs {','.join(JUICEFS_FS)})")
    p.add_argument("--on-juicefs", action="store_true",
                   help="start a private redis + JuiceFS (no local cache) and put every "
                        "filesystem's backing directory on it (bench/juicefs_mode.py)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated workloads (default all: {','.join(WORKLOADS)})")
    p.add_argument("--render", metavar="JSON",
                   help="only re-write the Markdown report (--out) from a saved .json")
    p.add_argument("--no-snapshot", action="store_true",
                   help="run cryptfs from the working tree instead of a copy taken at the start")
    p.add_argument("--profile", action="store_true",
                   help="instead of the comparison: profile the cryptfs daemon under py-spy "
                        "(workloads small,seq unless --workloads is given)")
    p.add_argument("--profile-mode", default="aes-256-gcm",
                   choices=["aes-256-gcm", "xchacha20-poly1305", "audit"],
                   help="audit: aes-256-gcm with an access log (where the log's time goes)")
    p.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--profile-top", type=int, default=10, help="functions listed per profile")
    p.add_argument("--native", action="store_true",
                   help="py-spy --native: include C frames (pyfuse3, OpenSSL, libsodium)")
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.workloads_given = args.workloads != ",".join(WORKLOADS)
    if args.quick and args.medium:
        p.error("--quick or --medium, not both")
    if args.on_juicefs and args.profile:
        p.error("--on-juicefs runs the comparison, not --profile")
    args.fs = ([n.strip() for n in args.fs.split(",") if n.strip()] if args.fs is not None
               else JUICEFS_FS if args.on_juicefs else DEFAULT_FS)
    bad = [n for n in args.fs if n not in TARGETS]
    if bad:
        p.error(f"unknown filesystem(s) {bad}; choose from {list(TARGETS)}")
    args.workloads = (WORKLOADS if args.workloads == "all" else
                      [w.strip() for w in args.workloads.split(",") if w.strip()])
    bad = [w for w in args.workloads if w not in WL_FUNCS]
    if bad:
        p.error(f"unknown workload(s) {bad}; choose from {WORKLOADS}")
    args.out = os.path.abspath(args.out or HERE / "results" /
                               ("juicefs.md" if args.on_juicefs else "latest.md"))
    if args.dir:
        args.dir = os.path.abspath(args.dir)
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    if args.render:
        return render(args)
    return profile(args) if args.profile else bench(args)


if __name__ == "__main__":
    sys.exit(main())
