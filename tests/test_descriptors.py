"""A mount with more files in use than descriptors to hold them.

Each inode the kernel remembers holds a descriptor in the daemon, and the
kernel forgets inodes only under memory pressure: a walk over more files than
the daemon's descriptor limit made every later lookup fail with EMFILE, for
every user of the mount. The mount now hands its oldest unused inodes back to
the kernel (cryptfs.fs.shedder). Here a real mount runs under a limit of 1,024
descriptors and serves 4,000 files, three times over.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import CRYPTFS, Mount, new_mount, run_cli

LIMIT = 1024


def _start_limited(m: Mount) -> None:
    """The mount's daemon under a descriptor limit it cannot raise (soft and hard)."""
    cmd = " ".join(f"'{a}'" for a in [*CRYPTFS, "mount", str(m.backing), str(m.mnt),
                                       "--passphrase-file", str(m.passfile),
                                       "--log-file", str(m.log), "--pid-file", str(m.pidfile)])
    res = subprocess.run(["bash", "-c", f"ulimit -n {LIMIT} && exec {cmd}"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def _raise(e: OSError) -> None:
    raise e  # (os.walk skips what it cannot list, silently)


def test_more_files_than_descriptors(tmp_path: Path, backing: Path, passfile: Path) -> None:
    m = new_mount(tmp_path, backing, passfile)
    m.mnt.mkdir(exist_ok=True)
    _start_limited(m)
    try:
        assert f"Max open files            {LIMIT}" in Path(f"/proc/{m.pid}/limits").read_text()
        expect = {}
        for d in range(4):
            (m.mnt / f"d{d}").mkdir()
            for i in range(1000):
                name = f"d{d}/f{i}"
                (m.mnt / name).write_text(name)
                expect[name] = name
        for _ in range(3):
            seen = {}
            for root, _dirs, files in os.walk(m.mnt, onerror=_raise):
                for f in files:
                    p = Path(root, f)
                    os.stat(p)
                    seen[str(p.relative_to(m.mnt))] = p.read_text()
            assert seen == expect
            assert len(os.listdir(m.mnt / "d3")) == 1000
        held = len(os.listdir(f"/proc/{m.pid}/fd"))
        assert held < LIMIT, held
    finally:
        run_cli("unmount", str(m.mnt))
    log = m.log.read_text()
    assert "asked the kernel to forget" in log, log
    assert "Too many open files" not in log and "hidden" not in log, log
