"""Hard links and the policy: a file is governed by the rules of every one of
its names (docs/POLICY.md, "Hard links").  cryptfs.links without a mount (a
real volume's backing tree, names encrypted with its keys), then real shared
mounts with real users performing the attacks of issue 12 (parts 1 and 5)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_audit_mount import records

from conftest import run_cli, unlock
from cryptfs import links, tree
from cryptfs.masking import Mask, parse_columns
from cryptfs.names import NameCodec
from cryptfs.policy import MaskRule, Policy, Program, Rule
from multiuser import ROOT_PASSPHRASE, Shared, bind_log, run_as, shared_tempdir

MASK = MaskRule("*.csv", "csv", (("surname", "surname"),))
OTHER_MASK = MaskRule("*.csv", "csv", (("gender", "keep"),))


class Tree:
    """A volume's backing tree built by hand: encrypted directory and file names."""

    def __init__(self, backing: Path) -> None:
        self.vol = unlock(backing)
        self.codec = NameCodec(self.vol.keys)
        self.root = self.vol.tree

    def backing_path(self, plain: str) -> str:
        d = self.root
        for part in (p for p in plain.split("/") if p):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                name, _ = self.codec.backing_name(part.encode(), tree.read_diriv(fd))
            finally:
                os.close(fd)
            d = os.path.join(d, name)
        return d

    def mkdir(self, plain: str) -> None:
        parent, name = os.path.split(plain)
        fd = os.open(self.backing_path(parent), os.O_RDONLY | os.O_DIRECTORY)
        try:
            backing, full = self.codec.backing_name(name.encode(), tree.read_diriv(fd))
            if full is not None:
                tree.write_long_name(fd, backing, full)
            tree.make_dir(fd, backing, 0o755, None)
        finally:
            os.close(fd)

    def _new_entry(self, plain: str) -> str:
        """The backing path a new plaintext name takes (its long-name file written)."""
        parent, name = os.path.split(plain)
        d = self.backing_path(parent)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            backing, full = self.codec.backing_name(name.encode(), tree.read_diriv(fd))
            if full is not None:
                tree.write_long_name(fd, backing, full)
        finally:
            os.close(fd)
        return os.path.join(d, backing)

    def create(self, plain: str) -> os.stat_result:
        path = self._new_entry(plain)
        Path(path).write_bytes(b"x")
        return os.stat(path)

    def link(self, old: str, new: str) -> os.stat_result:
        os.link(self.backing_path(old), self._new_entry(new))
        return os.stat(self.backing_path(old))

    def names(self, st: os.stat_result, policy: Policy) -> links.Names:
        return links.find_names(self.root, self.codec, os.stat(self.backing_path_of(st)), policy)

    def backing_path_of(self, st: os.stat_result) -> str:
        for d, _, files in os.walk(self.root):
            for f in files:
                p = os.path.join(d, f)
                if os.stat(p).st_ino == st.st_ino:
                    return p
        raise AssertionError("not found")


@pytest.fixture
def built(backing: Path) -> Iterator[Tree]:
    t = Tree(backing)
    try:
        for d in ("/crm", "/crm/deep", "/pub", "/pub/x", "/calls"):
            t.mkdir(d)
        yield t
    finally:
        t.vol.close()


def _policy(*rules: Rule) -> Policy:
    return Policy({r.path: r for r in rules})


CRM = Rule("/crm", "aes-256-gcm", masks=(MASK,))
CALLS = Rule("/calls", "aes-256-gcm", programs=(Program("/usr/bin/true"),))


def test_every_name_under_a_rule_is_found_and_decrypted(built: Tree) -> None:
    st = built.create("/pub/x/h-link.txt")
    built.link("/pub/x/h-link.txt", "/crm/deep/h.csv")
    built.link("/pub/x/h-link.txt", "/calls/" + "n" * 200 + ".csv")  # (a long backing name)
    names = built.names(st, _policy(CRM, CALLS))
    assert sorted(names.found) == [("/calls", "n" * 200 + ".csv"), ("/crm/deep", "h.csv")]
    assert names.unknown == 0  # (the third name was found outside every rule's directory)
    policy = _policy(CRM, CALLS)
    assert names.masks(policy) == {MASK}
    assert names.programs(policy) == [CALLS]
    # With no name under a rule there is nothing to walk with keys, and nothing governs it.
    st2 = built.create("/pub/a.csv")
    built.link("/pub/a.csv", "/pub/x/b.csv")
    names = built.names(st2, _policy(CRM, CALLS))
    assert names.found == () and names.unknown == 0


def test_a_name_that_cannot_be_placed_is_unknown(built: Tree, tmp_path: Path) -> None:
    st = built.create("/crm/h.csv")
    outside = tmp_path / "outside"
    os.link(built.backing_path("/crm/h.csv"), outside)  # (a link outside the tree)
    names = built.names(st, _policy(CRM))
    assert names.found == (("/crm", "h.csv"),) and names.unknown == 1
    # Every trusted-programs rule could govern an unknown name.
    assert names.programs(_policy(CRM, CALLS)) == [CALLS]
    # A name under a rule's directory that does not decrypt is unknown too.
    os.unlink(outside)
    crm = built.backing_path("/crm")
    os.link(built.backing_path("/crm/h.csv"), os.path.join(crm, "AAAAAAAAAAAAAAAAAAAAAAAAAA"))
    names = built.names(st, _policy(CRM))
    assert names.found == (("/crm", "h.csv"),) and names.unknown == 1


def test_a_rule_directory_that_cannot_be_reached_leaves_every_name_unknown(built: Tree) -> None:
    st = built.create("/crm/deep/h.csv")
    built.link("/crm/deep/h.csv", "/pub/h.txt")
    diriv = Path(built.backing_path("/crm"), ".diriv")
    diriv.chmod(0o644)
    diriv.write_bytes(b"short")  # (damaged: /crm/deep cannot be found from its name)
    names = built.names(st, _policy(Rule("/crm/deep", "aes-256-gcm", masks=(MASK,))))
    assert names.found == () and names.unknown == 2  # (not "one name elsewhere")


def test_what_a_set_of_names_is_governed_by() -> None:
    policy = _policy(CRM, Rule("/crm2", "aes-256-gcm", masks=(OTHER_MASK,)),
                     Rule("/crm/open", "aes-256-gcm", masks=()))
    names = links.Names((("/crm", "a.csv"), ("/crm2", "a.csv"), ("/crm/open", "a.csv")))
    assert names.masks(policy) == {MASK, OTHER_MASK}  # (two different masks: refused)
    assert names.without("/crm2", "a.csv").masks(policy) == {MASK}
    assert links.restricting_dirs(_policy(CRM, Rule("/crm/x", "aes-256-gcm", masks=(MASK,)),
                                          CALLS)) == ["/calls", "/crm"]
    assert links.restricting_dirs(_policy(Rule("/", "aes-256-gcm", programs=(Program("/a"),)),
                                          CRM)) == ["/"]
    # A rename moves one name: out of a rule's reach, into it, or within it.
    one = links.Names((("/crm", "a.csv"),), unknown=1)
    assert one.renamed("/crm", "a.csv", "/pub", "b.txt", policy) == links.Names((), 1)
    back = links.Names((), 1).renamed("/pub", "b.txt", "/crm/sub", "c.csv", policy)
    assert back == links.Names((("/crm/sub", "c.csv"),), 1)
    assert back.masks(policy) == {MASK}


def test_straddling_files_are_found_for_policy_set(built: Tree) -> None:
    built.create("/crm/h.csv")
    built.link("/crm/h.csv", "/pub/h-link.txt")
    built.create("/crm/both.csv")
    built.link("/crm/both.csv", "/crm/deep/both.csv")  # (every name inside: not straddling)
    built.create("/pub/only.txt")
    built.link("/pub/only.txt", "/pub/x/only.txt")  # (every name outside)
    found = links.straddling(built.root, built.codec, "/crm")
    assert found == [links.Straddler(("/crm/h.csv", "/pub/h-link.txt"), 0)]
    assert links.straddling(built.root, built.codec, "/pub/x") == [
        links.Straddler(("/pub/only.txt", "/pub/x/only.txt"), 0)]


def test_the_cache_holds_while_nothing_changed(built: Tree) -> None:
    st = built.create("/crm/h.csv")
    st = built.link("/crm/h.csv", "/pub/h.txt")
    cache, policy, names = links.NamesCache(), _policy(CRM), links.Names((("/crm", "h.csv"),))
    cache.put(st, policy, 1, names)
    assert cache.get(st, policy, 1) is names
    assert cache.get(st, policy, 2) is None  # (the mount renamed, linked or removed something)
    assert cache.get(st, _policy(CRM), 1) is None  # (another policy)
    built.link("/crm/h.csv", "/pub/x/h3.txt")
    assert cache.get(os.stat(built.backing_path("/crm/h.csv")), policy, 1) is None  # (ctime, nlink)


# -- on a real shared mount ----------------------------------------------------------------------

CUSTOMERS = ("surname,gender,phone\n"
             "王小明,女,13812341234\n"
             "John Smith,M,+86 138 1234 1234\n").encode()
COLUMNS = ("surname=surname", "gender=keep")
MASKED = Mask("csv", parse_columns(list(COLUMNS))).view(CUSTOMERS, b"")


def _rootpf(shared: Shared) -> Path:
    pf = shared.root / "root.pass"
    pf.write_bytes(ROOT_PASSPHRASE + b"\n")
    return pf


def _mask_crm(shared: Shared, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli("policy", "set", str(shared.backing), "/crm", "--mode", "aes-256-gcm",
                   "--mask", "*.csv", *(x for c in COLUMNS for x in ("--column", c)),
                   "--passphrase-file", str(_rootpf(shared)), check=check)


def _dirs(shared: Shared, *names: str) -> None:
    for d in names:
        shared.path(d).mkdir()
        os.chmod(shared.path(d), 0o777)


def test_a_hard_link_does_not_lift_the_mask(shared: Shared) -> None:
    """Issue 12, part 1, as reported: a supervisor links a masked customer
    file into a public directory; an agent locks, stats both names (so the
    mount forgets the inode), unlocks, reads the public name first, then the
    masked one.  Both are masked, and the log says so for the /crm name."""
    logdir = bind_log(shared)
    for who in ("root", "cfs-alice", "cfs-carol"):
        assert shared.unlock(who).returncode == 0
    _dirs(shared, "crm", "pub")
    shared.path("crm", "h.csv").write_bytes(CUSTOMERS)
    os.chmod(shared.path("crm", "h.csv"), 0o666)
    _mask_crm(shared)
    crm, pub = str(shared.path("crm", "h.csv")), str(shared.path("pub", "h-link.txt"))
    res = run_as("cfs-carol", "ln", crm, pub)
    assert res.returncode == 0, res.stderr  # (a link takes nothing out of the mask)
    assert shared.lock("cfs-alice").returncode == 0
    for p in (crm, pub):
        assert run_as("cfs-alice", "stat", p).returncode != 0  # (refused: locked)
    assert shared.unlock("cfs-alice").returncode == 0
    for p in (pub, crm):
        got = run_as("cfs-alice", "cat", p)
        assert got.stdout == MASKED and b"13812341234" not in got.stdout, (p, got)
    assert run_as("cfs-carol", "cat", pub).stdout == CUSTOMERS  # (a supervisor still reads it)
    # The supervisor may not take it out of the mask by removing the masked name
    # (ln + rm is a move), nor by renaming another file over it.
    res = run_as("cfs-carol", "rm", crm)
    assert res.returncode != 0 and b"Permission denied" in res.stderr
    shared.path("pub", "other.csv").write_bytes(b"x\n")
    os.chmod(shared.path("pub", "other.csv"), 0o666)
    res = run_as("cfs-carol", "mv", "-f", str(shared.path("pub", "other.csv")), crm)
    assert res.returncode != 0 and b"Permission denied" in res.stderr
    assert run_as("cfs-alice", "cat", pub).stdout == MASKED
    # Removing the name outside the mask is fine (the file stays masked).
    assert run_as("cfs-carol", "rm", pub).returncode == 0
    assert run_as("cfs-alice", "cat", crm).stdout == MASKED
    # A link into the mask works, even for an agent, and masks the file under both names.
    shared.path("pub", "new.csv").write_bytes(CUSTOMERS)
    os.chmod(shared.path("pub", "new.csv"), 0o666)
    res = run_as("cfs-alice", "ln", str(shared.path("pub", "new.csv")),
                 str(shared.path("crm", "new.csv")))
    assert res.returncode == 0, res.stderr
    assert run_as("cfs-alice", "cat", str(shared.path("pub", "new.csv"))).stdout == MASKED
    shared.mount.stop()
    alice = [(r["path"], r["outcome"], r.get("decision")) for r in records(logdir)
             if r["user"] == "cfs-alice" and r["event"] == "open"]
    assert ("/pub/h-link.txt", "allowed", "masked view (csv, *.csv)") in alice
    assert ("/crm/h.csv", "allowed", "masked view (csv, *.csv)") in alice
    assert all(d == "masked view (csv, *.csv)" for _, _, d in alice)
    carol = [(r["event"], r["outcome"], r.get("decision")) for r in records(logdir)
             if r["user"] == "cfs-carol" and r["event"] in ("unlink", "rename")]
    refused = ("masked file: not {} while it has hard links outside its mask "
               "(that would move it out)")
    assert carol == [("unlink", "denied", refused.format("removed")),
                     ("rename", "denied", refused.format("replaced")),
                     ("unlink", "allowed", None)]


def test_a_link_made_before_the_rule_is_reported_and_masked(shared: Shared) -> None:
    for who in ("root", "cfs-alice"):
        assert shared.unlock(who).returncode == 0
    _dirs(shared, "crm", "pub")
    shared.path("crm", "h.csv").write_bytes(CUSTOMERS)
    os.chmod(shared.path("crm", "h.csv"), 0o666)
    os.link(shared.path("crm", "h.csv"), shared.path("pub", "h-link.txt"))
    assert run_as("cfs-alice", "cat", str(shared.path("pub", "h-link.txt"))).stdout == CUSTOMERS
    res = _mask_crm(shared)
    assert res.returncode == 0
    assert "1 file(s) with hard links both inside and outside /crm" in res.stderr
    assert "/crm/h.csv = /pub/h-link.txt" in res.stderr
    assert "Traceback" not in res.stderr
    # (the mount forgets the inode, then opens it through the public name first)
    assert shared.lock("cfs-alice").returncode == 0
    for p in ("pub/h-link.txt", "crm/h.csv"):
        assert run_as("cfs-alice", "stat", str(shared.path(*p.split("/")))).returncode != 0
    assert shared.unlock("cfs-alice").returncode == 0
    for p in ("pub/h-link.txt", "crm/h.csv"):
        got = run_as("cfs-alice", "cat", str(shared.path(*p.split("/"))))
        assert got.stdout == MASKED, p
    # A rule that restricts nothing reports nothing.
    res = run_cli("policy", "set", str(shared.backing), "/pub", "--mode", "aes-256-gcm",
                  "--passphrase-file", str(_rootpf(shared)))
    assert "warning" not in res.stderr


def test_two_different_masks_refuse_the_view(shared: Shared) -> None:
    for who in ("root", "cfs-alice"):
        assert shared.unlock(who).returncode == 0
    _dirs(shared, "crm", "crm2")
    shared.path("crm", "h.csv").write_bytes(CUSTOMERS)
    os.chmod(shared.path("crm", "h.csv"), 0o666)
    os.link(shared.path("crm", "h.csv"), shared.path("crm2", "h.csv"))
    _mask_crm(shared)
    run_cli("policy", "set", str(shared.backing), "/crm2", "--mode", "aes-256-gcm", "--mask",
            "*.csv", "--column", "phone=keep", "--passphrase-file", str(_rootpf(shared)))
    for p in ("crm/h.csv", "crm2/h.csv"):
        got = run_as("cfs-alice", "cat", str(shared.path(*p.split("/"))))
        assert got.returncode != 0 and b"Permission denied" in got.stderr and not got.stdout


@pytest.mark.parametrize("who", ["cfs-tech", "cfs-admin", "cfs-carol", "root"])
def test_nobody_moves_a_file_out_of_its_mask(shared: Shared, who: str) -> None:
    """Issue 12, part 5: a technician (or anyone) ran `mv /crm/customers.csv
    /pub/moved.csv` and every agent then read it in clear.  Declassifying is
    a policy change, never a move; moving into a mask, or within it, works."""
    from test_roles import _add

    logdir = bind_log(shared)
    assert shared.unlock("root").returncode == 0
    if who in ("cfs-tech", "cfs-admin"):
        pf = _add(shared, who, {"cfs-tech": "technician", "cfs-admin": "admin"}[who])
        assert shared.unlock(who, pf).returncode == 0
    elif who != "root":
        assert shared.unlock(who).returncode == 0
    assert shared.unlock("cfs-alice").returncode == 0
    _dirs(shared, "crm", "crm/sub", "pub")
    for name in ("customers.csv", "sub/c.csv"):
        shared.path("crm", *name.split("/")).write_bytes(CUSTOMERS)
        os.chmod(shared.path("crm", *name.split("/")), 0o666)
    shared.path("pub", "in.csv").write_bytes(CUSTOMERS)
    os.chmod(shared.path("pub", "in.csv"), 0o666)
    _mask_crm(shared)
    src = str(shared.path("crm", "customers.csv"))

    def mv(a: str, b: str) -> int:
        if who == "root":
            try:
                os.rename(a, b)
                return 0
            except PermissionError:
                return 13
        res = run_as(who, "mv", a, b)
        assert res.returncode == 0 or b"Permission denied" in res.stderr, res.stderr
        return res.returncode

    assert mv(src, str(shared.path("pub", "moved.csv"))) != 0
    assert mv(src, str(shared.path("crm", "customers.txt"))) != 0  # (a name the glob misses)
    assert mv(str(shared.path("crm", "sub")), str(shared.path("pub", "sub"))) != 0
    assert not os.path.lexists(shared.path("pub", "moved.csv"))
    assert run_as("cfs-alice", "cat", src).stdout == MASKED
    # Into the mask, and within it: allowed.
    assert mv(str(shared.path("pub", "in.csv")), str(shared.path("crm", "in.csv"))) == 0
    assert mv(src, str(shared.path("crm", "renamed.csv"))) == 0
    assert run_as("cfs-alice", "cat", str(shared.path("crm", "in.csv"))).stdout == MASKED
    shared.mount.stop()
    refused = [r for r in records(logdir) if r["event"] == "rename" and r["outcome"] == "denied"]
    assert len(refused) == 3 and all(r.get("decision") == "masked file: not moved out of its mask"
                                     for r in refused)


# -- trusted programs ------------------------------------------------------------------------------

SECRET = b"surname,phone\nWang,13812341234\n"


@pytest.fixture
def bins() -> Iterator[Path]:
    """A trusted and an untrusted copy of cat, mv, rm, truncate and python3, that every
    user may run."""
    d = shared_tempdir("cryptfs-bins-")
    try:
        for who in ("trusted", "untrusted"):
            (d / who).mkdir(mode=0o755)
            for prog in ("cat", "mv", "rm", "truncate", "python3"):
                shutil.copy(f"/usr/bin/{prog}", d / who / prog)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _programs(shared: Shared, bins: Path, directory: str = "/calls") -> None:
    run_cli("policy", "set", str(shared.backing), directory, "--mode", "aes-256-gcm",
            *(x for p in ("cat", "mv", "rm", "truncate") for x in
              ("--program", str(bins / "trusted" / p))),
            "--passphrase-file", str(_rootpf(shared)))


def test_a_hard_link_does_not_lift_a_programs_rule(shared: Shared, bins: Path) -> None:
    logdir = bind_log(shared)
    for who in ("root", "cfs-carol"):
        assert shared.unlock(who).returncode == 0
    _dirs(shared, "calls", "pub")
    shared.path("calls", "a.csv").write_bytes(SECRET)
    os.chmod(shared.path("calls", "a.csv"), 0o666)
    os.link(shared.path("calls", "a.csv"), shared.path("pub", "a-link.txt"))  # (before the rule)
    _programs(shared, bins)
    calls, pub = str(shared.path("calls", "a.csv")), str(shared.path("pub", "a-link.txt"))
    assert shared.lock("cfs-carol").returncode == 0
    for p in (calls, pub):
        run_as("cfs-carol", "stat", p)
    assert shared.unlock("cfs-carol").returncode == 0
    for p in (pub, calls):
        got = run_as("cfs-carol", str(bins / "untrusted" / "cat"), p)
        assert got.returncode != 0 and b"Permission denied" in got.stderr and not got.stdout, p
    assert run_as("cfs-carol", str(bins / "trusted" / "cat"), pub).stdout == SECRET
    shared.mount.stop()
    opens = [(r["path"], r["outcome"], r.get("decision"), r.get("rule")) for r in records(logdir)
             if r["user"] == "cfs-carol" and r["event"] == "open"]
    assert opens == [("/pub/a-link.txt", "denied", "not a trusted program here", "/calls"),
                     ("/calls/a.csv", "denied", "not a trusted program here", "/calls"),
                     ("/pub/a-link.txt", "allowed", "trusted program (by path)", "/calls")]


def test_untrusted_programs_neither_truncate_remove_nor_rename(shared: Shared, bins: Path) -> None:
    """Smaller things of issue 12: under a --program rule, a program the rule
    does not trust may not truncate, unlink or rename a file, nor rename
    another file over it; a trusted one may."""
    logdir = bind_log(shared)
    for who in ("root", "cfs-carol"):
        assert shared.unlock(who).returncode == 0
    _dirs(shared, "calls", "pub")
    for n in ("calls/a.csv", "calls/b.csv", "pub/p.csv"):
        shared.path(*n.split("/")).write_bytes(SECRET)
        os.chmod(shared.path(*n.split("/")), 0o666)
    _programs(shared, bins)
    a, b = str(shared.path("calls", "a.csv")), str(shared.path("calls", "b.csv"))
    u, t = bins / "untrusted", bins / "trusted"
    for cmd in ([str(u / "truncate"), "-s", "0", a],  # (an open for writing)
                [str(u / "python3"), "-c", f"import os; os.truncate({a!r}, 0)"],  # (a setattr)
                [str(u / "rm"), a],
                [str(u / "mv"), a, str(shared.path("calls", "c.csv"))],
                [str(u / "mv"), "-f", b, a],
                [str(u / "mv"), "-f", str(shared.path("pub", "p.csv")), a]):
        res = run_as("cfs-carol", *cmd)
        assert res.returncode != 0 and b"Permission denied" in res.stderr, (cmd, res.stderr)
    res = run_as("cfs-carol", "sh", "-c", f": > {a}")  # (O_TRUNC, by sh)
    assert res.returncode != 0
    for n in ("a.csv", "b.csv"):
        assert run_as("cfs-carol", str(t / "cat"), str(shared.path("calls", n))).stdout == SECRET
    # The trusted programs may.
    assert run_as("cfs-carol", str(t / "truncate"), "-s", "5", a).returncode == 0
    assert run_as("cfs-carol", str(t / "cat"), a).stdout == SECRET[:5]
    assert run_as("cfs-carol", str(t / "mv"), a, str(shared.path("calls", "c.csv"))).returncode == 0
    assert run_as("cfs-carol", str(t / "rm"), str(shared.path("calls", "c.csv"))).returncode == 0
    assert sorted(os.listdir(shared.path("calls"))) == ["b.csv"]
    assert shared.path("pub", "p.csv").exists()
    shared.mount.stop()
    denied = [(r["event"], r.get("decision")) for r in records(logdir)
              if r["user"] == "cfs-carol" and r["outcome"] == "denied"]
    assert ("truncate", "not truncated by a program its trusted-programs rule does not trust") \
        in denied, denied
    assert ("unlink", "not removed by a program its trusted-programs rule does not trust") \
        in denied
    assert ("rename", "not renamed by a program its trusted-programs rule does not trust") \
        in denied
    assert ("rename", "not replaced by a program its trusted-programs rule does not trust") \
        in denied


def test_create_right_after_policy_set_uses_the_new_rule(shared: Shared, bins: Path) -> None:
    """Smaller things of issue 12: a create right after `policy set --program`
    used the old rule until another request refreshed the config."""
    for who in ("root", "cfs-carol"):
        assert shared.unlock(who).returncode == 0
    _dirs(shared, "calls")
    shared.path("calls", "warm.txt").write_bytes(b"x")  # (the mount has read the config)
    _programs(shared, bins)
    new = str(shared.path("calls", "new.csv"))
    res = run_as("cfs-carol", "sh", "-c", f"echo secret > {new}")
    assert res.returncode != 0 and b"Permission denied" in res.stderr
    assert not os.path.lexists(new)


def test_renaming_a_hard_linked_file_again_and_again_walks_the_tree_once(
        tmp_path: Path, backing: Path, passfile: Path) -> None:
    """Every rename made the mount look for all the names of a hard-linked file
    again, by walking the tree (7 ms a rename with 20,000 files, growing with
    the tree): a user renaming one in a loop held the mount for everyone. A
    file's own rename now updates the names the mount knows for it; only a
    directory moved from, into or over a restricting rule's directory makes it
    look again. The rules still hold under every name (the tests above)."""
    from conftest import new_mount

    m = new_mount(tmp_path, backing, passfile)
    m.start()
    try:
        for d in ("crm", "pub", "pub/deep"):
            os.mkdir(m.path(d))
        for i in range(200):
            m.path("pub", "deep", f"f{i}").write_bytes(b"")
        m.path("crm", "h.csv").write_bytes(CUSTOMERS)
        os.link(m.path("crm", "h.csv"), m.path("pub", "deep", "x.txt"))
        run_cli("policy", "set", str(backing), "/crm", "--mode", "aes-256-gcm", "--mask", "*.csv",
                *(x for c in COLUMNS for x in ("--column", c)), "--passphrase-file", str(passfile))
        for _ in range(20):
            os.rename(m.path("pub", "deep", "x.txt"), m.path("pub", "deep", "y.txt"))
            os.rename(m.path("pub", "deep", "y.txt"), m.path("pub", "deep", "x.txt"))
        os.rename(m.path("crm", "h.csv"), m.path("crm", "h2.csv"))  # (within the mask)
        os.rename(m.path("pub", "deep"), m.path("pub", "deeper"))  # (no rule's directory)
        os.rename(m.path("pub", "deeper", "x.txt"), m.path("pub", "deeper", "z.txt"))
        # A name may not leave the mask while the file keeps another (it would
        # take the file out of it): still refused after all those renames.
        with pytest.raises(PermissionError):
            os.unlink(m.path("crm", "h2.csv"))
        assert m.path("pub", "deeper", "z.txt").read_bytes() == CUSTOMERS
    finally:
        m.stop()
    walks = [ln for ln in m.log.read_text().splitlines() if "tree walks for the names" in ln]
    assert walks and int(walks[-1].rsplit(" ", 1)[1]) <= 2, walks


@pytest.mark.parametrize("crm_exists", [False, True], ids=["rule-dir-missing", "rule-dir-empty"])
def test_a_directory_moved_onto_a_rule_directory_brings_its_links_under_the_mask(
        shared: Shared, crm_exists: bool) -> None:
    """A review of the names cache found it: a directory staged outside a mask
    and moved onto the mask's directory (a rule may be set before its
    directory exists) left the cached names of a hard-linked file in it as
    they were, and an agent read the file in clear under both names. Every
    directory move drops the cached names now."""
    for who in ("root", "cfs-alice", "cfs-carol"):
        assert shared.unlock(who).returncode == 0
    _dirs(shared, "pub", "pub/x", *(["crm"] if crm_exists else []))
    shared.path("pub", "x", "h.csv").write_bytes(CUSTOMERS)
    os.chmod(shared.path("pub", "x", "h.csv"), 0o666)
    os.link(shared.path("pub", "x", "h.csv"), shared.path("pub", "h.txt"))
    _mask_crm(shared)
    pub = str(shared.path("pub", "h.txt"))
    assert run_as("cfs-alice", "cat", pub).stdout == CUSTOMERS  # (no name under /crm yet)
    os.rename(shared.path("pub", "x"), shared.path("crm"))  # (the admin puts it in place)
    for p in (str(shared.path("crm", "h.csv")), pub):
        got = run_as("cfs-alice", "cat", p)
        assert got.stdout == MASKED and b"13812341234" not in got.stdout, (p, got)
