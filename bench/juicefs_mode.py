"""The storage of ``bench.py --on-juicefs``: one private redis + JuiceFS volume, mounted once.

The redis-server, the ``juicefs format`` and the ``juicefs mount`` are tests/juicefs.py's
(the same code the two-server tests use): a redis on a unix socket in a private
directory, the data in a local object directory (``--storage file``), the mount with
``--attr-cache 0 --entry-cache 0 --dir-entry-cache 0`` as docs/MULTISERVER.md asks of
a volume that several servers share, and here ``--cache-size 0``: no local block cache,
so a read after the benchmark's ``drop_caches`` fetches its blocks from the object
directory again (cold for JuiceFS too, not only for the kernel).

Every target's backing directory is made under :attr:`JuiceStorage.dir`; mountpoints,
the code snapshot and the tarball stay on local disk (the tarball is read into the
page cache before ``tar -xf`` is timed, which a JuiceFS file without a cache would not
keep).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import pytest  # noqa: E402 - tests/juicefs.py reports a failed start with pytest.fail
from juicefs import NO_METADATA_CACHE, JuiceMount, juicefs_binary, juicefs_volume  # noqa: E402

CACHE_MIB = 0  # JuiceFS's local block cache: none


@dataclass
class JuiceStorage:
    mount: JuiceMount
    dir: Path  # where the targets' backing directories go

    def alive(self) -> bool:
        return os.path.ismount(self.mount.mnt) and (
            self.mount.proc is None or self.mount.proc.poll() is None)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.mount.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _first_line(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    out = (res.stdout + res.stderr).strip()
    return out.splitlines()[0] if out else "?"


def describe(storage: JuiceStorage, objects: Path) -> dict[str, str]:
    """What the report's machine section says about the storage."""
    fs = _first_line(["findmnt", "-no", "FSTYPE,SOURCE", "-T", str(objects)])
    return {
        "backing filesystem": (
            f"JuiceFS ({_first_line([juicefs_binary(), 'version'])}), metadata in a private "
            f"{_first_line(['redis-server', '--version'])} on a unix socket (appendfsync "
            f"always), data in a local object directory on {fs}"),
        "juicefs mount options": " ".join(
            ["--cache-size", str(CACHE_MIB), "--enable-xattr", *NO_METADATA_CACHE]),
    }


@contextmanager
def juicefs_storage(parent: str | None) -> Iterator[tuple[JuiceStorage, dict[str, str]]]:
    """Start redis and JuiceFS (one mount, no local cache); tear both down afterwards."""
    try:
        with juicefs_volume(("bench",), cache_mib=CACHE_MIB, parent=parent) as vol:
            storage = JuiceStorage(vol.mounts[0], vol.mounts[0].mnt / "bench")
            storage.dir.mkdir()
            yield storage, describe(storage, vol.objects)
    except pytest.fail.Exception as e:  # redis or juicefs missing or not starting
        raise SystemExit(f"bench.py: error: JuiceFS did not start: {e}") from None
