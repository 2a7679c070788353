"""The cryptfs command does not load the filesystem: only `cryptfs mount` does.

Each case runs the real command in a fresh interpreter and then lists which
of the filesystem's modules (and its request loop's libraries) got imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Mount

# The filesystem, its request loop, and what only a mount daemon needs.
HEAVY = ("pyfuse3", "trio", "cryptfs.ops", "cryptfs.fs", "cryptfs.mount", "cryptfs.views", "cryptfs.fuse",
         "cryptfs.keyagent.link", "cryptfs.keyagent.server")

PROBE = r"""
import sys
from cryptfs.cli.main import cli
code = 0
if len(sys.argv) > 1:
    try:
        cli(sys.argv[1:], prog_name="cryptfs")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
heavy = sys.stdin.read().split()
print("LOADED " + " ".join(m for m in heavy if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def loaded_by(*args: str) -> tuple[int, list[str], str]:
    """(exit code, heavy modules loaded, output) of ``cryptfs ARGS``."""
    res = subprocess.run([sys.executable, "-c", PROBE, *args], input=" ".join(HEAVY),
                         capture_output=True, text=True, timeout=60)
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("LOADED"), res.stderr
    return res.returncode, last.split()[1:], res.stdout + res.stderr


def test_the_probe_sees_what_a_mount_loads() -> None:
    """(The probe itself works: the mount's modules show when they are loaded.)"""
    res = subprocess.run([sys.executable, "-c", "import cryptfs.mount, cryptfs.ops; " + PROBE],
                         input=" ".join(HEAVY), capture_output=True, text=True, timeout=60)
    loaded = set(res.stderr.split())
    assert {"trio", "cryptfs.fuse", "cryptfs.ops", "cryptfs.fs", "cryptfs.mount"} <= loaded, res.stderr
    assert "pyfuse3" not in loaded  # (the filesystem speaks the kernel's protocol itself)


@pytest.mark.parametrize("args", [
    (),
    ("--help",),
    ("audit", "verify", "--help"),
    ("mount", "--help"),
    ("unmount", "--help"),
    ("rotate", "--help"),
    ("share", "--help"),
    ("policy", "show", "--help"),
    ("audit", "forward", "--help"),
    ("audit", "report", "--help"),
])
def test_importing_and_help_load_no_filesystem(args: tuple[str, ...]) -> None:
    code, heavy, out = loaded_by(*args)
    assert heavy == [], f"cryptfs {' '.join(args)} loaded {heavy}"
    assert code == 0, out
    if args:
        assert "Usage: cryptfs" in out


def test_agent_commands_speak_to_the_agent_without_trio(tmp_path: Path, passfile: Path) -> None:
    """unlock, lock and status are clients of the agent's socket: plain
    sockets, no trio (the agent itself runs on trio)."""
    sock = str(tmp_path / "no-agent.sock")
    for args in (("status", "--agent-socket", sock),
                 ("lock", "--agent-socket", sock),
                 ("unlock", str(tmp_path), "--passphrase-file", str(passfile),
                  "--agent-socket", sock)):
        code, heavy, out = loaded_by(*args)
        assert heavy == [], f"cryptfs {' '.join(args)} loaded {heavy}"
        assert code == 8 and "agent" in out and "Traceback" not in out, out


def test_commands_through_a_mount_load_no_filesystem(mount: Mount) -> None:
    """The commands that talk to a running mount over its control xattrs
    (cryptfs.control) do so without loading the filesystem themselves."""
    mount.path("notes.txt").write_bytes(b"call notes\n")
    code, heavy, out = loaded_by("info", str(mount.backing))
    assert heavy == [] and code == 0 and "slot 0: owner" in out, (heavy, out)
    code, heavy, out = loaded_by("share", "--list", str(mount.path("notes.txt")))
    assert heavy == [] and code == 0 and "(symmetric: every unlocked user)" in out, (heavy, out)
    assert mount.passfile is not None
    code, heavy, out = loaded_by("rotate", "--wrap-key", str(mount.backing),
                                 "--passphrase-file", str(mount.passfile))
    assert heavy == [] and code == 0 and f"through the mount on {mount.mnt}" in out, (heavy, out)
    assert mount.path("notes.txt").read_bytes() == b"call notes\n"
