"""What docs/FORMAT.md promises a reader checks, checked by cryptfs on real mounts and real users.

The independent decryptor (tests/test_format_spec.py) and cryptfs's own info/fsck/mount are run
on the same tampered sample volumes there; here the same breaks are made to a shared ``--agent``
mount that unprivileged users work in, and the points FORMAT.md now states exactly (passphrase
bytes from a file, the recovery key file, extended attribute limits and where the root's live,
the one spelling of base64 names, which release writes what) are held to it.
"""

from __future__ import annotations

import base64
import configparser
import errno
import hashlib
import hmac
import json
import os
import re
import struct
import time
from pathlib import Path

import pytest

import cryptfs
from conftest import PASSPHRASE, Mount, make_volume, run_cli
from cryptfs.config import FORMAT_VERSION, canonical
from cryptfs.content import read_header_bytes
from cryptfs.errors import UsageError
from cryptfs.header import FileHeader
from cryptfs.names import XATTR_NAME_MAX_PLAIN, XATTR_VALUE_MAX_PLAIN, b64u, unb64u
from cryptfs.recovery import read_key_file
from cryptfs.secret import Secret
from cryptfs.volume import open_volume
from multiuser import ROOT_PASSPHRASE, Shared, backing_of, run_as

REPO = Path(__file__).parent.parent
SECRET_ROWS = b"id,surname,phone\n1001,Wang,13812345678\n" * 50


# -- a header whose MAC is right but whose stanzas after the opening one are not ------------

def _add_stanza_after_the_opener(backing: Path, c_path: Path, stanza: bytes) -> None:
    """What a holder of the volume key can do: append a stanza to a file's header and make
    the header MAC again with the file key (blocks are bound to the file id and their index,
    not to their offset, so they stay valid)."""
    vol = open_volume(str(backing), Secret(ROOT_PASSPHRASE))
    try:
        fd = os.open(c_path, os.O_RDONLY)
        try:
            raw = os.pread(fd, os.fstat(fd).st_size, 0)
            hdr = FileHeader.decode(read_header_bytes(fd), vol.keyring())
        finally:
            os.close(fd)
    finally:
        vol.close()
    h = hdr.length
    body = bytearray(raw[:h - 32]) + stanza
    struct.pack_into(">H", body, 10, len(body) + 32)
    body[28] += 1
    mac = hmac.new(hdr.keys()[1], bytes(body), hashlib.sha256).digest()
    c_path.write_bytes(bytes(body) + mac + raw[h:])


@pytest.mark.mount
@pytest.mark.parametrize("stanza", [b"\x07\x00\x02hi", b"\x01\x00\x00", b"\x00\x00\x00" + b"\x09\x00\x00"],
                         ids=["unknown-type", "symmetric-of-0-bytes", "padding-then-unknown"])
def test_an_agent_gets_eio_for_a_stanza_after_the_one_that_opens(shared: Shared, stanza: bytes) -> None:
    """An insider who holds the volume key appends a stanza to a header and re-MACs it: the
    header breaks FORMAT.md's stanza rules after the stanza that opens.  An agent reading it
    on the shared mount gets EIO, never the plaintext; the mount logs it; fsck reports it."""
    for who in ("root", "cfs-alice"):
        assert shared.unlock(who).returncode == 0
    shared.path("calls").mkdir()
    os.chmod(shared.path("calls"), 0o777)
    target = shared.path("calls", "customers.csv")
    res = run_as("cfs-alice", "python3", "-c",
                 f"open({str(target)!r}, 'wb').write({SECRET_ROWS!r})")
    assert res.returncode == 0, res.stderr
    assert run_as("cfs-alice", "cat", str(target)).stdout == SECRET_ROWS
    shared.mount.stop()  # (nothing cached: the next read opens the header again)
    c_path = backing_of(shared.backing, ROOT_PASSPHRASE, "calls/customers.csv")
    _add_stanza_after_the_opener(shared.backing, c_path, stanza)
    shared.mount.start()
    for who in ("root", "cfs-alice"):
        assert shared.unlock(who).returncode == 0
    res = run_as("cfs-alice", "cat", str(target))
    assert res.returncode != 0 and b"Input/output error" in res.stderr
    assert b"Wang" not in res.stdout and res.stdout == b""
    shared.mount.wait_log("integrity failure")
    assert "Wang" not in shared.mount.log_text()
    shared.mount.stop()
    pf = shared.root / "root-fsck.pass"
    pf.write_bytes(ROOT_PASSPHRASE + b"\n")
    res = run_cli("fsck", str(shared.backing), "--passphrase-file", str(pf), check=False)
    assert res.returncode == 6 and "/calls/customers.csv: header" in res.stdout, res.stdout + res.stderr
    shared.mount.start()  # (the fixture stops it)


# -- a config field added after sealing ---------------------------------------------------

def _reseal_with(backing: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Edit the config and make its MAC again with the master key (an insider who holds it)."""
    vol = open_volume(str(backing), Secret(ROOT_PASSPHRASE))
    try:
        key = vol.keys.config_mac_key
    finally:
        vol.close()
    p = backing / "cryptfs.conf"
    conf = json.loads(p.read_bytes())
    edit(conf)
    conf.pop("mac")
    conf["mac"] = base64.b64encode(hmac.new(key, canonical(conf), "sha256").digest()).decode()
    p.write_text(json.dumps(conf, indent=1))


@pytest.mark.mount
@pytest.mark.parametrize("where", ["top", "slot", "slot-kdf", "kdf"])
def test_a_field_added_to_the_config_of_a_shared_mount_is_refused(shared: Shared, where: str) -> None:
    """A field added to the config (MAC made again) is refused: an agent's unlock through the
    key agent fails naming it, `cryptfs info` refuses it too, and the sessions already open
    end (the agent fails closed rather than serve a config it does not understand)."""
    for who in ("root", "cfs-alice"):
        assert shared.unlock(who).returncode == 0
    shared.path("notes.txt").write_bytes(b"before")
    shared.lock("cfs-alice")

    def edit(conf: dict) -> None:  # type: ignore[type-arg]
        obj = {"top": conf, "slot": conf["slots"][1], "slot-kdf": conf["slots"][1]["kdf"],
               "kdf": conf["kdf"]}[where]
        obj["expires"] = "2099-01-01"

    _reseal_with(shared.backing, edit)
    field = {"top": "expires", "slot": "slots[1].expires", "slot-kdf": "slots[1].kdf.expires",
             "kdf": "kdf.expires"}[where]
    message = f"unknown field {field}: not written by this release; refused"
    res = shared.unlock("cfs-alice")
    assert res.returncode != 0 and message in res.stdout + res.stderr, res.stdout + res.stderr
    res = run_cli("info", str(shared.backing), check=False)  # (the backing is root's)
    assert res.returncode == 4 and message in res.stderr and "Traceback" not in res.stderr
    # The key agent, which watches the config, fails closed: the volume can no longer be read
    # as this release reads it, so every session ends (root's too), and it says why.
    said = f"(the volume can no longer be read: volume config: {message})"
    deadline = time.monotonic() + 10
    while said not in shared.agent.log_text():
        assert time.monotonic() < deadline, shared.agent.log_text()
        time.sleep(0.05)
    shared.mount.wait_log("nobody is unlocked any more: volume keys wiped")
    with pytest.raises(PermissionError):
        shared.path("notes.txt").read_bytes()


# -- which release writes what ---------------------------------------------------------------

def test_one_release_number_everywhere_and_in_the_format_table() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["metadata"]["version"] == "attr: cryptfs.__version__"
    out = run_cli("--version").stdout
    assert out.strip() == f"cryptfs, version {cryptfs.__version__}"
    doc = (REPO / "docs" / "FORMAT.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\d+\.\d+\.\d+) \| ([^|]+) \|", doc, re.M)}
    assert cryptfs.__version__ in rows, f"FORMAT.md's release table has no row for {cryptfs.__version__}"
    assert rows[cryptfs.__version__].strip().startswith(str(FORMAT_VERSION))
    assert "0.4" not in re.sub(r"0\.4\d", "", doc)  # (the version the page used to name)
    assert not (REPO / "packaging" / "man" / "cryptfs.1").read_text().count("cryptfs 0.1.0")


# -- passphrase bytes from a file --------------------------------------------------------------

def test_passphrase_file_bytes_are_the_first_line_without_lf_and_one_cr(tmp_path: Path) -> None:
    backing = make_volume(tmp_path / "vol")
    pf = tmp_path / "pass"

    def opens(content: bytes) -> int:
        pf.write_bytes(content)
        return run_cli("fsck", str(backing), "--passphrase-file", str(pf), check=False).returncode

    for good in (PASSPHRASE + b"\n", PASSPHRASE + b"\r\n", PASSPHRASE, PASSPHRASE + b"\nsecond line\n"):
        assert opens(good) == 0, good
    for bad in (PASSPHRASE + b" \n", b" " + PASSPHRASE + b"\n", PASSPHRASE + b"\r\r\n",
                PASSPHRASE + b"\t\n", b"\xef\xbb\xbf" + PASSPHRASE + b"\n"):
        assert opens(bad) == 3, bad  # wrong passphrase: the bytes are taken as they are
    res = run_cli("fsck", str(backing), "--passphrase-file", "-", check=False,
                  input=PASSPHRASE + b"\r\n")
    assert res.returncode == 0, res.stderr


# -- the recovery key file ---------------------------------------------------------------------

def test_recovery_key_file_is_read_exactly_as_format_md_says(tmp_path: Path) -> None:
    vid, r, a = "0123456789abcdef" * 2, bytes(range(32)), bytes(range(32, 64))
    std = base64.b64encode

    def read(text: str) -> bytes:
        p = tmp_path / "key"
        p.write_bytes(text.encode("latin-1"))
        return read_key_file(str(p))[1].reveal()

    line = f"CRYPTFS-RECOVERY-KEY-2:{vid}:{std(r).decode()}:{std(a).decode()}"
    assert read(f"# comment\n\n{line}\n") == r + a
    assert read(f"# comment\r\n  {line}\t\r\n\r\n") == r + a
    assert read(f"CRYPTFS-RECOVERY-KEY-1:{vid}:{std(r).decode()}") == r
    r_url = bytes([0xfb, 0xff] * 16)  # its standard spelling has + and /
    assert "+" in std(r_url).decode() and "/" in std(r_url).decode()
    assert read(f"CRYPTFS-RECOVERY-KEY-1:{vid}:{std(r_url).decode()}") == r_url
    bad = [
        f"CRYPTFS-RECOVERY-KEY-1:{vid}:{base64.urlsafe_b64encode(r_url).decode()}",  # URL-safe
        f"CRYPTFS-RECOVERY-KEY-1:{vid}:{std(r).decode().rstrip('=')}",              # no padding
        f"CRYPTFS-RECOVERY-KEY-1:{vid}:{std(r).decode()[:42]}B=",                    # stray bits
        f"CRYPTFS-RECOVERY-KEY-1:{vid.upper()}:{std(r).decode()}",                   # upper hex
        f"CRYPTFS-RECOVERY-KEY-1:{vid}:{std(r).decode()[:20]} {std(r).decode()[20:]}",  # a space
        f"{line}\n{line}",                                                            # two keys
        f"{line}\nsomething else",                                                    # junk line
        f"# é\n{line}",                                                               # not ASCII
    ]
    for text in bad:
        with pytest.raises(UsageError, match="is not a cryptfs recovery key file"):
            read(text)


# -- extended attributes: the limits, and where the root's live --------------------------------

@pytest.mark.mount
def test_xattr_limits_and_the_roots_attributes(mount: Mount) -> None:
    f = mount.path("f")
    f.write_bytes(b"x")
    longest = b"user." + b"n" * (XATTR_NAME_MAX_PLAIN - 5)
    os.setxattr(f, longest, b"v")
    assert os.getxattr(f, longest) == b"v"
    with pytest.raises(OSError) as e:
        os.setxattr(f, longest + b"n", b"v")
    assert e.value.errno == errno.ERANGE
    with pytest.raises(OSError) as e:
        os.setxattr(f, b"user.big", bytes(XATTR_VALUE_MAX_PLAIN + 1))
    assert e.value.errno == errno.E2BIG
    assert (XATTR_NAME_MAX_PLAIN, XATTR_VALUE_MAX_PLAIN) == (165, 65508)  # as FORMAT.md says
    # the root's attributes are on BACKING/tree itself, sealed like any other
    os.setxattr(mount.mnt, b"user.project", b"campaign 7")
    stored = [n for n in os.listxattr(mount.backing / "tree") if n.startswith("user.cryptfs.")]
    assert len(stored) == 1
    assert b"campaign 7" not in os.getxattr(mount.backing / "tree", stored[0])
    assert os.getxattr(mount.mnt, b"user.project") == b"campaign 7"


# -- one spelling of base64 for names --------------------------------------------------------

def test_a_name_in_another_base64_spelling_does_not_decrypt() -> None:
    raw = bytes(range(17))  # 17 bytes: the last character carries 2 bits that must be zero
    name = b64u(raw)
    assert unb64u(name) == raw
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sloppy = name[:-1] + alphabet[alphabet.index(name[-1]) + 1]  # stray low bits
    for bad in (sloppy, name + "=", name[:3] + "+" + name[3:], name[:3] + "." + name[3:]):
        with pytest.raises(Exception, match="bad base64"):
            unb64u(bad)


@pytest.mark.mount
def test_an_alias_backing_name_is_hidden_and_reported(mount: Mount, passfile: Path) -> None:
    """A second backing entry whose name is another spelling of a real one would list the same
    plaintext name twice: it does not decrypt, so it is hidden and fsck names it."""
    mount.path("report.txt").write_bytes(b"quarterly")
    (c_name,) = [n for n in os.listdir(mount.backing / "tree") if not n.startswith(".")]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(c_name) % 4 != 0  # the last character has unused bits
    alias = c_name[:-1] + alphabet[alphabet.index(c_name[-1]) + 1]
    assert base64.urlsafe_b64decode(alias + "=" * (-len(alias) % 4)) == \
        base64.urlsafe_b64decode(c_name + "=" * (-len(c_name) % 4))
    os.link(mount.backing / "tree" / c_name, mount.backing / "tree" / alias)
    assert sorted(os.listdir(mount.mnt)) == ["report.txt"]
    mount.stop()
    res = run_cli("fsck", str(mount.backing), "--passphrase-file", str(passfile), check=False)
    assert res.returncode == 6 and f"tree/{alias}: name does not decrypt" in res.stdout, res.stdout
    mount.start()
