"""Technicians and admins get ciphertext only, of symlink targets and xattr
names as of file contents (issue 12, part 6): readlink and listxattr used to
decrypt for them.  Real users in each role on a real shared mount."""

from __future__ import annotations

import os

from test_roles import _add

from multiuser import Shared, run_as

PHONE = b"13812341234"
TARGET = b"tel:+86-" + PHONE
LIST = "import os, sys; print(os.listxattr(sys.argv[1], follow_symlinks=False))"


def test_symlink_targets_and_xattr_names_stay_encrypted_for_technicians(
        shared: Shared) -> None:
    assert shared.unlock("root").returncode == 0
    assert shared.unlock("cfs-carol").returncode == 0
    calls = shared.path("calls")
    calls.mkdir()
    os.chmod(calls, 0o755)
    (calls / "a.csv").write_bytes(b"surname,phone\nWang,13812341234\n")
    os.chmod(calls / "a.csv", 0o644)
    os.symlink(TARGET, calls / "wang")
    os.setxattr(calls / "a.csv", "user.phone-" + PHONE.decode(), PHONE)
    os.setxattr(calls, "user.owner-" + PHONE.decode(), b"x")
    stored = [os.readlink(p).encode() for p in (shared.backing / "tree").rglob("*")
              if p.is_symlink()]
    assert len(stored) == 1 and PHONE not in stored[0]
    for name, role in (("cfs-tech", "technician"), ("cfs-admin", "admin")):
        assert shared.unlock(name, _add(shared, name, role)).returncode == 0

    # A supervisor reads the target and the xattr names.
    assert run_as("cfs-carol", "readlink", str(calls / "wang")).stdout.strip() == TARGET
    listed = run_as("cfs-carol", "/usr/bin/python3", "-c", LIST, str(calls / "a.csv"))
    assert f"user.phone-{PHONE.decode()}".encode() in listed.stdout
    for name in ("cfs-tech", "cfs-admin"):
        # The target as stored, encrypted, as the contents they read are.
        res = run_as(name, "readlink", str(calls / "wang"))
        assert res.returncode == 0 and res.stdout.strip() == stored[0], res
        res = run_as(name, "ls", "-l", str(calls))
        assert res.returncode == 0 and stored[0] in res.stdout and PHONE not in res.stdout, res
        # No xattr names (as no values): refused, on files and directories.
        for path in (calls / "a.csv", calls):
            res = run_as(name, "/usr/bin/python3", "-c", LIST, str(path))
            assert res.returncode != 0 and b"PermissionError" in res.stderr, res
            assert PHONE not in res.stdout + res.stderr
            res = run_as(name, "getfattr", "-d", "-m", "-", str(path))
            assert PHONE not in res.stdout + res.stderr
    # Nothing cached for them reaches the supervisor, or the other way round.
    assert run_as("cfs-carol", "readlink", str(calls / "wang")).stdout.strip() == TARGET
    assert run_as("cfs-tech", "readlink", str(calls / "wang")).stdout.strip() == stored[0]
    # The auditor gets neither.
    assert shared.unlock("cfs-audit", _add(shared, "cfs-audit", "auditor")).returncode == 0
    res = run_as("cfs-audit", "readlink", str(calls / "wang"))
    assert res.returncode != 0 and PHONE not in res.stdout
