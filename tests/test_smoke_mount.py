"""The shortest path through a real mount: write, read back, see only ciphertext below."""

import re
from pathlib import Path

from conftest import Mount, run_cli


def test_write_read_and_backing_is_ciphertext(mount: Mount) -> None:
    secret = b"CUSTOMER-4711 Zhang Wei +86 138 0013 8000\n" * 100
    mount.path("notes.txt").write_bytes(secret)
    assert mount.path("notes.txt").read_bytes() == secret
    assert sorted(p.name for p in mount.mnt.iterdir()) == ["notes.txt"]
    backing_files = [p for p in mount.backing.rglob("*") if p.is_file()]
    for p in backing_files:
        raw = p.read_bytes()
        assert b"Zhang" not in raw and b"CUSTOMER" not in raw
        assert b"notes" not in p.name.encode()
    mount.stop()
    mount.start()
    assert mount.path("notes.txt").read_bytes() == secret


def test_fsck_clean_after_use(mount: Mount, passfile: Path) -> None:
    mount.path("d").mkdir()
    mount.path("d", "f").write_bytes(b"x" * 10000)
    mount.stop()
    res = run_cli("fsck", str(mount.backing), "--passphrase-file", str(passfile))
    assert "clean" in res.stdout
    assert "2 directories, 1 files" in res.stdout


def test_unmount_logs_the_requests_served_by_opcode(mount: Mount) -> None:
    """The daemon's own count of what the kernel asked (the benchmark's
    bench/requests.py reads this line): one CREATE per new file, one UNLINK per
    removal, and a total that is the sum of its parts."""
    for i in range(25):
        mount.path(f"f{i}").write_bytes(b"x" * 100)
    for i in range(10):
        mount.path(f"f{i}").unlink()
    mount.stop()
    lines = re.findall(r"served (\d+) requests: (.*)", mount.log_text())
    assert lines, mount.log_text()
    total, parts = lines[-1]
    counts = {name: int(n) for name, n in (p.rsplit(" ", 1) for p in parts.split(", "))}
    assert counts["create"] == 25 and counts["unlink"] == 10, counts
    assert counts["init"] == 1
    assert sum(counts.values()) == int(total)
