"""Trusted programs against a forged executable (issue 12, part 3).

Any user may make a user namespace, hold CAP_SYS_ADMIN in it, and with
prctl(PR_SET_MM, PR_SET_MM_MAP) point their process's /proc/PID/exe at the
trusted binary without ever running it (tests/forge_exe.c, started through
the dynamic loader: no LD_PRELOAD, no ptrace); a --pin hash read through the
same link matches too.  A process outside the mount's user namespace is no
trusted program now.  Real unprivileged users, a real shared mount, the
access log.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_audit_mount import records

from conftest import run_cli
from cryptfs.programs import OTHER_USERNS, userns_open
from multiuser import Shared, bind_log, run_as

SECRET = b"surname,phone\nWang,13812341234\n"
LOADER = "/lib64/ld-linux-x86-64.so.2"
USER = "cfs-alice"  # an agent: plaintext for its role, so only the programs rule stands in the way


def _compile(out: Path) -> Path:
    if shutil.which("gcc") is None or not os.path.exists(LOADER):
        pytest.skip("gcc and the x86-64 dynamic loader are needed for the attack program")
    exe = out / "forge_exe"
    subprocess.run(["gcc", "-O1", "-Wall", "-Wl,-z,now", "-o", str(exe),
                    str(Path(__file__).with_name("forge_exe.c"))], check=True)
    exe.chmod(0o755)
    return exe


@pytest.fixture
def guarded(shared: Shared) -> Iterator[tuple[Shared, Path, Path, Path, Path]]:
    """/calls/a.csv under a `--program --pin` rule naming a copy of cat, an
    access log, the agent alice unlocked, the attack program built.  Yields
    (shared, logdir, trusted cat, the file, attack program)."""
    logdir = bind_log(shared)
    bins = shared.root / "bin"
    bins.mkdir(mode=0o755)
    trusted = bins / "cat"
    shutil.copy("/bin/cat", trusted)
    trusted.chmod(0o755)
    forge = _compile(bins)
    assert shared.unlock("root").returncode == 0
    assert shared.unlock(USER).returncode == 0
    shared.path("calls").mkdir()
    shared.path("calls", "a.csv").write_bytes(SECRET)
    os.chmod(shared.path("calls", "a.csv"), 0o644)
    run_cli("policy", "set", str(shared.backing), "/calls", "--mode", "aes-256-gcm",
            "--program", str(trusted), "--pin", "--passphrase-file",
            str(shared.passfiles["root"]))
    yield shared, logdir, trusted, shared.path("calls", "a.csv"), forge


def _decisions(logdir: Path) -> list[tuple[str, str, str | None]]:
    return [(r["exe"], r["outcome"], r.get("decision")) for r in records(logdir)
            if r["event"] == "open" and r.get("rule") == "/calls"]


def test_a_forged_exe_link_is_not_a_trusted_program(
        guarded: tuple[Shared, Path, Path, Path, Path]) -> None:
    shared, logdir, trusted, target, forge = guarded
    # The genuine trusted program reads the file.
    assert run_as(USER, str(trusted), str(target)).stdout == SECRET
    # (and the mount said at once whether the kernel leaves user namespaces open)
    warned = "unprivileged users may create user namespaces" in shared.mount.log_text()
    assert warned == userns_open()
    # The attack: the forgery itself works (its exe link names the trusted
    # cat, whose pinned hash it has) ...
    res = run_as(USER, LOADER, str(forge), str(trusted), str(target))
    assert b"forged" in res.stderr, res
    # ... and gets nothing.
    assert b"open: refused" in res.stderr and res.returncode != 0
    assert b"Wang" not in res.stdout and b"13812341234" not in res.stdout
    assert run_as(USER, str(trusted), str(target)).stdout == SECRET  # (still)
    shared.mount.stop()
    assert _decisions(logdir) == [
        (str(trusted), "allowed", "trusted program (by path and SHA-256)"),
        # (the record names the program the forged link names; the decision says why not)
        (str(trusted), "denied", OTHER_USERNS),
        (str(trusted), "allowed", "trusted program (by path and SHA-256)"),
    ]


def test_unshare_and_a_bind_mount_over_the_trusted_path_are_refused(
        guarded: tuple[Shared, Path, Path, Path, Path]) -> None:
    """`unshare -Ur` (a user namespace of one's own) with or without another
    binary bind-mounted over the trusted path: neither is trusted, even the
    genuine binary run in such a namespace."""
    shared, logdir, trusted, target, _forge = guarded
    res = run_as(USER, "unshare", "-Urm", "sh", "-c",
                 f"mount --bind /usr/bin/head {trusted} && exec {trusted} {target}")
    assert res.returncode != 0 and b"Permission denied" in res.stderr, res
    assert b"Wang" not in res.stdout
    res = run_as(USER, "unshare", "-Ur", str(trusted), str(target))
    assert res.returncode != 0 and b"Permission denied" in res.stderr, res
    assert b"Wang" not in res.stdout
    shared.mount.stop()
    assert [d for _, _, d in _decisions(logdir)] == [OTHER_USERNS, OTHER_USERNS]


def test_a_shared_memory_forgery_is_a_documented_residual(
        guarded: tuple[Shared, Path, Path, Path, Path]) -> None:
    """clone(CLONE_VM | CLONE_NEWUSER): the child, in a user namespace of its
    own, replaces the exe link of the memory it shares with its parent, which
    never left the mount's namespace, and exits.  Nothing in /proc then tells
    that process from the genuine program; only closing unprivileged user
    namespaces does, and the mount says so in its log.  This test performs
    the attack and reports it as the expected failure it is (docs/POLICY.md);
    should it ever be refused, the test fails so that the docs are updated."""
    shared, _logdir, trusted, target, forge = guarded
    if not userns_open():
        pytest.skip("unprivileged user namespaces are closed here: the attack cannot start")
    res = run_as(USER, LOADER, str(forge), "--share-mm", str(trusted), str(target))
    assert b"forged" in res.stderr, res  # (the forgery itself works)
    assert "unprivileged users may create user namespaces" in shared.mount.log_text()
    if b"Wang" in res.stdout:
        pytest.xfail("residual limit, documented in docs/POLICY.md: a process of the mount's "
                     "user namespace whose exe link a child sharing its memory forged")
    pytest.fail("the shared-memory forgery is refused now: update docs/POLICY.md")


def test_userns_open_reads_the_kernels_switches(tmp_path: Path) -> None:
    on, off = tmp_path / "on", tmp_path / "off"
    on.write_text("15000\n")
    off.write_text("0\n")
    missing = str(tmp_path / "missing")
    assert userns_open(((missing, "0", "a"), (str(on), "0", "b")))
    assert not userns_open(((missing, "0", "a"), (str(off), "0", "b")))
    assert not userns_open(((str(on), "0", "a"), (str(tmp_path / "off"), "0", "b")))
