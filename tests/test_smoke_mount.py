"""The shortest path through a real mount: write, read back, see only ciphertext below."""

import re
from pathlib import Path

import pytest

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
    """The daemon's own count of what the kernel asked, logged at unmount (for an
    operator; bench/requests.py counts with the kernel's trace event, for every
    filesystem): one CREATE per new file, one UNLINK per removal, and a total
    that is the sum of its parts."""
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
    # Beside it, the loop's time per request of each kind, the largest share first.
    timed = re.findall(r"time per request, decode to reply written: (.*)", mount.log_text())
    assert timed, mount.log_text()
    per = {name: (float(us), int(share)) for name, us, share in
           re.findall(r"([a-z_]+) ([\d.]+) us \((\d+)%\)", timed[-1])}
    assert set(per) == set(counts), (per, counts)
    assert all(us > 0 for us, _ in per.values()), per
    shares = [share for _, share in per.values()]
    assert shares == sorted(shares, reverse=True)
    assert abs(sum(shares) - 100) <= len(shares), shares   # (each rounded to a percent)


def _loop_line(mount: Mount) -> tuple[int, int, int]:
    found = re.findall(r"request loop: (\d+) requests found by polling, (\d+) polls ran out, "
                       r"slept (\d+) times", mount.log_text())
    assert found, mount.log_text()
    polled, missed, sleeps = (int(x) for x in found[-1])
    return polled, missed, sleeps


@pytest.mark.serial
def test_the_daemon_polls_for_requests_unless_told_not_to(mount: Mount) -> None:
    """Default: a program working through files finds the daemon polling (docs/FUSE.md,
    "Polling for the next request"); --idle-poll 0: it sleeps after every answer."""
    for i in range(200):
        mount.path(f"f{i}").write_bytes(b"x" * 100)
    mount.stop()
    polled, _, sleeps = _loop_line(mount)
    # About 1,400 requests.  How many arrive within the poll window depends on the
    # host's scheduling: 351-1,372 found by polling in 30 runs here (once fewer than
    # the sleeps), so the bound is one that only a loop that does not poll misses.
    assert polled >= 100, (polled, sleeps)
    mount.start("--idle-poll", "0")
    for i in range(200):
        assert mount.path(f"f{i}").read_bytes() == b"x" * 100
    mount.stop()
    polled, missed, sleeps = _loop_line(mount)
    # Never polls.  It sleeps whenever it finds no request: about once per file read
    # when quiet (196 in one run), fewer under load, where the next request is often
    # queued already (a RELEASE does not make close(2) wait): 99 in one CI run.
    assert polled == missed == 0 and sleeps >= 20, (polled, missed, sleeps)


def test_idle_poll_out_of_range_is_refused(mount: Mount) -> None:
    mount.stop()
    res = run_cli("mount", str(mount.backing), str(mount.mnt), *mount.mount_args(),
                  "--idle-poll", "20000", check=False)
    assert res.returncode == 2 and "--idle-poll" in res.stderr and "10000" in res.stderr
    assert "Traceback" not in res.stderr and not mount.mnt.is_mount()


def test_the_help_names_the_loops_own_default() -> None:
    from cryptfs.fuse.session import POLL_NS
    res = run_cli("mount", "--help")
    assert f"(default {POLL_NS // 1000};" in " ".join(res.stdout.split())
