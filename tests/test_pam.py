"""PAM: packaging/pam/cryptfs run by the real PAM library, cryptfs-pam, and the
login-time prompt of packaging/profile.d/cryptfs-unlock.sh.

The PAM tests write a throw-away service file to /etc/pam.d/ (a unique name,
removed afterwards) made of the lines of packaging/pam/cryptfs, with the
helper's path and the volume made the test's, and run Debian's ``pamtester``
(it answers PAM's password prompt from standard input) as root for a test
user.  What happened is checked in a real key agent.  The login password in
the opt-in case is the user's volume passphrase: that is what the opt-in
means.  The profile script runs in bash and in dash on a pseudo-terminal.
"""

from __future__ import annotations

import os
import pty
import pwd
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cryptfs.config import Kdf
from cryptfs.keyagent.client import AgentClient
from cryptfs.secret import Secret
from cryptfs.users import user_fields
from cryptfs.volume import init_volume
from multiuser import ROOT_PASSPHRASE, USERS, AgentProcess, ensure_users, make_shared_volume, shared_tempdir

REPO = Path(__file__).resolve().parent.parent
SNIPPET = REPO / "packaging" / "pam" / "cryptfs"
PROFILE = REPO / "packaging" / "profile.d" / "cryptfs-unlock.sh"
VENV_BIN = Path(sys.executable).parent
HELPER = VENV_BIN / "cryptfs-pam"
ALICE_PW = USERS["cfs-alice"][1]
BOB_PW = USERS["cfs-bob"][1]
TEST_KDF = Kdf(ops=1, mem_kib=8 * 1024)


@dataclass
class Setup:
    root: Path
    backing: Path  # every test user and root have a key slot
    roots_only: Path  # only root has a key slot
    agent: AgentProcess

    def client(self) -> AgentClient:
        return AgentClient(str(self.agent.socket), timeout=30)

    def sessions(self, user: str) -> list[str]:
        uid = pwd.getpwnam(user).pw_uid
        answer = self.client().request({"op": "status", "uid": uid})
        return [s["backing"] for s in answer["sessions"]]

    def unlock(self, user: str, secret: bytes) -> None:
        self.client().request({"op": "unlock", "backing": str(self.backing),
                               "uid": pwd.getpwnam(user).pw_uid}, secret=Secret(secret))


@pytest.fixture
def setup() -> Iterator[Setup]:
    ensure_users()
    root = shared_tempdir()
    agent = AgentProcess(root / "agent.sock", root / "agent.log")
    try:
        backing = make_shared_volume(root / "backing")
        roots_only = root / "roots-only"
        init_volume(str(roots_only), "aes-256-gcm", Secret(ROOT_PASSPHRASE), TEST_KDF,
                    user_fields("root", "admin")).close()
        agent.start("--idle-timeout", "0", "--backoff", "0.2", "--backoff-max", "1")
        yield Setup(root, backing, roots_only, agent)
    finally:
        agent.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- the snippet -----------------------------------------------------------------------------

def snippet_lines() -> tuple[list[str], list[str]]:
    """(active lines, commented-out PAM lines) of packaging/pam/cryptfs."""
    active, commented = [], []
    for line in SNIPPET.read_text().splitlines():
        if line.startswith("#") and line[1:].split()[:1] in (["auth"], ["session"], ["account"]):
            commented.append(line[1:])
        elif line.strip() and not line.startswith("#"):
            active.append(line)
    return active, commented


def test_snippet_default_locks_and_never_sees_the_password() -> None:
    active, commented = snippet_lines()
    assert active == ["session optional pam_exec.so quiet type=close_session "
                      "/usr/bin/cryptfs-pam lock"]
    assert commented == ["auth optional pam_exec.so expose_authtok quiet /usr/bin/cryptfs-pam "
                         "unlock --backing /srv/x"]
    text = SNIPPET.read_text()
    assert "3.5.1.3" in text and "@include cryptfs" in text


def adapt(line: str, setup: Setup, log: Path | None = None) -> str:
    """A snippet line with this checkout's helper, the test volume and agent."""
    line = line.replace("/usr/bin/cryptfs-pam", str(HELPER)).replace("/srv/x", str(setup.backing))
    if log is not None:
        line = line.replace(" quiet ", f" quiet log={log} ")
    return f"{line} --agent-socket {setup.agent.socket}"


@contextmanager
def pam_service(lines: list[str]) -> Iterator[str]:
    """A PAM service of these lines, pam_permit where the stack needs a success."""
    name = f"cryptfs-test-{uuid.uuid4().hex[:12]}"
    path = Path("/etc/pam.d") / name
    auth = [ln for ln in lines if ln.startswith("auth")]
    session = [ln for ln in lines if ln.startswith("session")]
    path.write_text("\n".join(["auth required pam_permit.so", *auth,
                               "account required pam_permit.so",
                               "session required pam_permit.so", *session]) + "\n")
    try:
        yield name
    finally:
        path.unlink()


def pamtester(service: str, user: str, *operations: str,
              password: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    need_pamtester()
    res = subprocess.run(["pamtester", "-v", service, user, *operations], capture_output=True,
                         input=password + b"\n" if password is not None else b"", timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr  # our lines are optional: never fatal
    return res


def need_pamtester() -> None:
    if shutil.which("pamtester") is None:
        pytest.fail("pamtester is missing: apt-get install pamtester (scripts/run test installs it)")


# -- through PAM -------------------------------------------------------------------------------

def test_opt_in_login_unlocks_and_logout_locks(setup: Setup) -> None:
    active, commented = snippet_lines()
    with pam_service([adapt(commented[0], setup), adapt(active[0], setup)]) as svc:
        res = pamtester(svc, "cfs-alice", "authenticate", password=ALICE_PW)
        assert b"Password:" in res.stderr  # pam_exec asked through PAM's conversation
        assert setup.sessions("cfs-alice") == [str(setup.backing)]
        assert setup.sessions("cfs-bob") == []
        pamtester(svc, "cfs-alice", "open_session")
        assert setup.sessions("cfs-alice") == [str(setup.backing)]  # opening locks nothing
        pamtester(svc, "cfs-alice", "close_session")
        assert setup.sessions("cfs-alice") == []


def test_wrong_login_password_unlocks_nothing_and_is_never_logged(setup: Setup) -> None:
    _, commented = snippet_lines()
    log = setup.root / "pam.log"
    wrong = b"Tr0ub4dor&3-not-alices"
    with pam_service([adapt(commented[0], setup, log=log)]) as svc:
        pamtester(svc, "cfs-alice", "authenticate", password=wrong)
    assert setup.sessions("cfs-alice") == []
    text = log.read_bytes()
    assert b"cryptfs-pam: error: " in text and b"wrong passphrase" in text, text
    assert wrong not in text and wrong not in setup.agent.log_text().encode()


def test_logout_locks_only_that_user(setup: Setup) -> None:
    active, _ = snippet_lines()
    setup.unlock("cfs-alice", ALICE_PW)
    setup.unlock("cfs-bob", BOB_PW)
    with pam_service([adapt(active[0], setup)]) as svc:
        pamtester(svc, "cfs-alice", "open_session", "close_session")
    assert setup.sessions("cfs-alice") == []
    assert setup.sessions("cfs-bob") == [str(setup.backing)]


# -- the helper on its own -----------------------------------------------------------------------

def helper(*args: str, env: dict[str, str] | None = None,
           stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """cryptfs-pam with little more environment than pam_exec gives it."""
    res = subprocess.run([str(HELPER), *args], capture_output=True, timeout=60, input=stdin,
                         env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", **(env or {})})
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(),
                                       res.stderr.decode())


def one_error_line(res: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryptfs-pam: error: "), res.stderr
    assert "Traceback" not in res.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_help() -> None:
    res = helper("--help")
    assert res.returncode == 0 and "lock" in res.stdout and "unlock" in res.stdout
    res = helper("unlock", "--help")
    assert res.returncode == 0 and "expose_authtok" in res.stdout and "3.5.1.3" in res.stdout


def test_helper_bad_input(setup: Setup) -> None:
    sock = str(setup.agent.socket)
    alice = {"PAM_USER": "cfs-alice", "PAM_TYPE": "auth"}
    one_error_line(helper("lock", "--agent-socket", sock), 2, "PAM_USER is not set")
    line = one_error_line(helper("lock", "--agent-socket", sock,
                                 env={"PAM_USER": "cfs-no-such-user"}), 2, "not a user")
    assert "cfs-no-such-user" not in line  # a mistyped login name may be a password
    one_error_line(helper("lock", "--agent-socket", str(setup.root / "none.sock"),
                          env={"PAM_USER": "cfs-alice"}), 8, "no key agent is running")
    one_error_line(helper("unlock", "--backing", str(setup.backing), "--agent-socket",
                          str(setup.root / "none.sock"), env=alice, stdin=ALICE_PW), 8,
                   "no key agent is running")
    one_error_line(helper("lock", "--agent-socket", sock,
                          env={"PAM_USER": "cfs-alice", "PAM_TYPE": "open_session"}), 2,
                   "close_session")
    one_error_line(helper("unlock", "--backing", str(setup.backing), "--agent-socket", sock,
                          env={**alice, "PAM_TYPE": "close_session"}, stdin=ALICE_PW), 2, "auth")
    one_error_line(helper("unlock", "--backing", str(setup.backing), "--agent-socket", sock,
                          env=alice, stdin=b"\0"), 2, "no password")
    one_error_line(helper("unlock", "--backing", str(setup.backing), "--agent-socket", sock,
                          env=alice, stdin=b"x" * 5000), 2, "longer than 4096 bytes")
    one_error_line(helper("unlock", "--backing", str(setup.roots_only), "--agent-socket", sock,
                          env=alice, stdin=ALICE_PW + b"\0"), 8,
                   f"cfs-alice has no key slot in {setup.roots_only}")  # (it said "that volume")
    res = helper("unlock", "--backing", str(setup.backing), "--agent-socket", sock, env=alice,
                 stdin=b"not alices password\0")
    one_error_line(res, 3, "wrong passphrase")
    assert "not alices" not in res.stdout + res.stderr
    assert setup.sessions("cfs-alice") == []


@pytest.mark.parametrize("ending", [b"\0", b"\n", b""])
def test_helper_unlocks_with_password_on_stdin(setup: Setup, ending: bytes) -> None:
    res = helper("unlock", "--backing", str(setup.roots_only), "--backing", str(setup.backing),
                 "--agent-socket", str(setup.agent.socket),
                 env={"PAM_USER": "cfs-alice", "PAM_TYPE": "auth"}, stdin=ALICE_PW + ending)
    # The volume without a slot for alice is passed over; the other one unlocks.
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"unlocked {setup.backing} for cfs-alice\n" and res.stderr == ""
    assert setup.sessions("cfs-alice") == [str(setup.backing)]
    res = helper("lock", "--agent-socket", str(setup.agent.socket),
                 env={"PAM_USER": "cfs-alice", "PAM_TYPE": "close_session"})
    assert (res.returncode, res.stdout) == (0, "locked 1 session(s) of cfs-alice\n"), res.stderr
    assert setup.sessions("cfs-alice") == []


# -- the login-time prompt --------------------------------------------------------------------------

class Terminal:
    """A program on a pseudo-terminal, driven like a person at the keyboard."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: never return into pytest
            try:
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.seen = b""
        self.mark = 0

    def expect(self, text: bytes, timeout: float = 30) -> bytes:
        """Wait for ``text`` after what was already matched; return what came before it."""
        deadline = time.monotonic() + timeout
        while (at := self.seen.find(text, self.mark)) < 0:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} did not appear; the terminal shows:\n{self.seen.decode()}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the program exited
                    chunk = b""
                assert chunk, f"{text!r} did not appear before the end:\n{self.seen.decode()}"
                self.seen += chunk
        before = self.seen[self.mark:at]
        self.mark = at + len(text)
        return before

    def type(self, line: bytes) -> None:
        os.write(self.fd, line + b"\n")

    def close(self) -> int:
        """Wait up to 5 s for the program to exit (then kill it); its exit code."""
        for _ in range(100):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)
        else:
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.pid = 0
        return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_profile_script_asks_at_login(setup: Setup, shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.fail(f"{shell} is missing (Debian always has it)")
    # Run as root, who has a key slot in one listed volume (backing) and none in another.
    bobs_only = setup.root / "bobs-only"
    init_volume(str(bobs_only), "aes-256-gcm", Secret(BOB_PW), TEST_KDF,
                user_fields("cfs-bob", "agent")).close()
    skipped = setup.root / "skipped"
    listing = setup.root / "unlock-at-login"
    listing.write_text(f"# volumes to unlock at login\n\n  {setup.backing}  \n{bobs_only}\n"
                       f"#{setup.roots_only}\n{skipped}\n")
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(setup.root), "TERM": "dumb",
           "LC_ALL": "C.UTF-8", "CRYPTFS_UNLOCK_LIST": str(listing),
           "CRYPTFS_AGENT_SOCKET": str(setup.agent.socket)}
    term = Terminal([shell, "-i", "-c", f". {PROFILE}; echo login-shell-continues-$?"], env)
    try:
        term.expect(f"cryptfs: passphrase for {setup.backing} (Enter to skip): ".encode())
        term.type(b"a wrong passphrase")
        assert b"wrong passphrase" in term.expect(f"cryptfs: passphrase for {setup.backing}".encode())
        time.sleep(0.5)  # the agent's backoff after a failure (0.2 s here)
        term.type(ROOT_PASSPHRASE)
        term.expect(f"unlocked {setup.backing}".encode())
        # bobs_only (no slot for root) and skipped (no such volume): not asked, nothing said.
        rest = term.expect(b"login-shell-continues-0")
        assert b"passphrase" not in rest and rest.strip().endswith(b"slot 0)"), rest
    finally:
        code = term.close() if term.pid else 0
    assert code == 0
    assert b"passphrase" in term.seen and ROOT_PASSPHRASE not in term.seen  # echo was off
    assert b"a wrong passphrase" not in term.seen
    assert setup.sessions("root") == [str(setup.backing)]


def test_profile_script_is_silent_without_a_terminal(setup: Setup) -> None:
    listing = setup.root / "unlock-at-login"
    listing.write_text(f"{setup.backing}\n")
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "CRYPTFS_UNLOCK_LIST": str(listing),
           "CRYPTFS_AGENT_SOCKET": str(setup.agent.socket)}
    for argv in (["sh", "-c", f". {PROFILE}; echo done-$?"],  # not interactive
                 ["sh", "-i", "-c", f". {PROFILE}; echo done-$?"]):  # interactive, no terminal
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30,
                             stdin=subprocess.DEVNULL)
        assert (res.stdout, res.returncode) == ("done-0\n", 0), res.stderr
        assert "passphrase" not in res.stderr
    assert setup.sessions("root") == []


def test_profile_script_without_agent_says_so_once(setup: Setup) -> None:
    listing = setup.root / "unlock-at-login"
    listing.write_text(f"{setup.backing}\n{setup.roots_only}\n")
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "TERM": "dumb", "LC_ALL": "C.UTF-8",
           "CRYPTFS_UNLOCK_LIST": str(listing),
           "CRYPTFS_AGENT_SOCKET": str(setup.root / "no-agent.sock")}
    term = Terminal(["sh", "-i", "-c", f". {PROFILE}; echo login-shell-continues-$?"], env)
    try:
        said = term.expect(b"login-shell-continues-0")
    finally:
        code = term.close()
    assert code == 0
    assert said.count(b"key agent is not running") == 1 and b"passphrase" not in said, said
