"""Hybrid (public-key) files and the directory policy, on real mounts with real users.

A volume whose users cfs-alice, cfs-bob, cfs-carol and root have v2 slots
(X25519 key pairs) and which has a recovery key; ``cryptfs policy set`` rules
say how new files of a directory are written.  Users run as themselves
(their uid) against a real key agent and a shared --agent mount; what they
may read is checked on the exact bytes they get, and the backing files'
headers are read byte by byte.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import pwd
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import multiuser
from conftest import Mount, require_fuse, run_cli
from cryptfs.recovery import add_recovery, create_key_file
from cryptfs.secret import Secret
from cryptfs.users import add_user, remove_user
from cryptfs.volume import open_volume
from multiuser import (
    ROOT_PASSPHRASE,
    TEST_KDF,
    USERS,
    AgentProcess,
    ScriptHolder,
    Shared,
    SharedMount,
    cli_as,
    ensure_user,
    give_recovery_key,
    make_shared_volume,
    passfile,
    run_as,
    shared_tempdir,
)

ALICE, BOB, CAROL = "cfs-alice", "cfs-bob", "cfs-carol"
DENIED = b"Permission denied"
MODE_AES, MODE_XCHACHA = 1, 2
PADDING, SYMMETRIC, X25519 = 0, 1, 2
RECIPIENT_STANZA_ROOM = 3 + 88  # type, length, body of one X25519 stanza

# Users beyond the three of multiuser.py, for the header room of a share.
EXTRA_USERS = {f"cfs-hyb-{n}": f"{n} passphrase".encode() for n in ("dave", "erin", "frank")}

RULES = (
    ("/h", "--mode", "hybrid", "--recipient", BOB),
    ("/drop", "--mode", "hybrid-xchacha20-poly1305", "--dropbox", "--recipient", BOB),
    ("/x", "--mode", "xchacha20-poly1305"),
)

# A program (Debian's python3, run as a user) that keeps one file open and
# obeys commands on stdin: "read" and "close"; it answers each with one line.
HOLDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("opened", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    try:
        if cmd == "read":
            print("read", os.pread(fd, 1 << 20, 0).hex(), flush=True)
        elif cmd == "close":
            os.close(fd)
            print("closed", flush=True)
    except OSError as e:
        print(cmd, "errno", e.errno, flush=True)
"""

# Creates argv[1] and writes stdin to it in chunks of the sizes argv[2:], one
# write each; then reads the file back through the same descriptor, closes it
# and prints what it read (hex).
WRITER = r"""
import os, sys
data = sys.stdin.buffer.read()
fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
off = 0
for n in map(int, sys.argv[2:]):
    assert os.write(fd, data[off:off + n]) == n
    off += n
assert off == len(data)
os.fsync(fd)
back = os.pread(fd, 1 << 20, 0)
os.close(fd)
print(back.hex())
"""

# Tries to open argv[1] with the flags in argv[2] and prints "ok" or the errno.
OPENER = r"""
import os, sys
flags = {"r": os.O_RDONLY, "a": os.O_WRONLY | os.O_APPEND, "w": os.O_WRONLY | os.O_TRUNC,
         "rw": os.O_RDWR}[sys.argv[2]]
try:
    fd = os.open(sys.argv[1], flags)
except OSError as e:
    print("errno", e.errno)
else:
    if sys.argv[2] == "a":
        os.write(fd, b"appended")
    os.close(fd)
    print("ok")
"""


# -- the scenario ---------------------------------------------------------------------------------

class Hybrid(Shared):
    """A shared agent mount of a volume with a recovery key (and maybe rules)."""

    recovery_key: Path
    admin: str  # whose passphrase `policy set` is given (an admin's)

    def policy_set(self, directory: str, *args: str) -> str:
        return run_cli("policy", "set", str(self.backing), directory, *args,
                       "--passphrase-file", str(self.passfiles[self.admin])).stdout

    def unlock_ok(self, *users: str) -> None:
        for user in users:
            res = self.unlock(user)
            assert res.returncode == 0, res.stdout + res.stderr
            assert res.stdout.startswith("unlocked ")

    def mkdirs(self, *names: str) -> None:
        """Directories anyone may create files in (made by root, who must be unlocked)."""
        for name in names:
            p = self.path(name)
            p.mkdir()
            p.chmod(0o777)

    def share(self, user: str, rel: str, *args: str) -> subprocess.CompletedProcess[str]:
        return cli_as(user, "share", str(self.path(rel)), *args, env=self.agent.env)


@contextlib.contextmanager
def hybrid_scenario(rules: tuple[tuple[str, ...], ...] = RULES,
                    extra_users: dict[str, bytes] | None = None,
                    root_slot: bool = True) -> Iterator[Hybrid]:
    """``root_slot=False``: root's key slot is removed (by alice) and the volume's
    root directory made 0777, so the users can work without root."""
    require_fuse()
    root = shared_tempdir("cryptfs-hybrid-")
    agent = AgentProcess(root / "agent.sock", root / "agent.log")
    mount = SharedMount(root / "backing", root / "mnt", root / "mount.log", root / "mount.pid",
                        agent=agent)
    key = root / "recovery.key"
    try:
        make_shared_volume(root / "backing")
        vol = open_volume(str(root / "backing"), Secret(ROOT_PASSPHRASE))
        try:
            for name, secret in (extra_users or {}).items():
                ensure_user(name)
                add_user(vol, name, "agent", Secret(secret), TEST_KDF)
        finally:
            vol.close()
        give_recovery_key(root / "backing", ROOT_PASSPHRASE, key)
        (root / "pass").mkdir(mode=0o755)
        secrets = {**{n: s for n, (_, s) in USERS.items()}, **(extra_users or {})}
        files = {name: passfile(root / "pass", name, s) for name, s in secrets.items()}
        files["root"] = passfile(root / "pass", "root", ROOT_PASSPHRASE)
        h = Hybrid(root, root / "backing", agent, mount, files)
        h.recovery_key = key
        h.admin = "root"  # (the volume's admin sets the rules: docs/POLICY.md)
        for directory, *args in rules:
            h.policy_set(directory, *args)
        if not root_slot:  # (then root's slot goes)
            vol = open_volume(str(root / "backing"), Secret(USERS[ALICE][1]))
            try:
                remove_user(vol, "root")
            finally:
                vol.close()
            (root / "backing" / "tree").chmod(0o777)
        agent.start("--idle-timeout", "0", "--backoff", "0.2", "--backoff-max", "1")
        mount.start()
        yield h
    finally:
        try:
            mount.stop()
        finally:
            agent.stop()
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def hy() -> Iterator[Hybrid]:
    """Rules /h (hybrid, +bob), /drop (xchacha drop box for bob), /x (xchacha); root
    unlocked, the three directories made (0777)."""
    with hybrid_scenario() as h:
        h.unlock_ok("root")
        h.mkdirs("h", "drop", "x")
        yield h


@pytest.fixture
def hy_locked() -> Iterator[Hybrid]:
    """The same rules; nobody unlocked, no directory made."""
    with hybrid_scenario() as h:
        yield h


# -- helpers --------------------------------------------------------------------------------------

def denied(res: subprocess.CompletedProcess[bytes]) -> bool:
    return res.returncode != 0 and DENIED in res.stderr and res.stdout == b""


def cat(user: str, path: Path) -> subprocess.CompletedProcess[bytes]:
    return run_as(user, "cat", str(path))


def write_as(user: str, path: Path, *chunks: bytes) -> bytes:
    """``user`` creates ``path`` with one write per chunk; returns what it read back
    through its own descriptor before closing."""
    res = run_as(user, "/usr/bin/python3", "-c", WRITER, str(path), *(str(len(c)) for c in chunks),
                 input=b"".join(chunks))
    assert res.returncode == 0, res.stderr
    return bytes.fromhex(res.stdout.decode().strip())


def open_as(user: str, path: Path, how: str) -> str:
    res = run_as(user, "/usr/bin/python3", "-c", OPENER, str(path), how)
    assert res.returncode == 0, res.stderr
    return res.stdout.decode().strip()


def Holder(user: str, path: Path) -> ScriptHolder:  # noqa: N802 - reads as the class it was
    return ScriptHolder(user, path, HOLDER)


def backing_of(backing: Path, rel: str) -> Path:
    """The backing file of plaintext path ``rel`` (short names), found with root's key."""
    return multiuser.backing_of(backing, ROOT_PASSPHRASE, rel)


def header_of(path: Path) -> tuple[int, list[tuple[int, bytes]]]:
    """(content mode id, [(stanza type, body), ...]) of a backing file, parsed by hand
    from the layout in docs/FORMAT.md."""
    raw = path.read_bytes()
    assert raw[:6] == b"CRYPTF" and raw[6] == 1
    (h_len,) = struct.unpack_from(">H", raw, 10)
    count = raw[28]
    stanzas, off = [], 29
    for _ in range(count):
        typ, n = raw[off], struct.unpack_from(">H", raw, off + 1)[0]
        stanzas.append((typ, raw[off + 3:off + 3 + n]))
        off += 3 + n
    assert off == h_len - 32, "the stanzas fill the header up to the MAC"
    return raw[7], stanzas


def types(stanzas: list[tuple[int, bytes]]) -> list[int]:
    return [t for t, _ in stanzas]


# -- reading, writing and denial ------------------------------------------------------------------

def test_hybrid_file_is_for_its_recipients_only(hy: Hybrid) -> None:
    hy.unlock_ok(ALICE, BOB, CAROL)
    data = b"call 0042: customer disputes the invoice\n" + os.urandom(9000)
    f = hy.path("h", "call.txt")
    assert write_as(ALICE, f, data[:5000], data[5000:]) == data
    assert cat(ALICE, f).stdout == data
    assert cat(BOB, f).stdout == data
    assert denied(cat(CAROL, f))
    # The name and attributes are not the file's content: carol may list and stat it.
    assert run_as(CAROL, "ls", str(hy.path("h"))).stdout == b"call.txt\n"
    st = run_as(CAROL, "stat", "-c", "%s %U", str(f))
    assert st.returncode == 0 and st.stdout == f"{len(data)} {ALICE}\n".encode()
    # Root is unlocked and has a slot, but is no recipient: no exception for root.
    with pytest.raises(PermissionError):
        f.read_bytes()
    assert hy.share(ALICE, "h/call.txt", "--list").stdout.split() == [ALICE, BOB, "recovery"]


def test_a_key_in_memory_is_never_served_to_a_non_recipient(hy: Hybrid) -> None:
    """While alice holds the file open (its key loaded in the mount) and right
    after she read it, carol and root are refused; bob, a recipient, is not."""
    hy.unlock_ok(ALICE, BOB, CAROL)
    data = b"salary review, do not forward\n" * 300
    f = hy.path("h", "review.txt")
    assert write_as(ALICE, f, data) == data
    alice = Holder(ALICE, f)
    try:
        assert alice.do("read") == "read " + data.hex()
        assert denied(cat(CAROL, f))
        assert open_as(CAROL, f, "r") == f"errno {errno.EACCES}"
        assert open_as(CAROL, f, "a") == f"errno {errno.EACCES}"
        with pytest.raises(PermissionError):
            f.read_bytes()  # root
        assert cat(BOB, f).stdout == data  # a recipient, while alice holds it
        assert alice.do("read") == "read " + data.hex()
        assert denied(cat(CAROL, f))
        assert alice.do("close") == "closed"
    finally:
        alice.end()
    for _ in range(2):  # a recipient's read, then at once a non-recipient's
        assert cat(ALICE, f).stdout == data
        assert denied(cat(CAROL, f))
        assert open_as(CAROL, f, "w") == f"errno {errno.EACCES}"  # nor truncate it
    assert cat(BOB, f).stdout == data  # the refused opens changed nothing
    # Carol locked: refused as before (now by the gate).
    assert hy.lock(CAROL).returncode == 0
    assert denied(cat(CAROL, f))
    assert run_as(CAROL, "stat", str(f)).returncode != 0


def test_root_without_a_slot_gets_nothing_even_while_a_recipient_reads() -> None:
    with hybrid_scenario(rules=(("/", "--mode", "hybrid", "--recipient", BOB),),
                         root_slot=False) as h:
        res = h.unlock("root")
        assert res.returncode != 0 and "has no key slot" in res.stderr
        h.unlock_ok(ALICE, BOB)
        data = b"not for root\n" * 100
        f = h.path("f")
        assert write_as(ALICE, f, data) == data
        alice = Holder(ALICE, f)
        try:
            assert alice.do("read") == "read " + data.hex()
            for attempt in (f.read_bytes, lambda: os.stat(f), lambda: os.listdir(h.mount.mnt)):
                with pytest.raises(PermissionError):
                    attempt()
            assert cat(BOB, f).stdout == data
        finally:
            alice.end()
        assert h.share(BOB, "f", "--list").stdout.split() == [ALICE, BOB, "recovery"]


def test_share_adds_a_recipient_only_a_recipient_can(hy: Hybrid) -> None:
    hy.unlock_ok(ALICE, BOB, CAROL)
    data = os.urandom(5000)
    f = hy.path("h", "contract.pdf")
    assert write_as(ALICE, f, data) == data
    assert denied(cat(CAROL, f))
    # Carol cannot give herself (or anyone) access to what she cannot read:
    # without write permission the kernel refuses first (the CLI says so),
    # and with it the mount finds no key of hers in the header.
    res = hy.share(CAROL, "h/contract.pdf", "--with", CAROL)
    assert res.returncode == 2 and "you may not write it" in res.stderr
    run_as(ALICE, "chmod", "666", str(f), check=True)
    res = hy.share(CAROL, "h/contract.pdf", "--with", CAROL)
    assert res.returncode == 2 and "not one of its recipients" in res.stderr
    assert "Traceback" not in res.stderr
    assert denied(cat(CAROL, f))
    assert hy.share(CAROL, "h/contract.pdf", "--list").stdout.split() == [ALICE, BOB, "recovery"]
    # Alice can; then carol reads the exact bytes, and is listed.
    res = hy.share(ALICE, "h/contract.pdf", "--with", CAROL)
    assert res.returncode == 0 and res.stdout == f"shared {f} with {CAROL}\n"
    assert cat(CAROL, f).stdout == data
    assert hy.share(BOB, "h/contract.pdf", "--list").stdout.split() == \
        [ALICE, BOB, "recovery", CAROL]
    # Any recipient may share (sharing rewrites the header: it takes write
    # permission on the file, which alice gives); with a recipient again, it
    # changes nothing.
    run_as(ALICE, "chmod", "666", str(f), check=True)
    assert hy.share(BOB, "h/contract.pdf", "--with", CAROL).returncode == 0
    assert hy.share(BOB, "h/contract.pdf", "--list").stdout.split() == \
        [ALICE, BOB, "recovery", CAROL]
    # Nobody by that name.
    res = hy.share(ALICE, "h/contract.pdf", "--with", "cfs-nobody")
    assert res.returncode == 2 and "not a user of this volume with a key pair" in res.stderr
    # A symmetric file is not hybrid: every unlocked user reads it already.
    assert write_as(ALICE, hy.path("x", "memo.txt"), b"memo\n") == b"memo\n"
    res = hy.share(ALICE, "x/memo.txt", "--with", BOB)
    assert res.returncode == 2 and "not a hybrid file" in res.stderr
    assert hy.share(ALICE, "x/memo.txt", "--list").stdout == "(symmetric: every unlocked user)\n"
    assert cat(CAROL, hy.path("x", "memo.txt")).stdout == b"memo\n"
    assert "Traceback" not in res.stderr


def test_a_hybrid_header_has_room_for_four_more_recipients() -> None:
    """Made with 3 recipients (alice, bob, recovery) and 4 spare: 4 shares fit in
    the padding (the header keeps its length, the content does not move), the
    5th is refused with a clear message and changes nothing."""
    with hybrid_scenario(extra_users=EXTRA_USERS) as h:
        extra = list(EXTRA_USERS)
        h.unlock_ok("root", ALICE, CAROL, *extra)
        h.mkdirs("h")
        data = os.urandom(10_000)
        f = h.path("h", "f.bin")
        assert write_as(ALICE, f, data) == data
        back = backing_of(h.backing, "/h/f.bin")
        size, blocks = back.stat().st_size, back.read_bytes()
        mode, stanzas = header_of(back)
        assert types(stanzas) == [X25519, X25519, X25519, PADDING]
        assert len(stanzas[3][1]) + 3 == 4 * RECIPIENT_STANZA_ROOM
        h_len = struct.unpack_from(">H", blocks, 10)[0]
        for user in [CAROL, *extra]:
            assert denied(cat(user, f))
            res = h.share(ALICE, "h/f.bin", "--with", user)
            assert res.returncode == 0, res.stderr
            assert cat(user, f).stdout == data
        now = back.read_bytes()
        assert len(now) == size and now[h_len:] == blocks[h_len:]  # no content byte moved
        assert types(header_of(back)[1]) == [X25519] * 7
        res = h.share(ALICE, "h/f.bin", "--with", "root")
        assert res.returncode == 2
        assert "has no room for another recipient" in res.stderr and "Traceback" not in res.stderr
        assert back.read_bytes() == now
        with pytest.raises(PermissionError):
            f.read_bytes()  # root was not added
        assert h.share(ALICE, "h/f.bin", "--list").stdout.split() == \
            [ALICE, BOB, "recovery", CAROL, *extra]
        assert denied(cat(BOB, f))  # a recipient, but not unlocked here
        for user in (ALICE, CAROL, *extra):
            assert cat(user, f).stdout == data


# -- drop box -------------------------------------------------------------------------------------

def test_drop_box_writer_cannot_read_back(hy: Hybrid) -> None:
    hy.unlock_ok(ALICE, BOB, CAROL)
    chunks = [b"recording 7 of 2026-11-29\n", os.urandom(6000), b"\nend of recording\n"]
    data = b"".join(chunks)
    f = hy.path("drop", "rec7.wav")
    # Through the descriptor it created the file with, the writer still reads.
    assert write_as(ALICE, f, *chunks) == data
    # Closed: the writer is not a recipient.
    assert denied(cat(ALICE, f))
    assert open_as(ALICE, f, "a") == f"errno {errno.EACCES}"
    assert open_as(ALICE, f, "w") == f"errno {errno.EACCES}"
    assert open_as(ALICE, f, "rw") == f"errno {errno.EACCES}"
    assert denied(cat(CAROL, f))
    # Bob reads exactly what was written (nothing appended, nothing truncated).
    assert cat(BOB, f).stdout == data
    assert hy.share(BOB, "drop/rec7.wav", "--list").stdout.split() == [BOB, "recovery"]
    # Nor can the writer share it with herself.
    res = hy.share(ALICE, "drop/rec7.wav", "--with", ALICE)
    assert res.returncode == 2 and "not one of its recipients" in res.stderr
    # The writer may still list it (and sees its size).
    assert run_as(ALICE, "stat", "-c", "%s", str(f)).stdout == f"{len(data)}\n".encode()
    mode, stanzas = header_of(backing_of(hy.backing, "/drop/rec7.wav"))
    assert mode == MODE_XCHACHA and types(stanzas) == [X25519, X25519, PADDING]


HOLD_CREATED = ("import os, sys\n"
                "fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)\n"
                "os.fchmod(fd, 0o666)\n"
                "os.write(fd, b'alice\\n')\n"
                "print(os.pread(fd, 100, 0), flush=True)\n"
                "sys.stdin.readline()\n"
                "try:\n"
                "    print(os.pread(fd, 100, 0), flush=True)\n"
                "except OSError as e:\n"
                "    print('errno', e.errno, flush=True)\n")


def test_a_drop_box_writer_reads_back_only_its_own_writes(hy: Hybrid) -> None:
    """Review finding: through the create handle it held open, the writer (no
    recipient) read what a recipient appended meanwhile. That handle now reads
    nothing once someone else changed the file, and while it is open nobody's
    read brings those bytes into the page cache its mapping would see."""
    hy.unlock_ok(ALICE, BOB)
    f = hy.path("drop", "planted.txt")
    alice = pwd.getpwnam(ALICE)
    writer = subprocess.Popen(["python3", "-c", HOLD_CREATED, str(f)], user=alice.pw_uid,
                              group=alice.pw_gid, extra_groups=[], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline() == "b'alice\\n'\n"  # (its own writes: as ever)
        assert run_as(BOB, "sh", "-c", f"echo 'SECRET 4111111111111111' >> {f}").returncode == 0
        assert denied(cat(BOB, f))  # (held: the writer's mapping would see the pages)
        writer.stdin.write("\n")
        writer.stdin.close()
        assert writer.stdout.readline() == f"errno {errno.EACCES}\n"
    finally:
        writer.wait(10)
    assert cat(BOB, f).stdout == b"alice\nSECRET 4111111111111111\n"  # (closed: as before)
    assert denied(cat(ALICE, f))


# -- a volume of several modes --------------------------------------------------------------------

def _tag(public: bytes) -> bytes:
    return hashlib.sha256(b"cryptfs/v1/recipient" + public).digest()[:8]


def test_modes_per_directory_and_their_headers(hy: Hybrid) -> None:
    """Default aes-256-gcm; /x xchacha (symmetric); /h hybrid (+bob); /drop; a
    deeper rule /h/open (symmetric aes) wins over /h inside it."""
    hy.policy_set("/h/open", "--mode", "aes-256-gcm")
    hy.unlock_ok(ALICE, BOB, CAROL)
    for d in ("h/sub", "h/sub/deeper", "h/open", "h/open/sub", "x/sub"):
        hy.path(d).mkdir()
        hy.path(d).chmod(0o777)
    files = {
        "top.txt": (MODE_AES, [SYMMETRIC]),
        "x/f": (MODE_XCHACHA, [SYMMETRIC]),
        "x/sub/f": (MODE_XCHACHA, [SYMMETRIC]),
        "h/f": (MODE_AES, [X25519, X25519, X25519, PADDING]),
        "h/sub/deeper/f": (MODE_AES, [X25519, X25519, X25519, PADDING]),
        "h/open/f": (MODE_AES, [SYMMETRIC]),
        "h/open/sub/f": (MODE_AES, [SYMMETRIC]),
        "drop/f": (MODE_XCHACHA, [X25519, X25519, PADDING]),
    }
    contents = {rel: f"{rel}: {os.urandom(8).hex()}\n".encode() * 50 for rel in files}
    for rel, data in contents.items():
        writer = ALICE if "/" in rel else "root"  # (the volume's root directory is 0755)
        assert write_as(writer, hy.path(rel), data[:100], data[100:]) == data
    vol = open_volume(str(hy.backing), Secret(ROOT_PASSPHRASE))
    try:
        publics = vol.config.publics()
        assert vol.config.recovery is not None
        recovery = vol.config.recovery.public
    finally:
        vol.close()
    for rel, (mode, kinds) in files.items():
        got_mode, stanzas = header_of(backing_of(hy.backing, rel))
        assert (got_mode, types(stanzas)) == (mode, kinds), rel
        tags = [body[:8] for t, body in stanzas if t == X25519]
        if rel.startswith("h/") and kinds[0] == X25519:
            assert tags == [_tag(publics[ALICE]), _tag(publics[BOB]), _tag(recovery)], rel
        elif rel.startswith("drop/"):
            assert tags == [_tag(publics[BOB]), _tag(recovery)], rel
    # What that means for carol (unlocked, named nowhere): symmetric yes, hybrid no.
    for rel, (_, kinds) in files.items():
        res = cat(CAROL, hy.path(rel))
        if kinds[0] == SYMMETRIC:
            assert res.stdout == contents[rel], rel
        else:
            assert denied(res), rel
            if not rel.startswith("drop/"):
                assert cat(BOB, hy.path(rel)).stdout == contents[rel]


def test_existing_files_keep_their_mode_when_the_policy_changes(hy: Hybrid) -> None:
    hy.unlock_ok(ALICE, CAROL)
    before = {"x/a": b"symmetric before\n", "h/a": b"hybrid before\n"}
    for rel, data in before.items():
        assert write_as(ALICE, hy.path(rel), data) == data
    # On the mounted volume: /x becomes hybrid (alice only), /h symmetric aes.
    out = hy.policy_set("/x", "--mode", "hybrid-xchacha20-poly1305")
    assert out == "/x: hybrid-xchacha20-poly1305: readable by the creator, the recovery key\n"
    hy.policy_set("/h", "--mode", "aes-256-gcm")
    after = {"x/b": b"hybrid after\n", "h/b": b"symmetric after\n"}
    for rel, data in after.items():
        assert write_as(ALICE, hy.path(rel), data) == data
    modes = {rel: header_of(backing_of(hy.backing, rel)) for rel in [*before, *after]}
    assert (modes["x/a"][0], types(modes["x/a"][1])) == (MODE_XCHACHA, [SYMMETRIC])
    assert (modes["h/a"][0], types(modes["h/a"][1])) == (MODE_AES, [X25519] * 3 + [PADDING])
    assert (modes["x/b"][0], types(modes["x/b"][1])) == (MODE_XCHACHA, [X25519] * 2 + [PADDING])
    assert (modes["h/b"][0], types(modes["h/b"][1])) == (MODE_AES, [SYMMETRIC])
    assert cat(CAROL, hy.path("x/a")).stdout == before["x/a"]
    assert denied(cat(CAROL, hy.path("h/a")))
    assert denied(cat(CAROL, hy.path("x/b")))
    assert cat(CAROL, hy.path("h/b")).stdout == after["h/b"]
    for rel, data in {**before, **after}.items():
        assert cat(ALICE, hy.path(rel)).stdout == data
    # Rewriting an existing file in place keeps its mode too.
    run_as(ALICE, "sh", "-c", f"printf 'rewritten\\n' > {hy.path('x/a')}", check=True)
    assert header_of(backing_of(hy.backing, "x/a"))[0] == MODE_XCHACHA
    assert types(header_of(backing_of(hy.backing, "x/a"))[1]) == [SYMMETRIC]
    assert cat(CAROL, hy.path("x/a")).stdout == b"rewritten\n"
    # Without the rule, new files of /x follow the volume's default again.
    run_cli("policy", "unset", str(hy.backing), "/x", "--passphrase-file",
            str(hy.passfiles["root"]))
    assert write_as(ALICE, hy.path("x/c"), b"default again\n") == b"default again\n"
    got = header_of(backing_of(hy.backing, "x/c"))
    assert (got[0], types(got[1])) == (MODE_AES, [SYMMETRIC])
    assert cat(CAROL, hy.path("x/c")).stdout == b"default again\n"
    # Rules name paths: a file moved out of /h keeps its mode; a directory
    # moved out of it makes files by the rule of where it is now.
    hy.path("h/d").mkdir()
    hy.path("h/d").chmod(0o777)
    run_as(ALICE, "mv", str(hy.path("h/a")), str(hy.path("x/moved")), check=True)
    run_as("root", "mv", str(hy.path("h/d")), str(hy.path("x/d")), check=True)
    assert write_as(ALICE, hy.path("x/d/new"), b"in a moved directory\n")
    assert types(header_of(backing_of(hy.backing, "x/moved"))[1]) == [X25519] * 3 + [PADDING]
    assert denied(cat(CAROL, hy.path("x/moved")))
    assert cat(ALICE, hy.path("x/moved")).stdout == before["h/a"]
    assert types(header_of(backing_of(hy.backing, "x/d/new"))[1]) == [SYMMETRIC]
    assert cat(CAROL, hy.path("x/d/new")).stdout == b"in a moved directory\n"


# -- the policy is re-read by a running mount -----------------------------------------------------



def test_a_first_rule_set_on_a_mounted_volume_applies_to_new_files() -> None:
    """The mount started without any rule; `policy set` on it must still make
    the next files of /h hybrid (not readable by carol).  (Fixed in 2b94785.)"""
    with hybrid_scenario(rules=()) as h:
        h.unlock_ok("root", ALICE, CAROL)
        h.mkdirs("h")
        h.policy_set("/h", "--mode", "hybrid")
        assert write_as(ALICE, h.path("h/f"), b"private\n") == b"private\n"
        assert types(header_of(backing_of(h.backing, "h/f"))[1]) == [X25519, X25519, PADDING]
        assert denied(cat(CAROL, h.path("h/f")))


def test_a_rule_set_before_the_first_unlock_applies_to_new_files(hy_locked: Hybrid) -> None:
    """The mount is running (gated, nobody unlocked yet) when /y gets a hybrid
    rule; the first unlock must not install the config read at mount time."""
    hy_locked.policy_set("/y", "--mode", "hybrid")
    hy_locked.unlock_ok("root", ALICE, CAROL)
    hy_locked.mkdirs("y")
    assert write_as(ALICE, hy_locked.path("y/f"), b"private\n") == b"private\n"
    assert types(header_of(backing_of(hy_locked.backing, "y/f"))[1]) == \
        [X25519, X25519, PADDING]
    assert denied(cat(CAROL, hy_locked.path("y/f")))


# -- share needs write permission: the message must say so -----------------------------------------

def test_share_refused_for_want_of_write_permission_says_so(hy: Hybrid) -> None:
    """Sharing rewrites the header (a user.* xattr write: the kernel wants write
    permission).  Alice owns a 0444 file and is its recipient: the refusal
    must not tell her she is not one of its recipients."""
    hy.unlock_ok(ALICE, CAROL)
    f = hy.path("h", "ro.txt")
    assert write_as(ALICE, f, b"read-only\n") == b"read-only\n"
    run_as(ALICE, "chmod", "444", str(f), check=True)
    res = hy.share(ALICE, "h/ro.txt", "--with", CAROL)
    assert res.returncode == 2
    assert "not one of its recipients" not in res.stderr
    assert "permission" in res.stderr.lower()
    # --list with --with: refused, nothing shared (it shared, although --list "only lists")
    run_as(ALICE, "chmod", "644", str(f), check=True)
    before = hy.share(ALICE, "h/ro.txt", "--list").stdout
    res = hy.share(ALICE, "h/ro.txt", "--with", CAROL, "--list")
    assert res.returncode == 2 and "--list only lists: give it without --with" in res.stderr
    assert hy.share(ALICE, "h/ro.txt", "--list").stdout == before and CAROL not in before
    # Locked, she is refused by the mount: said so ("no such file" before, for a file there).
    assert cli_as(ALICE, "lock", env=hy.agent.env).returncode == 0
    try:
        res = hy.share(ALICE, "h/ro.txt", "--list")
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"{f}: Permission denied" in res.stderr and "no such file" not in res.stderr
        assert "hint: unlock the volume first" in res.stderr
    finally:
        hy.unlock_ok(ALICE)


# -- a passphrase (non-agent) mount ---------------------------------------------------------------

def test_passphrase_mount_opens_what_its_user_is_a_recipient_of() -> None:
    with hybrid_scenario() as h:
        h.unlock_ok("root", ALICE, CAROL)
        h.mkdirs("h", "drop", "x")
        files = {"h/alice": (ALICE, b"alice's, for bob too\n" * 10),
                 "h/carol": (CAROL, b"carol's, for bob too\n" * 10),
                 "drop/carol": (CAROL, os.urandom(7000)),
                 "x/carol": (CAROL, b"symmetric\n")}
        for rel, (user, data) in files.items():
            assert write_as(user, h.path(rel), data) == data
        h.mount.stop()

        def passphrase_mount(user: str) -> Mount:
            m = Mount(h.backing, h.root / f"mnt-{user}", h.root / f"{user}.log",
                      h.root / f"{user}.pid", h.passfiles[user])
            m.start()
            return m

        m = passphrase_mount(ALICE)
        try:
            assert m.path("h/alice").read_bytes() == files["h/alice"][1]
            assert m.path("x/carol").read_bytes() == files["x/carol"][1]
            for rel in ("h/carol", "drop/carol"):
                with pytest.raises(PermissionError):
                    m.path(rel).read_bytes()
                with pytest.raises(PermissionError):
                    open(m.path(rel), "ab").close()
            assert m.path("h/carol").stat().st_size == len(files["h/carol"][1])
            # New files: the mount's user (alice) is their creator.
            m.path("h/new").write_bytes(b"made on alice's mount\n")
            assert m.path("h/new").read_bytes() == b"made on alice's mount\n"
            assert run_cli("share", str(m.path("h/new")), "--list").stdout.split() == \
                [ALICE, BOB, "recovery"]
            with open(m.path("drop/new"), "wb") as out:
                out.write(b"dropped ")
                out.write(b"through alice's mount\n")
            with pytest.raises(PermissionError):
                m.path("drop/new").read_bytes()
            res = run_cli("share", str(m.path("h/carol")), "--with", ALICE, check=False)
            assert res.returncode == 2 and "not one of its recipients" in res.stderr
        finally:
            m.stop()

        m = passphrase_mount(BOB)
        try:
            for rel, (_, data) in files.items():
                assert m.path(rel).read_bytes() == data, rel
            assert m.path("h/new").read_bytes() == b"made on alice's mount\n"
            assert m.path("drop/new").read_bytes() == b"dropped through alice's mount\n"
        finally:
            m.stop()

        m = passphrase_mount(CAROL)
        try:
            assert m.path("h/carol").read_bytes() == files["h/carol"][1]
            for rel in ("h/alice", "h/new", "drop/carol", "drop/new"):
                with pytest.raises(PermissionError):
                    m.path(rel).read_bytes()
        finally:
            m.stop()


# -- recovery -------------------------------------------------------------------------------------

def test_recovery_key_restores_every_mode(hy: Hybrid, tmp_path: Path) -> None:
    hy.unlock_ok(ALICE, BOB, CAROL)
    files = {
        "top.txt": ("root", b"default mode, symmetric\n"),
        "x/sym": (ALICE, b"xchacha, symmetric\n" * 100),
        "h/hybrid": (ALICE, b"hybrid aes: alice, bob\n" * 100),
        "h/big": (ALICE, os.urandom(300_000)),
        "h/empty": (ALICE, b""),
        "h/shared": (ALICE, b"shared with carol afterwards\n"),
        "drop/for-bob": (CAROL, b"only bob may read this\n" + os.urandom(5000)),
        "drop/empty": (CAROL, b""),
    }
    for rel, (user, data) in files.items():
        chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)] or [b""]
        assert write_as(user, hy.path(rel), *chunks) == data
    assert hy.share(ALICE, "h/shared", "--with", CAROL).returncode == 0
    # Nobody but bob reads the drop box file on the mount (root neither).
    for user in (ALICE, CAROL):
        assert denied(cat(user, hy.path("drop/for-bob")))
    with pytest.raises(PermissionError):
        hy.path("drop/for-bob").read_bytes()
    assert cat(BOB, hy.path("drop/for-bob")).stdout == files["drop/for-bob"][1]
    hy.mount.stop()

    out = tmp_path / "out"
    res = run_cli("recover", str(hy.backing), "--recovery-key", str(hy.recovery_key),
                  "--out", str(out))
    assert "Traceback" not in res.stderr and "damaged" not in res.stderr
    total = sum(len(data) for _, data in files.values())
    assert res.stdout.startswith(f"recovered {len(files)} files ({total} bytes), ")
    got = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == {rel: data for rel, (_, data) in files.items()}
    assert (out / "drop" / "for-bob").stat().st_uid == pwd.getpwnam(CAROL).pw_uid


# -- the policy command line ----------------------------------------------------------------------

@pytest.fixture
def vol(tmp_path: Path) -> tuple[Path, Path]:
    """A volume with users (no mount), with a recovery key; and root's passphrase file."""
    backing = make_shared_volume(tmp_path / "backing")
    v = open_volume(str(backing), Secret(ROOT_PASSPHRASE))
    try:
        fd = create_key_file(str(tmp_path / "recovery.key"))
        try:
            add_recovery(v, fd)
        finally:
            os.close(fd)
    finally:
        v.close()
    pw = tmp_path / "root.pass"
    pw.write_bytes(ROOT_PASSPHRASE + b"\n")
    return backing, pw


def _policy(vol: tuple[Path, Path], *args: str) -> subprocess.CompletedProcess[str]:
    backing, pw = vol
    res = run_cli("policy", args[0], str(backing), *args[1:], "--passphrase-file", str(pw),
                  check=False)
    assert "Traceback" not in res.stderr
    return res


def test_policy_set_show_unset(vol: tuple[Path, Path]) -> None:
    conf = vol[0] / "cryptfs.conf"
    assert _policy(vol, "show").stdout == "/ (default): aes-256-gcm (no rule)\n"
    assert "policy" not in json.loads(conf.read_text())
    out = [_policy(vol, "set", *args).stdout for args in (
        ("/h", "--mode", "hybrid", "--recipient", BOB, "--recipient", BOB),
        ("drop/", "--mode", "hybrid-xchacha20-poly1305", "--dropbox", "--recipient", BOB,
         "--recipient", CAROL),
        ("//x/./", "--mode", "xchacha20-poly1305"),
        ("/h/open", "--mode", "aes-256-gcm"),
    )]
    assert out == [
        f"/h: hybrid-aes-256-gcm: readable by the creator, {BOB}, the recovery key\n",
        f"/drop: hybrid-xchacha20-poly1305 drop box: readable by {BOB}, {CAROL}, "
        "the recovery key\n",
        "/x: xchacha20-poly1305 (symmetric: every unlocked user)\n",
        "/h/open: aes-256-gcm (symmetric: every unlocked user)\n",
    ]
    shown = _policy(vol, "show")
    assert shown.returncode == 0
    assert shown.stdout.splitlines() == [
        "/ (default): aes-256-gcm (no rule)",
        f"/drop: hybrid-xchacha20-poly1305 drop box: readable by {BOB}, {CAROL}, the recovery key",
        f"/h: hybrid-aes-256-gcm: readable by the creator, {BOB}, the recovery key",
        "/h/open: aes-256-gcm (symmetric: every unlocked user)",
        "/x: xchacha20-poly1305 (symmetric: every unlocked user)",
    ]
    # The rules are sealed: no directory name or option in the config's text.
    text = conf.read_text()
    assert "/drop" not in text and "dropbox" not in text and "hybrid" not in text
    # A rule on / replaces the default for new files; set again replaces a rule.
    assert _policy(vol, "set", "/", "--mode", "xchacha20-poly1305").returncode == 0
    assert _policy(vol, "set", "/h", "--mode", "hybrid").returncode == 0
    lines = _policy(vol, "show").stdout.splitlines()
    assert lines[0] == "/ (default): aes-256-gcm"
    assert "/: xchacha20-poly1305 (symmetric: every unlocked user)" in lines
    assert "/h: hybrid-aes-256-gcm: readable by the creator, the recovery key" in lines
    for d in ("/", "/drop", "/x", "/h/open", "/h"):
        res = _policy(vol, "unset", d)
        assert res.returncode == 0 and res.stdout == f"{d}: rule removed\n"
    assert _policy(vol, "show").stdout == "/ (default): aes-256-gcm (no rule)\n"
    assert "policy" not in json.loads(conf.read_text())


def test_policy_errors_are_clear_and_change_nothing(vol: tuple[Path, Path]) -> None:
    assert _policy(vol, "set", "/h", "--mode", "hybrid").returncode == 0
    conf = vol[0] / "cryptfs.conf"
    before = conf.read_bytes()
    cases = [
        (("set", "/h", "--mode", "hybrid", "--recipient", "cfs-nobody"), 2,
         "no user of this volume with a key pair is called cfs-nobody"),
        (("set", "/d", "--mode", "aes-256-gcm", "--dropbox"), 2,
         "--recipient and --dropbox need a hybrid mode"),
        (("set", "/d", "--mode", "xchacha20-poly1305", "--recipient", BOB), 2,
         "--recipient and --dropbox need a hybrid mode"),
        (("set", "/d", "--mode", "hybrid-rot13"), 2, "Invalid value for '--mode'"),
        (("unset", "/nope"), 2, "/nope has no rule"),
    ]
    for args, code, message in cases:
        res = _policy(vol, *args)
        assert res.returncode == code, (args, res.stderr)
        assert message in res.stderr and res.stdout == "", (args, res.stderr)
        assert conf.read_bytes() == before, args
    # A wrong passphrase: exit 3, nothing shown.
    bad = vol[0].parent / "bad.pass"
    bad.write_bytes(b"not the passphrase\n")
    res = run_cli("policy", "show", str(vol[0]), "--passphrase-file", str(bad), check=False)
    assert res.returncode == 3 and res.stdout == "" and "Traceback" not in res.stderr
    assert _policy(vol, "unset", "/h/").stdout == "/h: rule removed\n"
    res = _policy(vol, "unset", "/h")
    assert res.returncode == 2 and "/h has no rule" in res.stderr


def test_a_drop_box_nobody_could_read_is_refused(tmp_path: Path) -> None:
    backing = make_shared_volume(tmp_path / "backing")  # no recovery key
    pw = tmp_path / "root.pass"
    pw.write_bytes(ROOT_PASSPHRASE + b"\n")
    res = run_cli("policy", "set", str(backing), "/d", "--mode", "hybrid", "--dropbox",
                  "--passphrase-file", str(pw), check=False)
    assert res.returncode == 2 and "a drop box nobody could read" in res.stderr
    assert "Traceback" not in res.stderr
    shown = run_cli("policy", "show", str(backing), "--passphrase-file", str(pw)).stdout
    assert shown == "/ (default): aes-256-gcm (no rule)\n"
    res = run_cli("policy", "set", str(backing), "/h", "--mode", "hybrid", "--recipient", BOB,
                  "--passphrase-file", str(pw))
    shown = run_cli("policy", "show", str(backing), "--passphrase-file", str(pw)).stdout
    assert f"/h: hybrid-aes-256-gcm: readable by the creator, {BOB}\n" in shown


def test_policy_set_does_not_promise_a_recovery_key_the_volume_lacks(tmp_path: Path) -> None:
    backing = make_shared_volume(tmp_path / "backing")  # no recovery key
    pw = tmp_path / "root.pass"
    pw.write_bytes(ROOT_PASSPHRASE + b"\n")
    res = run_cli("policy", "set", str(backing), "/h", "--mode", "hybrid", "--recipient", BOB,
                  "--passphrase-file", str(pw))
    assert res.stdout == f"/h: hybrid-aes-256-gcm: readable by the creator, {BOB}\n"


def test_a_hand_edited_policy_is_refused(vol: tuple[Path, Path], tmp_path: Path) -> None:
    backing, pw = vol
    assert _policy(vol, "set", "/h", "--mode", "hybrid", "--recipient", BOB).returncode == 0
    conf = backing / "cryptfs.conf"
    d = json.loads(conf.read_text())
    conf.write_text(json.dumps(d))  # rewritten unchanged (other spacing): still fine
    assert BOB in _policy(vol, "show").stdout
    sealed = bytearray(base64.b64decode(d["policy"]))
    sealed[20] ^= 0x01  # one bit of the sealed rules
    d["policy"] = base64.b64encode(bytes(sealed)).decode()
    conf.write_text(json.dumps(d))
    for args in (("show",), ("set", "/x", "--mode", "aes-256-gcm"), ("unset", "/h")):
        res = _policy(vol, *args)
        assert res.returncode == 4, (args, res.stderr)
        assert "failed authentication" in res.stderr and res.stdout == ""
    m = Mount(backing, tmp_path / "mnt", tmp_path / "mnt.log", tmp_path / "mnt.pid", pw)
    (tmp_path / "mnt").mkdir()
    res = run_cli("mount", str(backing), str(m.mnt), "--passphrase-file", str(pw), check=False)
    assert res.returncode == 4 and "failed authentication" in res.stderr
    assert not os.path.ismount(m.mnt)


@pytest.mark.parametrize("where", ["../..", "/h/../..", "h/..", ".."])
def test_a_policy_path_with_dotdot_is_refused(vol: tuple[Path, Path], where: str) -> None:
    """'../..' was taken for the volume's root: `policy set` changed the rule of
    every new file of the volume, and `policy unset` removed it."""
    conf = vol[0] / "cryptfs.conf"
    before = conf.read_bytes()
    for args in (("set", where, "--mode", "hybrid"), ("unset", where)):
        res = _policy(vol, *args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"{where!r}: a path inside the volume has no '..'" in res.stderr
    assert conf.read_bytes() == before
