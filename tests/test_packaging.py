"""The systemd units of packaging/systemd/, checked and run for real.

* The unit files parse, carry the agent's hardening, and the mount template
  carries nothing that would break fusermount3 or hide the mount.
* ``systemd-analyze verify`` accepts them, with ``/usr/bin/`` replaced by the
  venv's bin directory (verify wants every ExecStart binary to exist, and the
  venv is where this checkout installs them) and the generated man pages on
  MANPATH (verify also checks every Documentation=man: reference).
  ``systemd-analyze security`` rates the agent's sandbox.
* The agent works when socket-activated by ``systemd-socket-activate``.
* Under a real, private systemd service manager (tests/systemd_harness.py),
  the unit files (programs taken from the venv as above; the socket, the
  environment file and the logs moved into the test directory by drop-ins,
  as an operator would) start the agent on the first connection with every
  hardening option in force (unlocking with 512 MiB of Argon2id under
  MemoryDenyWriteExecute and the system call filter), and the mount template
  mounts a volume from its environment file, is active only once mounted, and
  unmounts it with ExecStop.

These tests skip only where systemd is not installed (the missing tool is
named); on Debian it always is.  Like the mount tests they need root.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from systemd_harness import Manager, missing_tools

from cryptfs.config import Kdf
from cryptfs.errors import NotAVolume
from cryptfs.keyagent.client import AgentClient
from cryptfs.secret import Secret
from cryptfs.users import user_fields
from cryptfs.volume import init_volume
from multiuser import (
    ROOT_PASSPHRASE,
    USERS,
    cli_as,
    ensure_users,
    make_shared_volume,
    passfile,
    shared_tempdir,
)

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "packaging" / "systemd"
MAN = REPO / "packaging" / "man"
VENV_BIN = Path(sys.executable).parent
CHECKOUT = Path(__file__).resolve().parent.parent
AGENT = VENV_BIN / "cryptfs-agent"

# Sandboxing that creates a mount namespace (or forbids setuid): none of it may
# be in the mount template, or fusermount3 fails or the mount is the service's alone.
MOUNT_NAMESPACE_OPTIONS = {
    "NoNewPrivileges", "PrivateMounts", "ProtectSystem", "ProtectHome", "PrivateTmp",
    "PrivateDevices", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths",
    "NoExecPaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset",
    "MountFlags", "RootDirectory", "RootImage", "PrivateUsers", "DynamicUser", "RestrictSUIDSGID",
    "MountAPIVFS", "ProtectClock", "StateDirectory", "LogsDirectory",
}


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"systemd is not installed here: no {', '.join(missing)}")


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as systemd reads it: sections of (key, value) in order, repeated
    keys kept, comments and blank lines dropped, backslash continuations joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}= set {len(found)} times: {found}"
    return found[0]


def installed_text(name: str) -> str:
    """A unit as installed from this checkout: its programs are the venv's.

    A service with a private /tmp also gets the checkout bound into its
    sandbox (read-only): an installed cryptfs lives in /usr, which every
    sandbox shows, but a checkout may sit in /tmp, which PrivateTmp= hides."""
    text = (UNITS / name).read_text()
    assert name.endswith(".socket") or "/usr/bin/cryptfs" in text
    text = text.replace("/usr/bin/cryptfs", f"{VENV_BIN}/cryptfs")
    if "\nPrivateTmp=yes\n" in text:  # (never the mount unit: no namespace of its own)
        assert "\n[Service]\n" in text
        text = text.replace("\n[Service]\n", f"\n[Service]\nBindReadOnlyPaths=-{CHECKOUT}\n", 1)
    return text


def man_path(tmp: Path) -> Path:
    """packaging/man/ laid out as man(1) searches it (man1/, man8/)."""
    for page in MAN.iterdir():
        section = tmp / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        (section / page.name).symlink_to(page)
    return tmp


# -- the unit files as text ------------------------------------------------------------

def test_agent_socket_unit() -> None:
    unit = parse_unit(UNITS / "cryptfs-agent.socket")
    sock = unit["Socket"]
    assert one(sock, "ListenStream") == "/run/cryptfs/agent.sock"
    assert one(sock, "SocketMode") == "0666"  # SO_PEERCRED, not the file mode, decides
    assert one(sock, "DirectoryMode") == "0755"
    assert one(sock, "SocketUser") == "root"
    assert values(sock, "Accept") in ([], ["no"])  # one agent for every connection
    assert one(unit["Install"], "WantedBy") == "sockets.target"


def test_agent_service_hardening() -> None:
    unit = parse_unit(UNITS / "cryptfs-agent.service")
    svc = unit["Service"]
    assert one(svc, "ExecStart") == "/usr/bin/cryptfs-agent"
    assert "cryptfs-agent.socket" in one(unit["Unit"], "Requires")
    assert "cryptfs-agent.socket" in one(unit["Unit"], "After")
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "read-only",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "PrivateNetwork": "yes",
        "RestrictAddressFamilies": "AF_UNIX", "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes", "RestrictRealtime": "yes", "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes", "SystemCallArchitectures": "native",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectClock": "yes",
        "ProtectHostname": "yes", "ProtectProc": "invisible", "ProcSubset": "pid",
        "PrivateMounts": "yes", "PrivateIPC": "yes",
        "LimitCORE": "0", "UMask": "0022",
        # Root's own directories need no capability.
        "CapabilityBoundingSet": "", "AmbientCapabilities": "",
    }
    for key, value in expected.items():
        assert one(svc, key) == value, key
    assert values(svc, "SystemCallFilter") == ["@system-service", "~@privileged"]
    assert set(one(svc, "ReadWritePaths").split()) == {"-/srv", "-/var/lib"}
    # Root, with its real uids: PrivateUsers= would map every peer to nobody
    # (SO_PEERCRED could not tell users apart), and root would not own root's files.
    for absent in ("User", "DynamicUser", "PrivateUsers", "MemoryMax", "LimitAS", "LimitDATA"):
        assert not values(svc, absent), f"{absent}= would break the agent"


def test_mount_template() -> None:
    unit = parse_unit(UNITS / "cryptfs-mount@.service")
    svc, head = unit["Service"], unit["Unit"]
    # Named after the unescaped mountpoint: EnvironmentFile= is a glob pattern, in
    # which the backslash of an escaped "-" (%i = srv-call\x2dcentre) would be lost.
    assert one(svc, "EnvironmentFile") == "/etc/cryptfs/mount%f.conf"
    assert one(svc, "ExecStart") == ('/usr/bin/cryptfs mount ${BACKING} "%f" --agent --foreground '
                                     "$MOUNT_OPTIONS")
    assert one(svc, "Type") == "notify" and "ExecStartPost" not in svc
    assert one(svc, "ExecStop") == '/usr/bin/cryptfs unmount "%f"'
    assert "cryptfs-agent.socket" in one(head, "Requires").split()
    assert "cryptfs-agent.socket" in one(head, "After").split()
    assert one(head, "RequiresMountsFor") == "%f"
    assert one(svc, "LimitCORE") == "0"
    present = {k for section in unit.values() for k, _ in section}
    assert not present & MOUNT_NAMESPACE_OPTIONS, present & MOUNT_NAMESPACE_OPTIONS
    assert not values(svc, "User"), "a shared --agent mount must run as root"
    text = (UNITS / "cryptfs-mount@.service").read_text()
    assert "systemd-escape --path" in text and "BACKING=" in text  # the documented format


# -- systemd-analyze -----------------------------------------------------------------------

@pytest.fixture
def verify_dir(tmp_path: Path) -> Path:
    d = tmp_path / "units"
    d.mkdir()
    for name in ("cryptfs-agent.socket", "cryptfs-agent.service", "cryptfs-mount@.service"):
        (d / name).write_text(installed_text(name))
    (d / "cryptfs-mount@srv-customers.service").symlink_to("cryptfs-mount@.service")
    return d


def analyze_verify(directory: Path, *units: str, manpath: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", *units], cwd=directory, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "MANPATH": str(manpath), "SYSTEMD_LOG_COLOR": "0"})


def test_systemd_analyze_verify(verify_dir: Path, tmp_path: Path) -> None:
    need("systemd-analyze", "man")
    manpath = man_path(tmp_path / "man")
    res = analyze_verify(verify_dir, "cryptfs-agent.socket", "cryptfs-agent.service",
                         "cryptfs-mount@srv-customers.service", manpath=manpath)
    assert res.returncode == 0 and res.stderr == "" and res.stdout == "", res.stdout + res.stderr

    # The check has teeth: a misspelt directive or a missing man page is reported.
    text = (verify_dir / "cryptfs-agent.service").read_text()
    (verify_dir / "cryptfs-agent.service").write_text(
        text.replace("LockPersonality=yes", "LockPersonalty=yes"))
    bad = analyze_verify(verify_dir, "cryptfs-agent.service", manpath=manpath)
    assert "LockPersonalty" in bad.stderr
    bad = analyze_verify(verify_dir, "cryptfs-agent.socket", manpath=tmp_path / "nowhere")
    assert bad.returncode != 0 and "man cryptfs-agent(8)" in bad.stderr


def test_agent_exposure(verify_dir: Path) -> None:
    need("systemd-analyze")
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=15",
                          "--no-pager", "cryptfs-agent.service"], cwd=verify_dir,
                         capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for cryptfs-agent\.service: (\d+\.\d)", res.stdout)
    assert score, res.stdout + res.stderr
    assert res.returncode == 0 and float(score.group(1)) <= 1.5, res.stdout


# -- socket activation without a service manager ----------------------------------------------

def test_socket_activation() -> None:
    """systemd-socket-activate binds the socket and starts the agent on the first
    connection with LISTEN_FDS=1: the agent serves that very socket."""
    need("systemd-socket-activate")
    ensure_users()
    root = shared_tempdir()
    sock, log = root / "agent.sock", root / "agent.log"
    backing = make_shared_volume(root / "backing")
    proc = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), str(AGENT),
                             "--idle-timeout", "0", "--log-file", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)
        sock.chmod(0o666)  # what SocketMode= does in the .socket unit (the tool has no option)
        assert not log.exists()  # nothing started before the first connection
        client = AgentClient(str(sock), timeout=20)
        assert client.request({"op": "ping"})["message"] == "pong"
        assert "listening on the socket passed by systemd" in log.read_text()
        assert f"[{proc.pid}]" in log.read_text()  # the activator became the agent

        alice = pwd.getpwnam("cfs-alice").pw_uid
        answer = client.request({"op": "unlock", "backing": str(backing), "uid": alice},
                                secret=Secret(USERS["cfs-alice"][1]))
        assert answer["slot"] >= 1
        res = cli_as("cfs-alice", "status", "--agent-socket", str(sock))
        assert res.returncode == 0, res.stderr
        assert f"cfs-alice (uid {alice}): {backing}" in res.stdout
        res = subprocess.run([str(VENV_BIN / "cryptfs"), "status", "--agent-socket", str(sock)],
                             capture_output=True, text=True, timeout=30)
        assert (res.returncode, res.stdout) == (0, "no sessions\n"), res.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "every session is locked" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(root, ignore_errors=True)


# -- the real thing: a systemd service manager ---------------------------------------------------

@pytest.fixture
def manager() -> Iterator[Manager]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"systemd is not installed here: no {', '.join(missing)}")
    if os.geteuid() != 0:
        pytest.fail("a private systemd manager needs root (run the suite as scripts/run test does)")
    ensure_users()
    # Under /var/lib: the agent's sandbox lets it write there (ReadWritePaths), and
    # its /tmp is private, so the volumes cannot live under /tmp.
    root = Path("/var/lib") / f"cryptfs-test-{os.getpid()}-{time.time_ns()}"
    root.mkdir(mode=0o755)
    m = Manager(root)
    try:
        yield m
    finally:
        try:
            m.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


def install_agent(m: Manager) -> Path:
    """The agent's socket and service, unchanged but for the venv's binary; a drop-in
    moves the socket into the test directory and keeps the agent's standard error."""
    m.units.mkdir(parents=True, exist_ok=True)
    for name in ("cryptfs-agent.socket", "cryptfs-agent.service"):
        (m.units / name).write_text(installed_text(name))
    sock = m.root / "run" / "cryptfs" / "agent.sock"
    m.drop_in("cryptfs-agent.socket", f"[Socket]\nListenStream=\nListenStream={sock}\n")
    m.drop_in("cryptfs-agent.service", f"[Service]\nStandardError=append:{m.root}/agent.log\n")
    return sock


def status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def mount_options(pid: int) -> dict[str, str]:
    """Mount point -> per-mount options, as process ``pid`` sees its file system."""
    out = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            out[fields[4]] = fields[5]
    return out


def test_agent_unit_under_systemd(manager: Manager) -> None:
    m = manager
    sock = install_agent(m)

    # A volume whose root slot costs 512 MiB of Argon2id, and one in a root-only (0700)
    # directory, which users cannot even enter.
    big = m.root / "big"
    init_volume(str(big), "aes-256-gcm", Secret(ROOT_PASSPHRASE), Kdf(ops=1, mem_kib=512 * 1024),
                user_fields("root", "admin")).close()
    alice = pwd.getpwnam("cfs-alice")
    private = m.root / "private"
    private.mkdir(mode=0o700)
    make_shared_volume(private / "backing")
    pass_dir = m.root / "pass"
    pass_dir.mkdir(mode=0o755)
    alice_pass = passfile(pass_dir, "cfs-alice", USERS["cfs-alice"][1])
    in_tmp = make_shared_volume(m.root / "in-tmp")  # moved to /tmp below

    m.start("cryptfs-agent.socket")
    try:
        m.wait_active("cryptfs-agent.socket")
        assert m.systemctl("is-active", "cryptfs-agent.service", check=False).stdout.strip() \
            == "inactive"  # not before the first connection
        assert (sock.stat().st_mode & 0o777, sock.parent.stat().st_mode & 0o777) == (0o666, 0o755)

        client = AgentClient(str(sock), timeout=60)
        assert client.request({"op": "ping"})["message"] == "pong"
        m.wait_active("cryptfs-agent.service")
        pid = m.main_pid("cryptfs-agent.service")

        # Argon2id with 512 MiB, under MemoryDenyWriteExecute and the syscall filter.
        answer = client.request({"op": "unlock", "backing": str(big), "uid": 0},
                                secret=Secret(ROOT_PASSPHRASE))
        assert answer["backing"] == str(big)
        # A user unlocks a volume she cannot see: SO_PEERCRED names her, and root's
        # owner rights (no capability) let the agent read it and write lastuse there.
        res = cli_as("cfs-alice", "unlock", str(private / "backing"), "--passphrase-file",
                     str(alice_pass), "--agent-socket", str(sock))
        assert res.returncode == 0, res.stdout + res.stderr + m.log_text()
        lastuse = (private / "backing" / "cryptfs.lastuse").stat()
        # (who unlocked when: private, as the config is)
        assert (lastuse.st_uid, lastuse.st_mode & 0o777) == (0, 0o600)
        res = cli_as("cfs-alice", "status", "--agent-socket", str(sock))
        assert f"cfs-alice (uid {alice.pw_uid}): {private / 'backing'}" in res.stdout
        # Its /tmp is its own: a volume in the machine's /tmp does not exist for it.
        tmp = shared_tempdir()
        try:
            shutil.move(in_tmp, tmp / "backing")
            with pytest.raises(NotAVolume, match="No such file or directory"):
                client.request({"op": "unlock", "backing": str(tmp / "backing"), "uid": 0},
                               secret=Secret(ROOT_PASSPHRASE))
        finally:
            shutil.rmtree(tmp)

        # The sandbox is really in force.
        st = status_of(pid)
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        assert int(st["CapBnd"], 16) == int(st["CapEff"], 16) == 0  # root without capabilities
        for ns in ("net", "mnt", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        seen = mount_options(pid)  # / read-only (home directories with it), /var/lib not
        assert seen["/"].startswith("ro"), seen["/"]
        assert seen["/var/lib"].startswith("rw"), seen.get("/var/lib")
        assert "/tmp" in seen  # a private /tmp
    finally:
        m.stop()
    assert "agent stopped; every session is locked" in (m.root / "agent.log").read_text()
    assert not sock.exists()  # RemoveOnStop=yes


def test_agent_sandbox_denies_write_execute_memory(manager: Manager) -> None:
    """The control for the test above: the same [Service] sandbox really refuses a
    writable and executable mapping, so the agent works under MemoryDenyWriteExecute
    (cffi and cryptography need none) rather than the harness not applying it."""
    m = manager
    probe = ("import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE"
             " | mmap.PROT_EXEC); print('mapped')")
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True)  # allowed here
    lines = []
    for line in installed_text("cryptfs-agent.service").splitlines():
        if line.startswith(("ExecStart=", "Type=", "Restart=", "Requires=", "After=", "Also=")):
            continue
        lines.append(line)
        if line == "[Service]":
            lines += ["Type=oneshot", f'ExecStart={sys.executable} -c "{probe}"',
                      f"StandardOutput=append:{m.root}/probe.log",
                      f"StandardError=append:{m.root}/probe.log"]
    m.units.mkdir(parents=True)
    (m.units / "mdwe-probe.service").write_text("\n".join(lines) + "\n")
    (m.units / "idle.target").write_text("[Unit]\nDescription=nothing\n")
    m.start("idle.target")
    m.systemctl("start", "mdwe-probe.service", check=False)
    log = (m.root / "probe.log").read_text()
    assert "PermissionError" in log and "mapped" not in log, log
    assert m.systemctl("show", "-P", "ExecMainStatus", "mdwe-probe.service").stdout.strip() == "1"


def test_mount_unit_under_systemd(manager: Manager) -> None:
    m = manager
    sock = install_agent(m)
    (m.units / "cryptfs-mount@.service").write_text(installed_text("cryptfs-mount@.service"))
    backing = make_shared_volume(m.root / "backing dir")  # a space: ${BACKING} stays one word
    mnt = m.root / "mnt point"  # a space: "%f" stays one word too
    mnt.mkdir()
    instance = subprocess.run(["systemd-escape", "--path", str(mnt)], capture_output=True,
                              text=True, check=True).stdout.strip()
    unit = f"cryptfs-mount@{instance}.service"
    assert "\\x2d" in instance  # the test directory's name has dashes
    etc = m.root / "etc" / "cryptfs"
    conf = etc / "mount" / f"{str(mnt).lstrip('/')}.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"# the volume of {mnt}\nBACKING=\"{backing}\"\n"
                    f"MOUNT_OPTIONS=--log-file {m.root}/fs.log\n"
                    f"CRYPTFS_AGENT_SOCKET={sock}\n")
    # Only the directory of the environment file moves (the unit reads /etc/cryptfs/).
    m.drop_in("cryptfs-mount@.service",
              f"[Service]\nEnvironmentFile=\nEnvironmentFile={etc}/mount%f.conf\n"
              f"StandardError=append:{m.root}/mount.log\n")

    m.start(unit)  # pulls in cryptfs-agent.socket (Requires=)
    m.wait_active(unit)
    pid = m.main_pid(unit)
    # Active means mounted (the daemon sends READY=1 only then).  mountinfo escapes a space as \040.
    escaped = str(mnt).replace(" ", "\\040")
    assert escaped in mount_options(pid), (m.root / "mount.log").read_text()
    with open(f"/proc/{pid}/mountinfo") as f:
        line = next(ln for ln in f if ln.split()[4] == escaped)
    source = str(backing).replace(" ", "\\040")
    assert f" fuse.cryptfs cryptfs:{source} " in line, line

    # The mount lives in the manager's private mount namespace: reach it through
    # the mount process's root.  Root is served once unlocked in the agent.
    inside = Path(f"/proc/{pid}/root") / str(mnt).lstrip("/")
    with pytest.raises(PermissionError):
        os.listdir(inside)
    AgentClient(str(sock), timeout=60).request({"op": "unlock", "backing": str(backing), "uid": 0},
                                               secret=Secret(ROOT_PASSPHRASE))
    deadline = time.monotonic() + 10
    while True:
        try:
            (inside / "notes.txt").write_bytes(b"call notes, customer 4711\n")
            break
        except PermissionError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert (inside / "notes.txt").read_bytes() == b"call notes, customer 4711\n"
    assert not any(b"customer 4711" in p.read_bytes() for p in backing.rglob("*") if p.is_file())

    manager_pid = m.proc.pid if m.proc else 0
    m.systemctl("stop", unit)
    assert escaped not in mount_options(manager_pid)
    show = m.systemctl("show", "-p", "Result", "-p", "ExecMainStatus", "-p", "ExecStop", unit).stdout
    assert "Result=success" in show and "ExecMainStatus=0" in show, show
    assert re.search(r"ExecStop=.*cryptfs unmount .*status=0/0", show), show  # it was ExecStop
