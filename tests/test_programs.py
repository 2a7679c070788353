"""Trusted programs: a policy rule that names the programs allowed to open
the files of a directory.  Real programs (a trusted copy of cat and an
untrusted copy of the same binary elsewhere), a real mount, the access log."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_audit_mount import records

from conftest import Mount, new_mount, run_cli
from cryptfs.policy import Program, Rule
from cryptfs.programs import Identifier

SECRET = b"surname,phone\nWang,13812341234\n"


@pytest.fixture
def guarded(tmp_path: Path, backing: Path, passfile: Path) -> Iterator[tuple[Mount, Path, Path]]:
    """A mount with an access log, /calls/a.csv in it; a trusted and an
    untrusted copy of cat.  Yields (mount, logdir, directory of the copies)."""
    bins = tmp_path / "bin"
    for who in ("trusted", "untrusted"):
        (bins / who).mkdir(parents=True)
        shutil.copy("/bin/cat", bins / who / "cat")
    logdir = tmp_path / "log"
    run_cli("audit", "init", str(logdir))
    m = new_mount(tmp_path, backing, passfile)
    m.start("--audit-log", str(logdir))
    try:
        m.path("calls").mkdir()
        m.path("calls", "a.csv").write_bytes(SECRET)
        m.path("notes.txt").write_bytes(b"anyone\n")
        yield m, logdir, bins
    finally:
        m.stop()


def _set(m: Mount, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli("policy", "set", str(m.backing), *args, "--passphrase-file",
                   str(m.passfile), check=check)


def _cat(prog: Path, path: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(prog), str(path)], capture_output=True)


def test_only_the_trusted_program_sees_plaintext(guarded: tuple[Mount, Path, Path]) -> None:
    m, logdir, bins = guarded
    trusted, untrusted = bins / "trusted" / "cat", bins / "untrusted" / "cat"
    out = _set(m, "/calls", "--mode", "aes-256-gcm", "--program", str(trusted)).stdout
    assert f"programs: {trusted}" in out
    # The trusted copy reads first (the page cache now holds the plaintext) ...
    assert _cat(trusted, m.path("calls", "a.csv")).stdout == SECRET
    # ... and the same binary under another path still gets nothing from it.
    res = _cat(untrusted, m.path("calls", "a.csv"))
    assert res.returncode != 0 and b"Permission denied" in res.stderr and not res.stdout
    with pytest.raises(PermissionError):
        m.path("calls", "a.csv").read_bytes()  # (this test's own python)
    with pytest.raises(PermissionError):
        m.path("calls", "new.csv").write_bytes(b"x")  # creating is opening too
    assert not os.path.lexists(m.path("calls", "new.csv"))
    # Outside the rule's directory any program reads.
    assert _cat(untrusted, m.path("notes.txt")).stdout == b"anyone\n"
    m.stop()
    about = [(os.path.basename(r["exe"]), r["outcome"], r.get("rule"), r.get("decision"))
             for r in records(logdir) if r["event"] in ("open", "create")
             and r["path"].startswith("/calls/") and r.get("rule")]
    assert about == [
        ("cat", "allowed", "/calls", "trusted program (by path)"),
        ("cat", "denied", "/calls", "not a trusted program here"),
        (about[2][0], "denied", "/calls", "not a trusted program here"),
        (about[3][0], "denied", "/calls", "not a trusted program here"),
    ]
    denied = [r for r in records(logdir) if r.get("rule") and r["outcome"] == "denied"]
    assert denied[0]["exe"] == str(untrusted) and denied[0]["reason"] == "EACCES"


def test_a_pinned_program_is_refused_once_its_binary_changes(
        guarded: tuple[Mount, Path, Path]) -> None:
    m, logdir, bins = guarded
    trusted = bins / "trusted" / "cat"
    out = _set(m, "/calls", "--mode", "aes-256-gcm", "--program", str(trusted), "--pin").stdout
    assert "(sha256 " in out
    assert _cat(trusted, m.path("calls", "a.csv")).stdout == SECRET
    with open(trusted, "ab") as f:  # same path, other content (it still runs)
        f.write(b"\0")
    res = _cat(trusted, m.path("calls", "a.csv"))
    assert res.returncode != 0 and b"Permission denied" in res.stderr
    m.stop()
    decisions = [r.get("decision") for r in records(logdir) if r.get("rule") == "/calls"]
    assert decisions == ["trusted program (by path and SHA-256)",
                         "its SHA-256 is not the one pinned"]


def test_a_deeper_rule_may_lift_the_restriction(guarded: tuple[Mount, Path, Path]) -> None:
    m, _logdir, bins = guarded
    trusted, untrusted = bins / "trusted" / "cat", bins / "untrusted" / "cat"
    m.path("calls", "open").mkdir()
    m.path("calls", "open", "b.txt").write_bytes(b"public\n")
    _set(m, "/", "--mode", "aes-256-gcm", "--program", str(trusted))
    _set(m, "/calls/open", "--mode", "aes-256-gcm", "--any-program")
    assert _cat(untrusted, m.path("calls", "open", "b.txt")).stdout == b"public\n"
    assert _cat(untrusted, m.path("calls", "a.csv")).returncode != 0
    assert _cat(trusted, m.path("calls", "a.csv")).stdout == SECRET
    run_cli("policy", "unset", str(m.backing), "/", "--passphrase-file", str(m.passfile))
    assert _cat(untrusted, m.path("calls", "a.csv")).stdout == SECRET  # (taken back while mounted)


def test_bad_program_options_are_refused_clearly(guarded: tuple[Mount, Path, Path],
                                                 tmp_path: Path) -> None:
    m, _logdir, bins = guarded
    link = tmp_path / "catlink"
    link.symlink_to(bins / "trusted" / "cat")
    plain = tmp_path / "data.txt"
    plain.write_text("x")
    for args, text in [
        (["--program", "cat"], "absolute path"),
        (["--program", str(plain)], "not an executable file"),
        (["--program", str(link)], "that is a link to"),
        (["--pin"], "--pin goes with --program"),
        (["--any-program", "--program", "/bin/cat"], "exclude each other"),
    ]:
        res = _set(m, "/calls", "--mode", "aes-256-gcm", *args, check=False)
        assert res.returncode == 2 and text in res.stderr and "Traceback" not in res.stderr


def test_a_request_with_no_process_is_not_trusted() -> None:
    """pid 0 (a request the kernel makes itself) or an executable that cannot
    be read: no program to trust."""
    rule = Rule("/calls", "aes-256-gcm", programs=(Program("/bin/cat"),))
    ident = Identifier()
    assert ident.decide(rule, 0) == (False, {"rule": "/calls", "decision":
                                             "no process to identify (pid 0)"})
    gone = subprocess.Popen(["true"])
    gone.wait()
    allowed, fields = ident.decide(rule, gone.pid)
    assert not allowed and fields["decision"] == "the program cannot be identified"


def test_the_exe_a_record_names_and_a_rule_decides_by_is_read_one_way(tmp_path: Path) -> None:
    """cryptfs.process is the one reader of /proc/PID/exe: the log's Auditor
    and the Identifier see the same path for a running program (a copy of
    sleep under a name that is not UTF-8), and nothing once it has exited."""
    from cryptfs import process
    from cryptfs.audit.writer import Auditor

    odd = tmp_path / os.fsdecode(b"sl\xffeep")
    shutil.copy("/bin/sleep", odd)
    child = subprocess.Popen([odd, "30"])
    try:
        want = str(tmp_path) + "/sl\\xffeep"
        proc = process.open_proc(child.pid)
        assert proc is not None
        try:
            assert process.exe_at(proc) == want
            st = process.stat_exe_at(proc)
            assert st is not None and st.st_ino == os.stat(odd).st_ino
        finally:
            os.close(proc)
        assert process.exe(child.pid) == want == Auditor.exe(child.pid)
        ok, fields = Identifier().decide(Rule("/x", "aes-256-gcm", programs=(Program(want),)),
                                         child.pid)
        assert fields["decision"] != "the program cannot be identified"
    finally:
        child.kill()
        child.wait()
    assert process.exe(child.pid) is None and Auditor.exe(child.pid) == ""
    assert process.open_proc(child.pid) is None and process.exe(0) is None


def test_an_untrusted_program_may_be_given_the_ciphertext(guarded: tuple[Mount, Path, Path]
                                                          ) -> None:
    """--untrusted ciphertext: another program opens the file read-only and
    reads its encrypted bytes (the backing file's, all of them), never the
    plaintext the trusted program left in the page cache; it may not write."""
    m, logdir, bins = guarded
    trusted, untrusted = bins / "trusted" / "cat", bins / "untrusted" / "cat"
    _set(m, "/calls", "--mode", "aes-256-gcm", "--program", str(trusted),
         "--untrusted", "ciphertext")
    assert _cat(trusted, m.path("calls", "a.csv")).stdout == SECRET
    got = _cat(untrusted, m.path("calls", "a.csv"))
    assert got.returncode == 0 and SECRET not in got.stdout and b"Wang" not in got.stdout
    backing_files = [p for p in (m.backing / "tree").rglob("*")
                     if p.is_file() and p.read_bytes() == got.stdout]
    assert len(backing_files) == 1  # exactly the encrypted file, header and tag included
    assert len(got.stdout) > len(SECRET)
    with pytest.raises(PermissionError):
        with open(m.path("calls", "a.csv"), "r+b"):
            pass  # (this test's python, read-write: no view for that)
    m.stop()
    decisions = [r.get("decision") for r in records(logdir) if r.get("rule") == "/calls"]
    assert decisions == ["trusted program (by path)",
                         "not a trusted program here: served the ciphertext",
                         "not a trusted program here"]


def test_an_untrusted_program_cannot_move_a_file_out_of_its_rule(
        guarded: tuple[Mount, Path, Path]) -> None:
    m, logdir, bins = guarded
    trusted = bins / "trusted" / "cat"
    _set(m, "/calls", "--mode", "aes-256-gcm", "--program", str(trusted))
    res = subprocess.run(["mv", str(m.path("calls", "a.csv")), str(m.path("a.csv"))],
                         capture_output=True)
    assert res.returncode != 0 and b"Permission denied" in res.stderr
    res = subprocess.run(["ln", str(m.path("calls", "a.csv")), str(m.path("a2.csv"))],
                         capture_output=True)
    assert res.returncode != 0 and b"Permission denied" in res.stderr
    assert not os.path.lexists(m.path("a.csv")) and not os.path.lexists(m.path("a2.csv"))
    # Nor may it rename the file within the rule's directory (issue 12: an
    # untrusted program neither renames, removes nor truncates such files;
    # this used to be allowed).
    res = subprocess.run(["mv", str(m.path("calls", "a.csv")), str(m.path("calls", "b.csv"))],
                         capture_output=True)
    assert res.returncode != 0 and b"Permission denied" in res.stderr
    assert _cat(trusted, m.path("calls", "a.csv")).stdout == SECRET
    m.stop()
    # The refusals say why, and each decision stays with its own record.
    recs = [(r["event"], r["outcome"], r.get("decision")) for r in records(logdir)
            if r["event"] in ("rename", "link", "open") and r["outcome"] == "denied"
            or r.get("decision", "").startswith("trusted")]
    moved = "not moved out of its trusted-programs rule by a program it does not trust"
    renamed = "not renamed by a program its trusted-programs rule does not trust"
    assert recs == [("rename", "denied", moved), ("link", "denied", moved),
                    ("rename", "denied", renamed), ("open", "allowed", "trusted program (by path)")]


def test_a_tree_moved_over_an_any_program_rule_stays_under_its_programs(
        guarded: tuple[Mount, Path, Path]) -> None:
    """Review finding: a directory moved onto a place whose subdirectory has
    --any-program took its files out of the trusted-programs rule (only the
    rules below the source were looked at). Here, by a program the rule does
    not trust (this test's python), a plain rename and an exchange."""
    m, _, bins = guarded
    trusted = bins / "trusted" / "cat"
    for d in ("team1", "team2", "t", "t/public"):
        m.path("calls", *d.split("/")).mkdir()
    m.path("calls", "team2", "notes.txt").write_bytes(SECRET)
    m.path("calls", "t", "public", "n.txt").write_bytes(SECRET)
    _set(m, "/calls", "--mode", "aes-256-gcm", "--program", str(trusted))
    for d in ("/calls/team1/public", "/calls/archive/public"):
        _set(m, d, "--mode", "aes-256-gcm", "--any-program")
    with pytest.raises(PermissionError):
        os.rename(m.path("calls", "t"), m.path("calls", "archive"))
    libc = ctypes.CDLL(None, use_errno=True)
    os.rename(m.path("calls", "team2"), m.path("calls", "t", "x"))  # (under one rule: allowed)
    assert libc.renameat2(-100, os.fsencode(m.path("calls", "t")), -100,
                          os.fsencode(m.path("calls", "team1")), 2) == -1  # RENAME_EXCHANGE
    assert ctypes.get_errno() == errno.EACCES
    res = _cat(bins / "untrusted" / "cat", m.path("calls", "t", "public", "n.txt"))
    assert res.returncode != 0 and not res.stdout
    assert _cat(trusted, m.path("calls", "t", "x", "notes.txt")).stdout == SECRET
    assert not m.path("calls", "archive").exists() and not m.path("calls", "team1", "public").exists()


MMAP_READ = ("import mmap, os, sys\n"
             "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "m = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)\n"
             "sys.stdout.buffer.write(m[:])\n")


def test_a_mapping_of_the_ciphertext_view_gets_no_cached_plaintext(
        guarded: tuple[Mount, Path, Path]) -> None:
    """Review finding: on a passphrase mount (page cache kept) an untrusted
    program's private mmap of the ciphertext view showed the plaintext pages
    a trusted read had left.  Opening a view now drops them, and the next
    plaintext open drops the view's."""
    m, _logdir, bins = guarded
    trusted = bins / "trusted" / "cat"
    py = bins / "untrusted" / "python3"
    shutil.copy("/usr/bin/python3", py)
    _set(m, "/calls", "--mode", "aes-256-gcm", "--program", str(trusted),
         "--untrusted", "ciphertext")
    f = m.path("calls", "a.csv")
    assert _cat(trusted, f).stdout == SECRET  # (its pages are now cached)
    got = subprocess.run([str(py), "-c", MMAP_READ, str(f)], capture_output=True).stdout
    assert got and SECRET not in got and b"Wang" not in got
    assert _cat(trusted, f).stdout == SECRET  # (and not the view's pages)


def test_another_binary_mounted_over_the_trusted_path_is_not_trusted(
        guarded: tuple[Mount, Path, Path]) -> None:
    """Review finding: in a mount namespace of their own (unshare -m, which
    an unprivileged user gets with -Urm), anyone could bind-mount any program
    over the trusted path; /proc/PID/exe then names the trusted path.  The
    mount now also checks that the running file is the one at that path."""
    m, _logdir, bins = guarded
    trusted = bins / "trusted" / "cat"
    _set(m, "/calls", "--mode", "aes-256-gcm", "--program", str(trusted))
    script = (f"mount --bind /usr/bin/python3 {trusted} && "
              f"exec {trusted} -c 'print(open(\"{m.path('calls', 'a.csv')}\").read())'")
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True)
    assert res.returncode != 0 and b"Permission denied" in res.stderr, res
    assert b"Wang" not in res.stdout
    assert _cat(trusted, m.path("calls", "a.csv")).stdout == SECRET  # (the real one still is)
