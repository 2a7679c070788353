#!/usr/bin/env python3
"""What cryptfs's shared-storage rule costs on JuiceFS (docs/MULTISERVER.md, docs/PERFORMANCE.md).

Run as root from the repository (uses tests/juicefs.py's redis + JuiceFS set-up)::

    .venv/bin/python bench/shared_storage.py [--files 1000] [--mib 64]

One run each, in one JuiceFS volume: JuiceFS alone, cryptfs over it, and
cryptfs ``--shared-storage`` over it.  Workloads: ``small`` (N files of 2 KiB:
create+write+close, stat, read, delete) and ``seq`` (one file of M MiB written
in 128 KiB requests with fsync, then read back after a remount).  Every byte
read is compared with what was written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from juicefs import juicefs_pair  # noqa: E402

from conftest import PASSPHRASE, Mount, make_volume  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def small(root: Path, n: int) -> dict[str, float]:
    d = root / "small"
    d.mkdir()
    data = [os.urandom(2048) for _ in range(n)]

    def create() -> None:
        for i, b in enumerate(data):
            with open(d / f"f{i}", "wb") as f:
                f.write(b)

    def stat() -> None:
        for i in range(n):
            os.stat(d / f"f{i}")

    def read() -> None:
        for i, b in enumerate(data):
            assert (d / f"f{i}").read_bytes() == b

    def delete() -> None:
        for i in range(n):
            os.unlink(d / f"f{i}")

    return {k: timed(f) for k, f in (("create", create), ("stat", stat), ("read", read),
                                     ("delete", delete))}


def seq(root: Path, mib: int, remount: Callable[[], None]) -> dict[str, float]:
    chunk = os.urandom(128 << 10)
    count = (mib << 20) // len(chunk)

    def write() -> None:
        with open(root / "big", "wb") as f:
            for _ in range(count):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())

    def read() -> None:
        with open(root / "big", "rb") as f:
            for _ in range(count):
                assert f.read(len(chunk)) == chunk

    w = timed(write)
    remount()
    return {"seq write": w, "seq read": timed(read)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    gen = juicefs_pair()
    pair = next(gen)
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        plain = pair.a.mnt / "plain"
        plain.mkdir()

        def remount_juicefs() -> None:
            pair.a.stop()
            pair.a.start()

        rows.append(("JuiceFS alone", {**small(plain, args.files),
                                       **seq(plain, args.mib, remount_juicefs)}))
        pf = pair.root / "pass"
        pf.write_bytes(PASSPHRASE + b"\n")
        for label, extra in (("cryptfs over JuiceFS", ()),
                             ("cryptfs --shared-storage over JuiceFS", ("--shared-storage",))):
            name = "vol-" + ("shared" if extra else "local")
            make_volume(pair.a.mnt / name)
            m = Mount(pair.a.mnt / name, pair.root / f"mnt-{name}", pair.root / f"{name}.log",
                      pair.root / f"{name}.pid", pf)
            m.start(*extra)

            def remount(m: Mount = m, extra: tuple[str, ...] = extra) -> None:
                m.stop()
                m.start(*extra)

            try:
                rows.append((label, {**small(m.mnt, args.files), **seq(m.mnt, args.mib, remount)}))
            finally:
                m.stop()
    finally:
        for _ in gen:
            pass
    print(f"| {args.files} files of 2 KiB; one file of {args.mib} MiB (s) | "
          "create | stat | read | delete | seq write+fsync | seq read |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        keys = ("create", "stat", "read", "delete", "seq write", "seq read")
        print(f"| {label} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
