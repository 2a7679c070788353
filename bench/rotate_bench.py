#!/usr/bin/env python3
"""How long key rotation takes, next to copying the same data.

Run as root from the repository (``scripts/run bench rotate`` does)::

    .venv/bin/python bench/rotate_bench.py            # 10,000 files, 1 GiB; medians of 3
    .venv/bin/python bench/rotate_bench.py --quick    # 1,000 files, 64 MiB; 1 run

Workloads (each on a fresh volume, written through a real mount; ext4 under /tmp):

* ``wrap-key``  - ``cryptfs rotate --wrap-key`` of N files of 1-4 KiB, offline and
                  through the mount; next to ``cp -a`` of the same backing tree and of
                  the plaintext tree (each followed by ``sync``);
* ``reencrypt`` - ``cryptfs rotate --reencrypt`` of 1 GiB in 8 files, offline and
                  through the mount; next to ``cp`` of the backing files and
                  ``cp`` of the plaintext through the mount (each followed by ``sync``).

Every run checks the data afterwards (sha256 of every file through a mount).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CRYPTFS = [sys.executable, "-m", "cryptfs.cli.main"]
MiB = 1 << 20
PASS = b"rotation benchmark passphrase\n"


def cli(*args: str) -> str:
    res = subprocess.run(CRYPTFS + list(args), capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"cryptfs {' '.join(args)} failed:\n{res.stdout}{res.stderr}")
    return res.stdout


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Volume:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.backing = root / "backing"
        self.mnt = root / "mnt"
        self.passfile = root / "pass"
        self.passfile.write_bytes(PASS)
        self.mnt.mkdir()
        cli("init", "--no-recovery-key", str(self.backing), "--passphrase-file", str(self.passfile),
            "--kdf-memory", "8", "--kdf-iterations", "1")

    def mount(self) -> None:
        cli("mount", str(self.backing), str(self.mnt), "--passphrase-file", str(self.passfile))

    def unmount(self) -> None:
        cli("unmount", str(self.mnt))

    def rotate(self, kind: str) -> str:
        return cli("rotate", str(self.backing), f"--{kind}", "--passphrase-file", str(self.passfile))

    def digest(self) -> dict[str, str]:
        out = {}
        for p in sorted(self.mnt.rglob("*")):
            if p.is_file():
                out[str(p.relative_to(self.mnt))] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out


def small_files(vol: Volume, n: int) -> None:
    rnd = random.Random(1)
    per_dir = 1000
    for i in range(n):
        d = vol.mnt / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            d.mkdir()
        (d / f"f{i:05d}.txt").write_bytes(rnd.randbytes(rnd.randint(1024, 4096)))


def big_files(vol: Volume, total: int, count: int = 8) -> None:
    block = os.urandom(MiB)
    for i in range(count):
        with open(vol.mnt / f"big{i}.bin", "wb") as f:
            for j in range(total // count // MiB):
                f.write(block[j % 7:] + block[:j % 7])
            f.flush()
            os.fsync(f.fileno())


def copy_time(src: Path, dst: Path) -> float:
    drop_caches()
    t = timed(lambda: (subprocess.run(["cp", "-a", str(src), str(dst)], check=True), os.sync()))
    shutil.rmtree(dst)
    return t


def run_once(base: Path, kind: str, size: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for where in ("offline", "mounted"):
        vol = Volume(Path(tempfile.mkdtemp(dir=base)))
        vol.mount()
        (small_files if kind == "wrap-key" else big_files)(vol, size)
        before = vol.digest()
        if where == "offline":
            out["copy plaintext (cp -a through the mount)"] = copy_time(vol.mnt, vol.root / "copy")
            vol.unmount()
            out["copy backing (cp -a of the ciphertext)"] = copy_time(vol.backing, vol.root / "copy")
            drop_caches()
            out["rotate offline"] = timed(functools.partial(vol.rotate, kind))
            vol.mount()
        else:
            vol.unmount()
            vol.mount()
            drop_caches()
            out["rotate through the mount"] = timed(functools.partial(vol.rotate, kind))
        if vol.digest() != before:
            raise SystemExit(f"{kind} {where}: the data changed!")
        vol.unmount()
        cli("fsck", str(vol.backing), "--passphrase-file", str(vol.passfile))
        shutil.rmtree(vol.root)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 files and 64 MiB, one run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp", help="where the throw-away volumes go")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (FUSE mounts, drop_caches)")
    runs = 1 if args.quick else args.runs
    files = 1000 if args.quick else 10_000
    total = 64 * MiB if args.quick else 1024 * MiB
    base = Path(tempfile.mkdtemp(prefix="cryptfs-rotbench-", dir=args.dir))
    try:
        for kind, size, what in (("wrap-key", files, f"{files:,} files of 1-4 KiB"),
                                 ("reencrypt", total, f"{total // MiB} MiB in 8 files")):
            results: dict[str, list[float]] = {}
            for _ in range(runs):
                for k, v in run_once(base, kind, size).items():
                    results.setdefault(k, []).append(v)
            print(f"\n--{kind}, {what}: median of {runs} run(s), seconds")
            print("| | seconds | runs |\n|---|---|---|")
            for k, v in results.items():
                print(f"| {k} | {statistics.median(v):.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
