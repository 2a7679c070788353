"""Crash safety: the daemon is SIGKILLed while several processes write.

Writers (separate processes) create files one after another, each written in
random chunks; about half are fsync'ed.  Each writer keeps a journal outside
the mount: ``S name size`` before it creates a file, ``Y name size`` once fsync
has returned, ``C name size`` once close has returned, each with its time.  At
a random moment the daemon is killed (SIGKILL), then:

* every file fsync'ed before the kill reads back exactly after a remount;
* so does every file whose close() had returned before the kill (FUSE flushes a
  file's dirty pages to the daemon on close, and the daemon writes synchronously;
  only the daemon died, not the kernel, so nothing it wrote is lost);
* fsck finds damage only in files that were open (in flight) at the kill, never
  in a file of the fsync manifest;
* an in-flight file reads as EIO or as bytes that were written (or zeros of a
  hole), never as anything else.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import PASSPHRASE, make_volume, new_mount, run_cli

WRITERS = 3

WRITER = r"""
import os, random, sys, time
mnt, wid, seed, journal = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
SIZES = [0, 1, 100, 4095, 4096, 4097, 3 * 4096, 5 * 4096 + 7, 64 * 1024, 200 * 1024 + 3]

def content(name, size):
    return random.Random(name).randbytes(size)

jfd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
def note(line):
    os.write(jfd, f"{line} {time.monotonic()}\n".encode())

rng = random.Random(f"{seed}/{wid}")
deadline = time.monotonic() + 30
i = 0
try:
    while time.monotonic() < deadline:
        name = f"w{wid}-{i:04d}"
        rel = f"d{wid}/s/{name}" if i % 2 else f"d{wid}/{name}"
        i += 1
        size = rng.choice(SIZES) if rng.random() < 0.6 else rng.randrange(0, 150 * 1024)
        sync = rng.random() < 0.5
        data = content(name, size)
        note(f"S {rel} {size}")
        fd = os.open(os.path.join(mnt, rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        pos = 0
        while pos < size:
            n = rng.randint(1, 70000)
            pos += os.write(fd, data[pos:pos + n])
        if sync:
            os.fsync(fd)
            note(f"Y {rel} {size}")
        os.close(fd)
        note(f"C {rel} {size}")
except OSError as e:
    note(f"E {e.errno}")
"""


def content(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)


@dataclass
class Journal:
    """What the writers did, each step with its CLOCK_MONOTONIC time (shared by processes)."""

    started: dict[str, tuple[int, float]] = field(default_factory=dict)  # name: (size, time)
    synced: dict[str, tuple[int, float]] = field(default_factory=dict)
    closed: dict[str, tuple[int, float]] = field(default_factory=dict)
    errors: list[tuple[int, float]] = field(default_factory=list)  # (errno, time)

    @classmethod
    def read(cls, paths: list[Path]) -> Journal:
        j = cls()
        kinds = {"S": j.started, "Y": j.synced, "C": j.closed}
        for p in paths:
            if not p.exists():
                continue
            for line in p.read_text().splitlines():
                kind, *rest = line.split()
                if kind == "E":
                    j.errors.append((int(rest[0]), float(rest[1])))
                else:
                    kinds[kind][rest[0]] = (int(rest[1]), float(rest[2]))
        return j

    def closed_before(self, t: float) -> dict[str, int]:
        return {n: size for n, (size, tc) in self.closed.items() if tc < t}

    def in_flight_at(self, t: float) -> set[str]:
        """Files created but neither fsync'ed nor closed when the kill was sent.

        A close() that returns after the daemon's death may report success although
        the kernel could not hand the dirty pages over (seen here: such files read
        back empty), so only a returned fsync, or a close before the kill, promises
        the content."""
        return set(self.started) - set(self.closed_before(t)) - set(self.synced)


def wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("seed,mode,extra_delay", [
    (1, "aes-256-gcm", 0.05),
    (2, "xchacha20-poly1305", 0.4),
    (3, "aes-256-gcm", 0.9),
], ids=["seed1-aes-early", "seed2-xchacha-mid", "seed3-aes-late"])
def test_sigkill_during_writes(seed: int, mode: str, extra_delay: float, tmp_path: Path) -> None:
    passfile = tmp_path / "passphrase"
    passfile.write_bytes(PASSPHRASE + b"\n")
    backing = make_volume(tmp_path / "backing", mode)
    m = new_mount(tmp_path, backing, passfile)
    journals = [tmp_path / f"journal-{w}" for w in range(WRITERS)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        m.start()
        for w in range(WRITERS):
            m.path(f"d{w}", "s").mkdir(parents=True)
        before = {"keep.bin": content("keep.bin", 50_000)}
        m.path("keep.bin").write_bytes(before["keep.bin"])
        fd = os.open(m.path("keep.bin"), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

        procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(m.mnt), str(w),
                                   str(seed), str(journals[w])],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for w in range(WRITERS)]
        # kill once some files are safely on disk, plus a per-seed random delay
        wait_for(lambda: len(Journal.read(journals).synced) >= 3, 20, "three fsync'ed files")
        time.sleep(random.Random(seed).uniform(0, 0.3) + extra_delay)
        t_kill = time.monotonic()
        m.kill()
        for p in procs:
            _, err = p.communicate(timeout=30)
            assert p.returncode == 0, err.decode()
        j = Journal.read(journals)

        # Every writer stopped because the filesystem went away, not for another reason:
        # its first error came after the kill and is one a dead FUSE daemon causes (EIO
        # from fsync/close when the kernel could not write dirty pages back; ENOENT once
        # Mount.kill's lazy unmount has uncovered the empty mountpoint directory).
        assert len(j.errors) == WRITERS, j.errors
        assert all(t >= t_kill for _, t in j.errors), (t_kill, j.errors)
        assert {e for e, _ in j.errors} <= {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO,
                                            errno.ENOENT}, j.errors
        log = m.log_text()
        assert " ERROR: " not in log and "Traceback" not in log, log
        in_flight = j.in_flight_at(t_kill)
        closed = j.closed_before(t_kill)
        synced = {n: size for n, (size, _) in j.synced.items()}
        open_at_kill = set(j.started) - set(closed)
        assert len(synced) >= 3 and open_at_kill, (len(synced), open_at_kill)

        assert os.listdir(m.mnt) == []  # nothing was written beside the dead mount
        res = run_cli("fsck", str(backing), "--passphrase-file", str(passfile), check=False)
        assert "Traceback" not in res.stderr, res.stderr
        damaged = {ln[len("damaged: "):].split(": ")[0].lstrip("/")
                   for ln in res.stdout.splitlines() if ln.startswith("damaged: ")}
        assert res.returncode == (6 if damaged else 0), res.stdout + res.stderr
        assert not damaged & set(synced), (damaged, res.stdout)
        assert damaged <= in_flight, (damaged - in_flight, res.stdout)

        m.start()
        assert sorted(os.listdir(m.mnt)) == sorted([*(f"d{w}" for w in range(WRITERS)),
                                                     "keep.bin"])
        on_mount = set()
        for w in range(WRITERS):
            on_mount |= {f"d{w}/{n}" for n in os.listdir(m.path(f"d{w}")) if n != "s"}
            on_mount |= {f"d{w}/s/{n}" for n in os.listdir(m.path(f"d{w}", "s"))}
        assert set(closed) <= on_mount <= set(j.started)
        assert m.path("keep.bin").read_bytes() == before["keep.bin"]
        for rel, size in {**closed, **synced}.items():
            data = m.path(rel).read_bytes()
            assert len(data) == size and data == content(rel.split("/")[-1], size), rel
        for rel in in_flight & on_mount:
            expect = content(rel.split("/")[-1], j.started[rel][0])
            try:
                data = m.path(rel).read_bytes()
            except OSError as e:
                assert e.errno == errno.EIO, (rel, e)
                assert rel in damaged, f"{rel} reads as EIO but fsck did not report it"
                continue
            assert len(data) <= len(expect), rel
            assert all(b == expect[i] or b == 0 for i, b in enumerate(data)), rel
        # the volume is fully usable again
        m.path("after.txt").write_bytes(b"after the crash")
        assert m.path("after.txt").read_bytes() == b"after the crash"
        assert "Traceback" not in m.log_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        m.stop()
