#!/usr/bin/env python3
"""Daemon CPU per request: cryptfs.fuse against pyfuse3, the same tiny filesystem on both.

Run as root, from the repository::

    .venv/bin/python bench/fuse_layer.py                # both loops, one run each
    .venv/bin/python bench/fuse_layer.py --getattrs 20000 --files 2000

The filesystem (a flat directory of in-memory files) is one ``Core`` behind two thin
front ends, so the difference is the request path alone.  Each daemon runs in its own
process; CPU is ``os.times()`` of that process (user + system), read before and after
each phase over a control pipe.  Phases:

* ``getattr``: ``fstat`` of an open file with a zero attribute timeout, so every call is
  one GETATTR round trip;
* ``small``: per file: create + write 2 KiB + close, stat, open + read + close, unlink;
  reported per file, with the number of requests the daemon saw per file.

The machine is shared: read the ratio between the loops, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 0.0


class Core:
    """A flat directory of in-memory files: what both front ends serve."""

    def __init__(self) -> None:
        now = time.time_ns()
        self.attrs: dict[int, dict[str, int]] = {1: self._attr(1, stat.S_IFDIR | 0o755, now)}
        self.names: dict[bytes, int] = {}
        self.data: dict[int, bytearray] = {}
        self.next_ino = 2
        self.ops: Counter[str] = Counter()

    @staticmethod
    def _attr(ino: int, mode: int, now: int) -> dict[str, int]:
        return {"ino": ino, "mode": mode, "nlink": 1, "size": 0, "uid": 0, "gid": 0, "time": now}

    def lookup(self, name: bytes) -> dict[str, int] | None:
        ino = self.names.get(name)
        return None if ino is None else self.attrs[ino]

    def create(self, name: bytes, mode: int) -> dict[str, int]:
        ino = self.next_ino
        self.next_ino += 1
        self.attrs[ino] = self._attr(ino, stat.S_IFREG | (mode & 0o7777), time.time_ns())
        self.data[ino] = bytearray()
        self.names[name] = ino
        return self.attrs[ino]

    def write(self, ino: int, off: int, buf: bytes) -> int:
        d = self.data[ino]
        d[off:off + len(buf)] = buf
        self.attrs[ino]["size"] = len(d)
        return len(buf)

    def unlink(self, name: bytes) -> None:
        ino = self.names.pop(name)
        del self.attrs[ino], self.data[ino]


# --- front end (a): cryptfs.fuse ------------------------------------------------------------
def serve_layer(mnt: str, core: Core) -> None:
    import errno

    from cryptfs.fuse import Attr, AttrOut, CreateOut, EntryOut, FuseError, OpenOut, Session
    from cryptfs.fuse import requests as rq

    def attr(a: dict[str, int]) -> Attr:
        return Attr(ino=a["ino"], mode=a["mode"], nlink=a["nlink"], size=a["size"], uid=a["uid"],
                    gid=a["gid"], atime_ns=a["time"], mtime_ns=a["time"], ctime_ns=a["time"])

    class LayerFS:
        def lookup(self, req: rq.NameIn) -> EntryOut:
            core.ops["lookup"] += 1
            a = core.lookup(req.name)
            if a is None:
                raise FuseError(errno.ENOENT)
            return EntryOut(a["ino"], attr(a), ENTRY_TIMEOUT, ATTR_TIMEOUT)

        def getattr(self, req: rq.GetattrIn) -> AttrOut:
            core.ops["getattr"] += 1
            return AttrOut(attr(core.attrs[req.nodeid]), ATTR_TIMEOUT)

        def setattr(self, req: rq.SetattrIn) -> AttrOut:
            core.ops["setattr"] += 1
            return AttrOut(attr(core.attrs[req.nodeid]), ATTR_TIMEOUT)

        def create(self, req: rq.CreateIn) -> CreateOut:
            core.ops["create"] += 1
            a = core.create(req.name, req.mode)
            return CreateOut(EntryOut(a["ino"], attr(a), ENTRY_TIMEOUT, ATTR_TIMEOUT), OpenOut(a["ino"]))

        def open(self, req: rq.OpenIn) -> OpenOut:
            core.ops["open"] += 1
            return OpenOut(req.nodeid)

        def read(self, req: rq.ReadIn) -> bytes:
            core.ops["read"] += 1
            return bytes(core.data[req.fh][req.offset:req.offset + req.size])

        def write(self, req: rq.WriteIn) -> int:
            core.ops["write"] += 1
            return core.write(req.fh, req.offset, req.data)

        def flush(self, req: rq.FlushIn) -> None:
            core.ops["flush"] += 1

        def release(self, req: rq.ReleaseIn) -> None:
            core.ops["release"] += 1

        def unlink(self, req: rq.NameIn) -> None:
            core.ops["unlink"] += 1
            core.unlink(req.name)

        def forget(self, req: rq.ForgetIn) -> None:
            core.ops["forget"] += 1

        def batch_forget(self, req: rq.BatchForgetIn) -> None:
            core.ops["forget"] += 1

    session = Session(LayerFS(), mnt, fsname="bench", subtype="bench")
    session.mount()
    session.install_signal_handlers()
    try:
        session.serve()
    finally:
        session.close()
        session.unmount()


# --- front end (b): pyfuse3 -----------------------------------------------------------------
def serve_pyfuse3(mnt: str, core: Core) -> None:
    import errno
    import signal

    import pyfuse3
    import trio

    def entry(a: dict[str, int]) -> Any:
        e = pyfuse3.EntryAttributes()
        e.st_ino, e.st_mode, e.st_nlink, e.st_size = a["ino"], a["mode"], a["nlink"], a["size"]
        e.st_uid, e.st_gid = a["uid"], a["gid"]
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = a["time"]
        e.entry_timeout, e.attr_timeout = ENTRY_TIMEOUT, ATTR_TIMEOUT
        e.st_blksize, e.st_blocks = 4096, (a["size"] + 511) // 512
        return e

    class Pyfuse3FS(pyfuse3.Operations):  # type: ignore[misc]
        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> Any:
            core.ops["lookup"] += 1
            a = core.lookup(name)
            if a is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return entry(a)

        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            core.ops["getattr"] += 1
            return entry(core.attrs[inode])

        async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
            core.ops["setattr"] += 1
            return entry(core.attrs[inode])

        async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
            core.ops["create"] += 1
            a = core.create(name, mode)
            return pyfuse3.FileInfo(fh=a["ino"]), entry(a)

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            core.ops["open"] += 1
            return pyfuse3.FileInfo(fh=inode)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            core.ops["read"] += 1
            return bytes(core.data[fh][off:off + size])

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            core.ops["write"] += 1
            return core.write(fh, off, buf)

        async def flush(self, fh: int) -> None:
            core.ops["flush"] += 1

        async def release(self, fh: int) -> None:
            core.ops["release"] += 1

        async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
            core.ops["unlink"] += 1
            core.unlink(name)

        async def forget(self, inode_list: Any) -> None:
            core.ops["forget"] += 1

    opts = set(pyfuse3.default_options) | {"fsname=bench"}
    opts.discard("default_permissions")
    pyfuse3.init(Pyfuse3FS(), mnt, opts)

    def unmount(signum: int, frame: object) -> None:
        threading.Thread(target=subprocess.run, args=(["umount", mnt],), daemon=True).start()
    signal.signal(signal.SIGTERM, unmount)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def control(core: Core) -> None:
    for line in sys.stdin:
        cmd = line.strip()
        t = os.times()
        if cmd == "cpu":
            out: dict[str, Any] = {"cpu": t.user + t.system, "ops": dict(core.ops)}
        else:
            out = {"error": "unknown command"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def serve(kind: str, mnt: str) -> None:
    core = Core()
    threading.Thread(target=control, args=(core,), daemon=True).start()
    (serve_layer if kind == "layer" else serve_pyfuse3)(mnt, core)


# --- the driver ---------------------------------------------------------------------------
class Daemon:
    def __init__(self, kind: str, mnt: Path) -> None:
        from cryptfs.fuse import is_mounted
        self.mnt = mnt
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(mnt)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 15
        while not is_mounted(str(mnt)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{kind} daemon did not mount")
            time.sleep(0.02)

    def cpu(self) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("cpu\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def stop(self) -> None:
        from cryptfs.fuse.mountpoint import unmount_quietly
        self.proc.terminate()
        try:
            self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            unmount_quietly(str(self.mnt))


def measure(kind: str, getattrs: int, files: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fuse-bench-") as tmp:
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        d = Daemon(kind, mnt)
        try:
            fd = os.open(mnt / "probe", os.O_CREAT | os.O_RDWR, 0o644)
            for _ in range(200):
                os.fstat(fd)
            c0, w0 = d.cpu(), time.perf_counter()
            for _ in range(getattrs):
                os.fstat(fd)
            w1, c1 = time.perf_counter(), d.cpu()
            os.close(fd)
            payload = os.urandom(2048)
            c2, w2 = d.cpu(), time.perf_counter()
            for i in range(files):
                p = mnt / f"f{i}"
                with open(p, "wb") as f:
                    f.write(payload)
                os.stat(p)
                with open(p, "rb") as f:
                    assert f.read() == payload
                os.unlink(p)
            w3, c3 = time.perf_counter(), d.cpu()
        finally:
            d.stop()
    n_req = sum(c3["ops"].values()) - sum(c2["ops"].values())
    per_op = {op: round((n - c2["ops"].get(op, 0)) / files, 2) for op, n in sorted(c3["ops"].items())}
    print(f"{kind}: requests per small file by op: {per_op}")
    return {"getattr_cpu_us": (c1["cpu"] - c0["cpu"]) / getattrs * 1e6,
            "getattr_wall_us": (w1 - w0) / getattrs * 1e6,
            "file_cpu_us": (c3["cpu"] - c2["cpu"]) / files * 1e6,
            "file_wall_us": (w3 - w2) / files * 1e6,
            "requests_per_file": n_req / files}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serve", nargs=2, metavar=("KIND", "MOUNTPOINT"), help=argparse.SUPPRESS)
    p.add_argument("--getattrs", type=int, default=20000)
    p.add_argument("--files", type=int, default=2000)
    args = p.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root (mounts)")
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    rows = {kind: measure(kind, args.getattrs, args.files) for kind in ("layer", "pyfuse3")}
    print(f"{'':<10}{'GETATTR CPU µs':>16}{'GETATTR wall µs':>17}{'file CPU µs':>13}"
          f"{'file wall µs':>14}{'requests/file':>15}")
    for kind, r in rows.items():
        print(f"{kind:<10}{r['getattr_cpu_us']:>16.1f}{r['getattr_wall_us']:>17.1f}"
              f"{r['file_cpu_us']:>13.1f}{r['file_wall_us']:>14.1f}{r['requests_per_file']:>15.1f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
