#!/usr/bin/env python3
"""Requests per small file and daemon CPU per request: cryptfs, beside gocryptfs and securefs.

Run as root, from the repository::

    .venv/bin/python bench/requests.py                  # 2,000 files, 20,000 GETATTRs
    .venv/bin/python bench/requests.py --files 500 --getattrs 5000

For each kind of mount (passphrase; passphrase without polling for requests, whose
CPU time is the handlers' work alone; shared ``--agent`` mount with two users unlocked,
root and a supervisor; passphrase with an access log) it

* counts the requests the kernel sends for one small file's life, phase by phase:
  create + write 1,000 bytes + close, stat, open + read + close, unlink (``os.open``,
  as bench/bench.py does: Python's ``open()`` would add an ioctl(TCGETS) per open).
  The counts are the kernel's own, from its ``fuse:fuse_request_send`` trace event for
  that mount's connection, so every filesystem is counted the same way (FORGETs are
  queued apart from requests and not counted);
* reads the daemon's CPU time (its process CPU clock) around the same work, so the
  per-file figure is the daemon's alone, not the benchmark's;
* times ``statx(AT_STATX_FORCE_SYNC)`` on an open file, which makes the kernel ask
  the daemon every time: one GETATTR round trip per call;
* for cryptfs, prints the daemon's own time per request of each kind (logged at
  unmount: from decoding the request to its reply written), over the whole mount.

Every volume lives on a new ext4 with a journal made for the run (bench/bench.py's
scratch filesystem), unless ``--workdir`` is given.  The machine is shared: read these
as one run's figures, not as a benchmark of record.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (  # noqa: E402
    Cryptfs,
    CryptfsAgent,
    CryptfsAudit,
    CryptfsNoPoll,
    Gocryptfs,
    Securefs,
    Target,
    cryptfs_cmd,
    run,
    scratch_ext4,
)

SECOND_USER = "cryptfs-bench"
AT_EMPTY_PATH = 0x1000
AT_STATX_FORCE_SYNC = 0x2000
STATX_BASIC_STATS = 0x7FF
_libc = ctypes.CDLL(None, use_errno=True)
AS_USER = """
import os, pwd, sys
import cryptfs.cli.main
user = pwd.getpwnam(sys.argv[1])
os.setgroups([]); os.setgid(user.pw_gid); os.setuid(user.pw_uid)
sys.argv = ["cryptfs", *sys.argv[2:]]
cryptfs.cli.main.main()
"""


def statx_sync(fd: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    if _libc.statx(fd, b"", AT_EMPTY_PATH | AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def daemon_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (its CPU-time clock:
    nanoseconds, where /proc/PID/stat counts 10 ms ticks)."""
    return time.clock_gettime((~pid << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)


class AgentTwoUsers(CryptfsAgent):
    """The shared mount with root and one supervisor unlocked (the workload runs as root)."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.name = "cryptfs-agent-2users"
        self.second = base / "second.pass"

    def create(self) -> None:
        super().create()
        if subprocess.run(["id", SECOND_USER], capture_output=True).returncode != 0:
            run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 SECOND_USER])
        self.second.write_text("second user's passphrase\n")
        shutil.chown(self.second, SECOND_USER)
        os.chmod(self.base, 0o755)
        run(cryptfs_cmd() + ["user", "add", str(self.backing), SECOND_USER, "--role", "supervisor",
                             "--passphrase-file", str(self.passfile), "--new-passphrase-file",
                             str(self.second), *self.KDF])

    def mount(self) -> None:
        super().mount()
        uid = int(subprocess.run(["id", "-u", SECOND_USER], capture_output=True, text=True,
                                 check=True).stdout)
        # (the interpreter may live where the user cannot reach it, e.g. under /root:
        # import the command line as root, then drop to the user for good)
        run([sys.executable, "-c", AS_USER, SECOND_USER, "unlock", str(self.backing),
             "--passphrase-file", str(self.second), "--agent-socket", str(self.socket)])
        deadline = time.monotonic() + 10
        while f"uid {uid} unlocked" not in self.logfile.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the agent mount never saw the second user's unlock")
            time.sleep(0.02)


TRACING = Path("/sys/kernel/tracing")
SEND_EVENT = TRACING / "events/fuse/fuse_request_send"
PHASES = ("create", "stat", "read", "unlink")


class KernelCount:
    """The requests the kernel sends to one FUSE connection, by opcode, from its
    ``fuse:fuse_request_send`` trace event (recent kernels have it: 6.18 here)."""

    @staticmethod
    def available() -> str | None:
        """None if the event can be used (tracefs mounted here if need be), else why not."""
        if not SEND_EVENT.is_dir() and not TRACING.joinpath("events").is_dir():
            run(["mount", "-t", "tracefs", "nodev", str(TRACING)], check=False)
        if not SEND_EVENT.is_dir():
            return (f"this kernel has no fuse:fuse_request_send trace event ({SEND_EVENT} "
                    f"is missing: an older kernel)")
        return None

    def __init__(self, mnt: Path) -> None:
        # (the event's connection is the kernel's dev_t of the mount: an anonymous
        # device, major 0, so its minor number)
        self.filter = f"connection == {os.minor(os.stat(mnt).st_dev)}"

    @staticmethod
    @contextlib.contextmanager
    def buffer(kib: int = 65536) -> Iterator[None]:
        """The trace buffer at ``kib`` per CPU (a small file's life fits many times
        over), put back as it was after."""
        size = TRACING / "buffer_size_kb"
        before = size.read_text().split()[0]  # (e.g. "7 (expanded: 1408)": the first)
        size.write_text(str(kib))
        try:
            yield
        finally:
            (TRACING / "trace").write_text("")
            size.write_text(before)

    def __enter__(self) -> Counter[str]:
        self.counts: Counter[str] = Counter()
        (SEND_EVENT / "enable").write_text("0")
        (TRACING / "trace").write_text("")
        (SEND_EVENT / "filter").write_text(self.filter)
        (SEND_EVENT / "enable").write_text("1")
        return self.counts

    def __exit__(self, *exc: object) -> None:
        (SEND_EVENT / "enable").write_text("0")
        (SEND_EVENT / "filter").write_text("0")
        text = (TRACING / "trace").read_text()
        seen = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
        if seen is None or seen[1] != seen[2]:
            raise RuntimeError("the trace buffer lost events: " + (seen[0] if seen else "?"))
        self.counts.update(re.findall(r"opcode \d+ \(FUSE_(\w+)\)", text))


def small_files(root: Path, n: int, count: KernelCount) -> dict[str, Counter[str]]:
    """One small file's life, ``n`` times, phase by phase; the kernel's requests of each."""
    data = os.urandom(1000)
    names = [str(root / f"f{i:05d}") for i in range(n)]
    phases: dict[str, Counter[str]] = {}
    with count as phases["create"]:
        for p in names:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.write(fd, data)
            os.close(fd)
    with count as phases["stat"]:
        for p in names:
            os.stat(p)
    with count as phases["read"]:
        for p in names:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            if os.read(fd, 4096) != data:
                raise RuntimeError(f"{p}: read back wrong")
            os.close(fd)
    with count as phases["unlink"]:
        for p in names:
            os.unlink(p)
    return phases


def daemon_pid(target: Target) -> int:
    """The process that answers the kernel (a peer's foreground daemon, or cryptfs's)."""
    pid = getattr(target, "pid", None)
    if pid is None:
        proc = getattr(target, "proc", None)
        pid = proc.pid if proc is not None else None
    if pid is None:
        raise RuntimeError(f"{target.name}: no daemon process to measure")
    return int(pid)


def measure(target: Target, files: int, getattrs: int) -> dict[str, object]:
    target.create()
    try:
        target.mount()
        pid = daemon_pid(target)
        count = KernelCount(target.mnt)
        cpu0, t0 = daemon_cpu(pid), time.perf_counter()
        phases = small_files(target.mnt, files, count)
        cpu1, t1 = daemon_cpu(pid), time.perf_counter()

        (target.mnt / "g").write_bytes(b"x")
        fd = os.open(target.mnt / "g", os.O_RDONLY)
        buf = ctypes.create_string_buffer(256)
        statx_sync(fd, buf)
        with count as ga:
            cpu2, t2 = daemon_cpu(pid), time.perf_counter()
            for _ in range(getattrs):
                statx_sync(fd, buf)
            cpu3, t3 = daemon_cpu(pid), time.perf_counter()
        os.close(fd)
        target.unmount()
        # cryptfs logs the loop's time per request of each kind at unmount
        timed = re.findall(r"time per request, decode to reply written: (.*)",
                           target.logfile.read_text()) if isinstance(target, Cryptfs) else []
    finally:
        try:
            target.unmount()
        finally:
            target.destroy()
    return {
        "timed": timed[-1] if timed else None,
        "name": target.name,
        "phases": {ph: {k: v / files for k, v in c.most_common()} for ph, c in phases.items()},
        "requests_per_file": sum(sum(c.values()) for c in phases.values()) / files,
        "cpu_us_per_file": (cpu1 - cpu0) / files * 1e6,
        "wall_us_per_file": (t1 - t0) / files * 1e6,
        "getattr_seen": ga["GETATTR"],
        "cpu_us_per_getattr": (cpu3 - cpu2) / getattrs * 1e6,
        "wall_us_per_getattr": (t3 - t2) / getattrs * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000, help="small files per mount")
    ap.add_argument("--getattrs", type=int, default=20000, help="GETATTR round trips timed")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the throw-away volumes go (default: a temporary directory)")
    ap.add_argument("--only", default="passphrase,nopoll,agent,audit,gocryptfs,securefs",
                    help="which mounts, comma-separated (default: %(default)s)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/requests.py: run as root (it mounts, adds a system user, drops caches)")
    why_not = KernelCount.available()
    if why_not is not None:
        sys.exit(f"bench/requests.py: cannot count requests: {why_not}")
    top = Path(tempfile.mkdtemp(prefix="cryptfs-requests-", dir=args.workdir))
    os.chmod(top, 0o755)  # (the agent mount's second user reaches its socket below)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    results = []
    try:
        with contextlib.ExitStack() as stack:
            work = top
            if args.workdir is None:
                try:
                    work, about = stack.enter_context(scratch_ext4(top))
                except (RuntimeError, OSError) as e:
                    sys.exit(f"bench/requests.py: cannot make the scratch ext4: {e}\n"
                             f"(--workdir DIR runs in that directory's own filesystem)")
                print(f"backing filesystem: {about}")
            os.chmod(work, 0o755)
            stack.enter_context(KernelCount.buffer())
            kinds = {"passphrase": lambda: Cryptfs(work / "passphrase", "aes-256-gcm"),
                     "nopoll": lambda: CryptfsNoPoll(work / "nopoll"),
                     "agent": lambda: AgentTwoUsers(work / "agent"),
                     "audit": lambda: CryptfsAudit(work / "audit"),
                     "gocryptfs": lambda: Gocryptfs(work / "gocryptfs"),
                     "securefs": lambda: Securefs(work / "securefs")}
            for kind in args.only.split(","):
                if kind not in kinds:
                    sys.exit(f"bench/requests.py: --only: no mount kind {kind!r} "
                             f"(choose from {', '.join(kinds)})")
                results.append(measure(kinds[kind](), args.files, args.getattrs))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}\n")
    print("| mount | requests per small file | daemon CPU µs per file | wall µs per file "
          "| daemon CPU µs per GETATTR | wall µs per GETATTR |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['requests_per_file']:.1f} | {r['cpu_us_per_file']:.0f} "
              f"| {r['wall_us_per_file']:.0f} | {r['cpu_us_per_getattr']:.1f} "
              f"| {r['wall_us_per_getattr']:.1f} |")
    print()
    print("Requests per file, phase by phase (the kernel's count; FORGETs not included):\n")
    print("| mount | " + " | ".join(PHASES) + " |")
    print("|---|" + "---|" * len(PHASES))
    for r in results:
        phases = r["phases"]
        assert isinstance(phases, dict)
        cells = []
        for ph in PHASES:
            per = phases[ph]
            cells.append(f"{sum(per.values()):.0f}: " + ", ".join(
                f"{k}" if round(v, 2) == 1 else f"{k} ×{v:.2f}" for k, v in per.items()
                if v >= 0.01) if per else "0")
        print(f"| {r['name']} | " + " | ".join(cells) + " |")
    print()
    for r in results:
        print(f"{r['name']}: GETATTR requests seen in the {args.getattrs} statx calls: "
              f"{r['getattr_seen']}")
    print()
    for r in results:
        if r["timed"]:
            print(f"{r['name']}, the daemon's time per request (decode to reply written; "
                  f"share of its time in requests), the whole mount: {r['timed']}")


if __name__ == "__main__":
    main()
