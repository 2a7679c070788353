"""Back-to-back key rotations on a shared --agent mount (issue 12, "smaller things").

Two users keep reading and writing through the mount while an admin runs
several mounted rotations of different kinds, each started right after the
previous one (well inside the agent's 2 s config watch, so the agent and
the mount see a config that is more than one generation ahead of the key
they hold, or two rotations at once).  Every session must survive, every
byte read must be right, fsck must be clean afterwards, and a config put
back from before the rotations must still not be followed.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import run_cli
from cryptfs import rotate as rot
from cryptfs.config import VolumeConfig, load_config
from cryptfs.errors import UsageError
from cryptfs.keys import VolumeKeys
from cryptfs.secret import Secret
from cryptfs.volume import Volume, open_volume
from multiuser import (
    ROOT_PASSPHRASE,
    USERS,
    Shared,
    cli_as,
    make_shared_volume,
    run_as,
    shared_scenario,
)

ALICE, BOB = "cfs-alice", "cfs-bob"
WORKERS = (ALICE, BOB)

# As each user: write a small file of its own, read it back, read a fixed
# file written before; one line per failure ("ERR <errno>" / "BAD <name>"),
# then "DONE <rounds>" when the stop file appears.
WORKER = r"""
import os, sys, time
d, tag, stop = sys.argv[1], sys.argv[2], sys.argv[3]
ref_path = os.path.join(d, tag + "-ref")
with open(ref_path, "rb") as f:
    ref = f.read()
n = 0
while not os.path.exists(stop):
    n += 1
    body = (f"{tag} round {n} ".encode()) * (1 + n % 700)
    p = os.path.join(d, f"{tag}-{n % 7}")
    try:
        with open(p, "wb") as f:
            f.write(body)
        with open(p, "rb") as f:
            if f.read() != body:
                print("BAD", p, flush=True)
        with open(ref_path, "rb") as f:
            if f.read() != ref:
                print("BAD", ref_path, flush=True)
    except OSError as e:
        print("ERR", e.errno, p, flush=True)
        time.sleep(0.05)
print("DONE", n, flush=True)
"""


def _ref(user: str) -> bytes:
    return (f"{user}: customer;phone\nsmith;+41 79 123 45 67\n".encode()) * 500


def _shared_dir(s: Shared) -> Path:
    """A sticky world-writable directory in the volume, made by root (then locked)."""
    assert s.unlock("root").returncode == 0
    d = s.path("work")
    d.mkdir()
    d.chmod(0o1777)
    assert s.lock("root").returncode == 0
    return d


def _rotate(s: Shared, kind: str) -> subprocess.CompletedProcess[str]:
    return run_cli("rotate", str(s.backing), f"--{kind}", "--passphrase-file",
                   str(s.passfiles["root"]), check=False, timeout=120)


def _statuses(s: Shared) -> dict[str, str]:
    return {u: cli_as(u, "status", env=s.agent.env).stdout for u in WORKERS}


@pytest.mark.mount
@pytest.mark.parametrize("together", [False, True], ids=["one-after-the-other", "two-at-once"])
def test_users_keep_working_through_back_to_back_mounted_rotations(together: bool) -> None:
    """Four pairs of mounted rotations of different kinds, the second of each pair
    started right after (or at the same time as) the first."""
    from conftest import require_fuse

    require_fuse()
    with shared_scenario() as s:
        work = _shared_dir(s)
        for u in WORKERS:
            assert s.unlock(u).returncode == 0
            assert run_as(u, "/bin/sh", "-c", f"cat > '{work}/{u}-ref'",
                          input=_ref(u)).returncode == 0
        kept = (s.backing / "cryptfs.conf").read_bytes()  # from before the rotations
        stop = s.root / "stop"
        procs = {u: subprocess.Popen(["/usr/bin/python3", "-c", WORKER, str(work), u, str(stop)],
                                     user=u, group=u, extra_groups=[], cwd="/",
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for u in WORKERS}
        pairs = [("slots", "slots"), ("slots", "wrap-key"), ("wrap-key", "slots"),
                 ("slots", "reencrypt")]
        outs: list[subprocess.CompletedProcess[str]] = []
        try:
            time.sleep(0.5)
            for first, second in pairs:
                if together:
                    got: list[subprocess.CompletedProcess[str]] = []
                    t = threading.Thread(target=lambda: got.append(_rotate(s, first)))
                    t.start()
                    outs.append(_rotate(s, second))
                    t.join()
                    outs.extend(got)
                else:
                    outs.append(_rotate(s, first))
                    outs.append(_rotate(s, second))
                time.sleep(0.3)
            time.sleep(2.5)  # one more config-watch period: nothing ends late
            statuses = _statuses(s)
        finally:
            stop.touch()
            results = {u: p.communicate(timeout=30) for u, p in procs.items()}
        agent_log, mount_log = s.agent.log_text(), s.mount.log_text()
        for r in outs:
            assert r.returncode == 0 and "Traceback" not in r.stderr, \
                ("".join(o.stdout + o.stderr for o in outs), agent_log[-3000:], mount_log[-3000:])
        for u, (out, err) in results.items():
            assert err == "" and out.startswith("DONE "), (u, out, err, agent_log, mount_log)
            assert int(out.split()[1]) > 20, (u, out)
        for u, text in statuses.items():
            assert f"{u} (uid " in text and " unlocked " in text, (u, text, agent_log)
        for u in WORKERS:  # still served, the right bytes
            r = run_as(u, "cat", str(work / f"{u}-ref"))
            assert r.returncode == 0 and r.stdout == _ref(u), (u, r.stderr)
        assert "not followed" not in agent_log and "not followed" not in mount_log
        for u in WORKERS:
            assert f"INFO: lock: uid {pwd.getpwnam(u).pw_uid} " not in agent_log, agent_log

        # The config from before the rotations, put back: not followed, sessions end.
        real = (s.backing / "cryptfs.conf").read_bytes()
        made = [int(o.stdout.split()[3]) for o in outs if o.stdout.startswith("new key generation")]
        # no generation made twice (a rotation begun while a stronger walk is unfinished
        # resumes it instead: "resuming")
        assert sorted(made) == list(range(2, 2 + len(made))), [o.stdout for o in outs]
        assert json.loads(real)["key_id"] == 1 + len(made)
        _put_conf(s.backing, kept)
        deadline = time.monotonic() + 8
        while "not followed" not in s.agent.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "not followed" in s.agent.log_text(), s.agent.log_text()
        for u in WORKERS:
            r = run_as(u, "cat", str(work / f"{u}-ref"))
            assert r.returncode != 0 and _ref(u)[:40] not in r.stdout
        s.mount.stop()
        _put_conf(s.backing, real)
        res = run_cli("fsck", str(s.backing), "--passphrase-file", str(s.passfiles["root"]))
        assert "clean" in res.stdout, res.stdout + res.stderr


def _put_conf(backing: Path, data: bytes) -> None:
    tmp = backing / "cryptfs.conf.planted"
    tmp.write_bytes(data)
    os.replace(tmp, backing / "cryptfs.conf")



# -- without a mount: the two causes, deterministically ------------------------------------------

def _opened(backing: Path, user: str = "root") -> Volume:
    return open_volume(str(backing), Secret(ROOT_PASSPHRASE if user == "root" else USERS[user][1]))


def _held(vol: Volume) -> VolumeKeys:
    return VolumeKeys(Secret(vol.keys.master.reveal()), vol.keys.key_id)


def test_a_holder_follows_generations_it_missed_but_not_a_put_back_or_forged_one(
        tmp_path: Path) -> None:
    backing = make_shared_volume(tmp_path / "backing")
    first = _opened(backing)
    held = [_held(first)]
    configs = [(backing / "cryptfs.conf").read_bytes()]
    for kind in ("slots", "slots", "wrap-key", "slots"):
        vol = _opened(backing, ALICE)
        assert rot.begin(vol, kind, new_generation=True)
        held.append(_held(vol))
        configs.append((backing / "cryptfs.conf").read_bytes())
        vol.close()
    now = VolumeConfig.from_bytes(configs[-1])
    alice = _opened(backing, ALICE)
    new = now.open_keys(alice.keys.master)
    # every earlier generation's holder follows the newest, however many it missed
    assert [now.follows(h, new) for h in held[:-1]] == [True] * 4
    assert now.chain is not None and now.chain[0] == 4 and len(now.lineage) == 4
    # a config put back from earlier is followed by no later holder
    for i, raw in enumerate(configs[:-1]):
        old = VolumeConfig.from_bytes(raw)
        old_keys = old.open_keys(held[i].master)
        assert not any(old.follows(h, old_keys) for h in held[i:])
    # a link whose signature was changed (config re-sealed by the current holder) breaks it
    bad = VolumeConfig.from_bytes(configs[-1])
    link = bad.lineage[1]
    bad.lineage[1] = replace(link, sig=bytes([link.sig[0] ^ 1]) + link.sig[1:])
    bad.seal(new)
    assert not bad.follows(held[1], new) and bad.follows(held[3], new)
    # a former user who knew generation 2 forges generation 6: held 5 does not follow it,
    # even with the real links copied in front of their own
    forged = VolumeConfig.from_bytes(configs[-1])
    with Secret(os.urandom(32)) as m:
        forged_keys = forged.set_generation(held[2], m, retire=False)
    forged.lineage = now.lineage + forged.lineage[-1:]
    assert not forged.follows(held[4], forged_keys)
    assert not forged.follows(held[3], forged_keys)
    alice.close()
    first.close()


def test_two_rotations_begun_on_the_same_generation_make_two_generations(tmp_path: Path) -> None:
    """Both commands opened generation 1; the second to save goes on from the first's
    generation 2 (locked, re-read) instead of writing another generation 2."""
    backing = make_shared_volume(tmp_path / "backing")
    a, b = _opened(backing), _opened(backing, ALICE)
    assert rot.begin(a, "slots")
    a_keys = _held(a)
    assert rot.begin(b, "wrap-key")
    cfg = load_config(str(backing))
    assert cfg.key_id == 3 and b.keys.key_id == 3
    assert cfg.follows(a_keys, cfg.open_keys(b.keys.master))
    assert sorted(cfg.retired) == [1, 2]  # (b's walk can open files of either)
    # A change not saved yet (the slot a revocation removes) is never dropped: refused.
    c = _opened(backing, ALICE)
    c.config.slots = [s for s in c.config.slots if s.label != BOB]
    assert rot.begin(a, "slots", new_generation=True)  # a, meanwhile, makes generation 4
    with pytest.raises(UsageError, match="changed by another command"):
        rot.begin(c, "wrap-key", new_generation=True)
    after = load_config(str(backing))
    assert after.key_id == 4 and BOB in [s.label for s in after.slots]
    for v in (a, b, c):
        v.close()
