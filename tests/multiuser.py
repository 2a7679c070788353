"""Real system users, a real key agent process and shared (--agent) mounts for tests.

Users are created with useradd (and kept: they are cheap and tests reuse
them); commands run as them through subprocess ``user=``/``group=`` for
ordinary programs, and through tests/as_user.py for the cryptfs command line
(see there why).  Everything a user must reach lives in a 0755 directory
under /tmp, not under pytest's root-only tmp_path.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import Mount
from cryptfs import tree
from cryptfs.config import Kdf
from cryptfs.names import NameCodec
from cryptfs.secret import Secret
from cryptfs.users import add_user, user_fields
from cryptfs.volume import init_volume, open_volume

HERE = Path(__file__).parent
AS_USER = str(HERE / "as_user.py")
TEST_KDF = Kdf(ops=1, mem_kib=8 * 1024)

# name -> (role, passphrase); root is the volume's first user.
USERS = {
    "cfs-alice": ("agent", b"alice passphrase"),
    "cfs-bob": ("agent", b"bob passphrase"),
    "cfs-carol": ("supervisor", b"carol passphrase"),
}
ROOT_PASSPHRASE = b"root passphrase of the shared volume"


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        "--user-group", name], check=True, capture_output=True)
        return pwd.getpwnam(name)


def ensure_users() -> dict[str, pwd.struct_passwd]:
    return {name: ensure_user(name) for name in USERS}


def shared_tempdir(prefix: str = "cryptfs-test-") -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    return d


def run_as(user: str, *cmd: str, check: bool = False, timeout: float = 30,
           input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a program as ``user`` (its uid, its group, no supplementary groups)."""
    pw = pwd.getpwnam(user)
    return subprocess.run(list(cmd), user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                          capture_output=True, check=check, timeout=timeout, input=input,
                          cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/", "LC_ALL": "C"})


def cli_as(user: str, *args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The cryptfs command line, run as ``user``."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, AS_USER, user, *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd="/")


def passfile(directory: Path, user: str, secret: bytes) -> Path:
    """A passphrase file the user (and only the user) can read."""
    p = directory / f"{user}.pass"
    p.write_bytes(secret + b"\n")
    pw = pwd.getpwnam(user)
    os.chown(p, pw.pw_uid, pw.pw_gid)
    p.chmod(0o600)
    return p


def make_shared_volume(backing: Path, mode: str = "aes-256-gcm") -> Path:
    """A volume whose first slot is root's, plus one slot per test user."""
    ensure_users()
    vol = init_volume(str(backing), mode, Secret(ROOT_PASSPHRASE), TEST_KDF,
                      user_fields("root", "admin"))
    try:
        for name, (role, secret) in USERS.items():
            add_user(vol, name, role, Secret(secret), TEST_KDF)
    finally:
        vol.close()
    return backing


def connectable(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


@dataclass
class AgentProcess:
    """A real cryptfs-agent on its own socket."""

    socket: Path
    log: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"CRYPTFS_AGENT_SOCKET": str(self.socket)}

    def start(self, *args: str) -> AgentProcess:
        if args:
            self.args = list(args)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cryptfs.keyagent.daemon", "--socket", str(self.socket),
             "--log-file", str(self.log), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not connectable(self.socket):
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}): "
                                     f"{self.proc.stderr.read().decode() if self.proc.stderr else ''}"
                                     f"\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent did not start; log:\n{self.log_text()}")
            time.sleep(0.02)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        code = self.proc.returncode
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@dataclass
class SharedMount(Mount):
    """A ``cryptfs mount --agent`` of a volume, as a root service would run it."""

    agent: AgentProcess | None = None

    def mount_args(self) -> list[str]:
        assert self.agent is not None
        return ["--agent", "--agent-socket", str(self.agent.socket)]

    def start(self, *extra: str) -> None:
        self.mnt.mkdir(exist_ok=True)
        self.mnt.chmod(0o755)  # users must reach it
        super().start(*extra)

    def wait_log(self, text: str, timeout: float = 10, count: int = 1) -> None:
        """Wait until ``text`` is in the mount's log ``count`` times."""
        deadline = time.monotonic() + timeout
        while self.log_text().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the mount log:\n{self.log_text()}")
            time.sleep(0.05)


@dataclass
class Shared:
    """Everything of one multi-user scenario: volume, agent, shared mount, passphrase files."""

    root: Path
    backing: Path
    agent: AgentProcess
    mount: SharedMount
    passfiles: dict[str, Path]

    def unlock(self, user: str, passfile: Path | None = None) -> subprocess.CompletedProcess[str]:
        return cli_as(user, "unlock", str(self.mount.mnt), "--passphrase-file",
                      str(passfile or self.passfiles[user]), env=self.agent.env)

    def lock(self, user: str) -> subprocess.CompletedProcess[str]:
        return cli_as(user, "lock", env=self.agent.env)

    def path(self, *parts: str) -> Path:
        return self.mount.mnt.joinpath(*parts)


def shared_setup(agent_args: tuple[str, ...] = ("--idle-timeout", "0", "--backoff", "0.2",
                                                "--backoff-max", "1")) -> Iterator[Shared]:
    """Create users, a volume, an agent and a shared mount; tear all down afterwards."""
    root = shared_tempdir()
    agent = AgentProcess(root / "agent.sock", root / "agent.log")
    mount = SharedMount(root / "backing", root / "mnt", root / "mount.log", root / "mount.pid",
                        agent=agent)
    try:
        make_shared_volume(root / "backing")
        (root / "pass").mkdir(mode=0o755)
        files = {name: passfile(root / "pass", name, secret) for name, (_, secret) in USERS.items()}
        files["root"] = passfile(root / "pass", "root", ROOT_PASSPHRASE)
        agent.start(*agent_args)
        mount.start()
        yield Shared(root, root / "backing", agent, mount, files)
    finally:
        try:
            mount.stop()
        finally:
            agent.stop()
            shutil.rmtree(root, ignore_errors=True)


# The same, as a context manager, for a test that needs its own options.
shared_scenario = contextlib.contextmanager(shared_setup)


class ScriptHolder:
    """A Python ``script`` run as ``user`` on one file (its first argument),
    which prints "opened", then answers each command read from stdin with one
    line: a program that keeps a file open while the test acts around it."""

    def __init__(self, user: str, path: Path, script: str) -> None:
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", "-c", script, str(path)], user=user, group=user,
            extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd="/")
        assert self.line() == "opened"

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    answer_line = line

    def do(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.line()

    def end(self) -> None:
        self.proc.kill()
        self.proc.wait()


def backing_of(backing: Path, passphrase: bytes, rel: str) -> Path:
    """The backing path of plaintext path ``rel`` (short names), found with the key
    that ``passphrase`` opens."""
    vol = open_volume(str(backing), Secret(passphrase))
    try:
        codec = NameCodec(vol.keys)
        d = backing / "tree"
        for part in rel.strip("/").split("/"):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                diriv = tree.read_diriv(fd)
            finally:
                os.close(fd)
            name, full = codec.backing_name(part.encode(), diriv)
            assert full is None
            d = d / name
        return d
    finally:
        vol.close()


def give_recovery_key(backing: Path, passphrase: bytes, key: Path) -> None:
    """Add a recovery key to a volume (as `cryptfs init --recovery-key` does),
    its private half written to ``key``."""
    from cryptfs.recovery import add_recovery, create_key_file

    vol = open_volume(str(backing), Secret(passphrase))
    try:
        fd = create_key_file(str(key))
        try:
            add_recovery(vol, fd)
        finally:
            os.close(fd)
    finally:
        vol.close()


def bind_log(s: Shared) -> Path:
    """Give the shared volume an access log (bound with `cryptfs audit attach`,
    by root, the admin): the mount is restarted to write it."""
    from conftest import run_cli

    logdir = s.root / "auditlog"
    pf = s.root / "root-attach.pass"
    pf.write_bytes(ROOT_PASSPHRASE + b"\n")
    s.mount.stop()
    run_cli("audit", "init", str(logdir))
    run_cli("audit", "attach", str(s.backing), str(logdir), "--passphrase-file", str(pf))
    s.mount.start()
    return logdir
