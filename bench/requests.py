#!/usr/bin/env python3
"""Requests per small file and daemon CPU per request: cryptfs, beside gocryptfs and securefs.

Run as root, from the repository::

    .venv/bin/python bench/requests.py                  # 2,000 files, 20,000 GETATTRs
    .venv/bin/python bench/requests.py --files 500 --getattrs 5000

For each kind of mount (passphrase; passphrase without polling for requests, whose
CPU time is the handlers' work alone; shared ``--agent`` mount with two users unlocked,
root and a supervisor; passphrase with an access log) it

* counts the requests the kernel sends for one small file's life: create + write
  1,000 bytes + close, stat, open + read + close, unlink.  The counts are the
  daemon's own (``served N requests: ...``, logged at unmount), minus those of a
  mount that did nothing;
* reads the daemon's CPU time (``/proc/PID/stat``, user + system) around the same
  work, so the per-file figure is the daemon's alone, not the benchmark's;
* times ``statx(AT_STATX_FORCE_SYNC)`` on an open file, which makes the kernel ask
  the daemon every time: one GETATTR round trip per call.

gocryptfs and securefs are measured the same way, CPU and time only (they do not
count their requests).  The machine is shared: read these as one run's figures, not as a benchmark of record.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (  # noqa: E402
    Cryptfs,
    CryptfsAgent,
    CryptfsAudit,
    Gocryptfs,
    Securefs,
    Target,
    cryptfs_cmd,
    run,
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


class CryptfsNoPoll(Cryptfs):
    """The passphrase mount with ``--idle-poll 0``: the loop sleeps after every answer,
    so the daemon's CPU time is its work alone.  (With polling, CPU time also counts
    the polling, which runs while the client works: CPU then tracks wall time.)"""

    def __init__(self, base: Path) -> None:
        super().__init__(base, "aes-256-gcm")
        self.name = "cryptfs-aes-256-gcm, --idle-poll 0"

    def mount_args(self) -> list[str]:
        return super().mount_args() + ["--idle-poll", "0"]


def statx_sync(fd: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    if _libc.statx(fd, b"", AT_EMPTY_PATH | AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def daemon_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (its CPU-time clock:
    nanoseconds, where /proc/PID/stat counts 10 ms ticks)."""
    return time.clock_gettime((~pid << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)


def served(logfile: Path) -> Counter[str]:
    """The request counts of the last unmount logged in ``logfile``."""
    lines = re.findall(r"served \d+ requests: (.*)", logfile.read_text())
    if not lines:
        raise RuntimeError(f"no request counts in {logfile}")
    counts: Counter[str] = Counter()
    for part in lines[-1].split(", "):
        if part != "none":
            name, n = part.rsplit(" ", 1)
            counts[name.upper()] = int(n)
    return counts


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


def small_files(root: Path, n: int) -> None:
    data = os.urandom(1000)
    names = [root / f"f{i:05d}" for i in range(n)]
    for p in names:
        with open(p, "wb") as f:
            f.write(data)
    for p in names:
        os.stat(p)
    for p in names:
        with open(p, "rb") as f:
            assert f.read() == data
    for p in names:
        os.unlink(p)


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
    counted = isinstance(target, Cryptfs)  # (peers do not report their requests)
    target.create()
    try:
        idle: Counter[str] = Counter()
        if counted:
            target.mount()
            target.unmount()
            idle = served(target.logfile)

        target.mount()
        pid = daemon_pid(target)
        cpu0, t0 = daemon_cpu(pid), time.perf_counter()
        small_files(target.mnt, files)
        cpu1, t1 = daemon_cpu(pid), time.perf_counter()
        target.unmount()
        work = served(target.logfile) - idle if counted else Counter()

        target.mount()
        pid = daemon_pid(target)
        (target.mnt / "g").write_bytes(b"x")
        fd = os.open(target.mnt / "g", os.O_RDONLY)
        buf = ctypes.create_string_buffer(256)
        statx_sync(fd, buf)
        cpu2, t2 = daemon_cpu(pid), time.perf_counter()
        for _ in range(getattrs):
            statx_sync(fd, buf)
        cpu3, t3 = daemon_cpu(pid), time.perf_counter()
        os.close(fd)
        target.unmount()
        ga = served(target.logfile)["GETATTR"] if counted else 0
    finally:
        try:
            target.unmount()
        finally:
            target.destroy()
    return {
        "name": target.name,
        "per_file": {k: v / files for k, v in sorted(work.items(), key=lambda kv: -kv[1])},
        "requests_per_file": sum(work.values()) / files if counted else None,
        "cpu_us_per_file": (cpu1 - cpu0) / files * 1e6,
        "wall_us_per_file": (t1 - t0) / files * 1e6,
        "getattr_seen": ga,
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
    work = Path(tempfile.mkdtemp(prefix="cryptfs-requests-", dir=args.workdir))
    os.chmod(work, 0o755)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    results = []
    try:
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
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}\n")
    print("| mount | requests per small file | daemon CPU µs per file | wall µs per file "
          "| daemon CPU µs per GETATTR | wall µs per GETATTR |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        rpf = r["requests_per_file"]
        print(f"| {r['name']} | {'–' if rpf is None else f'{rpf:.1f}'} | {r['cpu_us_per_file']:.0f} "
              f"| {r['wall_us_per_file']:.0f} | {r['cpu_us_per_getattr']:.1f} "
              f"| {r['wall_us_per_getattr']:.1f} |")
    print()
    for r in results:
        if r["requests_per_file"] is None:
            continue
        per = r["per_file"]
        assert isinstance(per, dict)
        print(f"{r['name']}: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()))
        print(f"  (GETATTR requests seen in the statx phase: {r['getattr_seen']})")


if __name__ == "__main__":
    main()
