"""The access log's chain and seals: a log verifies with its first public key
alone, and each kind of tampering is found and named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_cli
from cryptfs.audit.chain import ZERO, Checkpoint, b64, canonical, chain, parse_verifier, public_of, unb64
from cryptfs.audit.verify import Verdict, verify
from cryptfs.audit.writer import AuditLog, Auditor, init_log

N = 47  # records: several seals (every 5) and segments (every ~2 KB), and an unsealed tail


def write_log(d: Path, n: int = N, close: bool = False, clock: object = None) -> str:
    pub = init_log(str(d), "vol-test")
    kw = {"clock": clock} if clock else {}
    log = AuditLog(str(d), seal_every=5, segment_bytes=2000, **kw)
    for i in range(n):
        log.record(event="open", outcome="allowed", uid=1000 + i % 3, user="alice",
                   pid=4242, exe="/usr/bin/cat", path=f"/customers/{i:03d}.csv")
    if close:
        log.close()
    else:
        os.close(log._fd)  # a crash: whatever was not sealed stays unsealed,
        os.close(log._lock)  # and the writer's lock goes with the process
    return pub


def verdict(d: Path, pub: str) -> Verdict:
    return verify(str(d), parse_verifier(pub))


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("segment-*.log"))


def lines(p: Path) -> list[dict]:
    """A segment's lines (a live or crashed writer's reserved tail of NULs left out)."""
    return [json.loads(x) for x in p.read_text().rstrip("\0").splitlines()]


def put(p: Path, objs: list[dict]) -> None:
    """Write lines as the writer does (a record's "h" last), so that only the
    edit made is what verify can find."""
    def line(o: dict) -> str:
        if "seq" in o and "h" in o:
            body = json.dumps({k: v for k, v in o.items() if k != "h"}, sort_keys=True,
                              separators=(",", ":"), ensure_ascii=False)
            return body[:-1] + ',"h":' + json.dumps(o["h"]) + "}"
        return json.dumps(o, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    p.write_text("".join(line(o) + "\n" for o in objs))


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, str]:
    d = tmp_path / "log"
    return d, write_log(d)


def test_an_intact_log_verifies_with_the_first_key_alone(log: tuple[Path, str]) -> None:
    d, pub = log
    v = verdict(d, pub)
    assert v.ok and v.first_bad is None
    assert v.valid == 45 and v.unsealed == 2 and v.epochs == 9  # sealed every 5 records
    assert v.segments == len(segments(d)) >= 3
    # Every record is there, in order, with what was recorded.
    recs = [o for p in segments(d) for o in lines(p) if "seq" in o]
    assert [r["seq"] for r in recs] == list(range(1, N + 1))
    assert recs[10]["path"] == "/customers/010.csv" and recs[10]["exe"] == "/usr/bin/cat"
    # The writer's key file holds the current epoch's seed only (0600).
    st = json.loads((d / "audit.key").read_text())
    assert st["epoch"] == 9 and oct((d / "audit.key").stat().st_mode & 0o777) == "0o600"


def test_closing_seals_the_tail(tmp_path: Path) -> None:
    d = tmp_path / "log"
    pub = write_log(d, close=True)
    v = verdict(d, pub)
    assert v.ok and v.valid == N and v.unsealed == 0


def test_the_writer_carries_on_after_a_restart(tmp_path: Path) -> None:
    d = tmp_path / "log"
    pub = write_log(d)  # crashed with 2 unsealed records
    log = AuditLog(str(d), seal_every=5, segment_bytes=2000)
    for i in range(8):
        log.record(event="unlink", outcome="allowed", path=f"/x{i}")
    log.close()
    v = verdict(d, pub)
    assert v.ok and v.valid == N + 8 and v.unsealed == 0


def test_an_edited_record_is_found(log: tuple[Path, str]) -> None:
    d, pub = log
    seg = segments(d)[0]
    objs = lines(seg)
    i = next(k for k, o in enumerate(objs) if o.get("seq") == 3)
    objs[i]["outcome"] = "denied"
    put(seg, objs)
    v = verdict(d, pub)
    assert not v.ok and v.modified == 1 and v.valid == 44
    assert v.first_bad is not None and "seq 3" in v.first_bad


def test_a_deleted_record_is_a_gap(log: tuple[Path, str]) -> None:
    d, pub = log
    seg = segments(d)[1]
    objs = lines(seg)
    victim = next(o for o in objs if "seq" in o)
    put(seg, [o for o in objs if o is not victim])
    v = verdict(d, pub)
    assert not v.ok and v.gaps == 1 and v.missing >= 1
    assert f"records {victim['seq']}..{victim['seq']}" in (v.first_bad or "")


def test_a_removed_segment_is_missing(log: tuple[Path, str]) -> None:
    d, pub = log
    segments(d)[1].unlink()
    v = verdict(d, pub)
    assert not v.ok and v.missing >= 1
    assert "segment 2 is missing" in (v.first_bad or "")


def test_renamed_or_reordered_segments_are_found(log: tuple[Path, str]) -> None:
    d, pub = log
    s1, s2 = segments(d)[:2]
    tmp = d / "x"
    s1.rename(tmp)
    s2.rename(s1)
    tmp.rename(s2)
    v = verdict(d, pub)
    assert not v.ok and v.reordered >= 2
    assert "renamed or reordered" in (v.first_bad or "")


def test_a_segment_moved_in_from_another_log_is_found(tmp_path: Path, log: tuple[Path, str]
                                                      ) -> None:
    d, pub = log
    other = tmp_path / "other"
    write_log(other)
    shutil.copy(segments(other)[1], segments(d)[1])
    v = verdict(d, pub)
    assert not v.ok


def test_a_cut_tail_inside_a_record_is_found(log: tuple[Path, str]) -> None:
    d, pub = log
    last = segments(d)[-1]
    raw = last.read_bytes().rstrip(b"\0")  # (a crashed writer's reserved tail)
    last.write_bytes(raw[: len(raw) - 25])
    v = verdict(d, pub)
    assert not v.ok and v.modified >= 1


@pytest.mark.parametrize("which", [0, -1], ids=["closed segment", "last segment"])
def test_a_nul_written_into_a_segment_hides_nothing(log: tuple[Path, str], which: int) -> None:
    """Readers stop at the first NUL (a live segment's reserved tail), so one NUL
    written before a segment's records hid them all and the log still verified."""
    d, pub = log
    seg = segments(d)[which]
    raw = seg.read_bytes()
    at = raw.index(b"\n") + 1  # the first record, after the segment's header
    seg.write_bytes(raw[:at] + b"\0" + raw[at + 1:])
    v = verdict(d, pub)
    assert not v.ok and v.modified >= 1
    assert any(f"{seg.name}: bytes other than NUL after the NUL bytes at offset {at}" in p
               for p in v.problems), v.problems
    seg.write_bytes(raw)  # put back: whole again, and a crashed writer's NUL tail is fine
    assert verdict(d, pub).ok


def test_a_cut_tail_shows_as_a_stale_last_seal(tmp_path: Path) -> None:
    """Whole records and seals cut from the end leave a valid prefix: what gives
    it away is the time of its last seal (the writer seals at least every
    minute), which verify --max-age checks."""
    d = tmp_path / "log"
    hour_ago = time.time_ns() - 3600 * 10**9
    pub = write_log(d, close=True, clock=lambda: hour_ago)
    last = segments(d)[-1]
    objs = lines(last)
    put(last, objs[: len(objs) // 2])
    res = run_cli("audit", "verify", str(d), "--key", str(d / "audit.pub"), "--max-age", "120",
                  check=False)
    assert res.returncode == 6, res.stdout + res.stderr
    assert "the tail may have been cut" in res.stdout and "Traceback" not in res.stderr
    assert verdict(d, pub).ok  # (without the age check, a prefix is consistent)


def test_resealing_with_the_current_key_is_found(log: tuple[Path, str]) -> None:
    """Someone who takes the machine holds the current epoch's seed: they edit a
    record of epoch 0, recompute every hash after it, and re-sign every
    checkpoint with that seed.  Epoch 0's checkpoint was signed with a key they
    never had, so it does not verify."""
    d, pub = log
    seed = unb64(json.loads((d / "audit.key").read_text())["seed"])
    h = ZERO
    size = 0
    epoch = 0
    for seg in segments(d):
        objs = lines(seg)
        out = []
        for o in objs:
            if "segment" in o:
                o["prev"] = b64(h)
            elif "seq" in o:
                rec = {k: v for k, v in o.items() if k != "h"}
                if rec["seq"] == 2:
                    rec["outcome"] = "denied"
                h = chain(h, rec)
                o = {**rec, "h": b64(h)}
                size = rec["seq"]
            elif "checkpoint" in o:
                cp = Checkpoint("vol-test", size, h, epoch, public_of(seed), time.time_ns())
                o = {"checkpoint": cp.sign(seed)}
                epoch += 1
            out.append(o)
        put(seg, out)
    v = verdict(d, pub)
    assert not v.ok and v.bad_seals >= 1
    # (signed by the current epoch's key, not by the first one: said with both key ids)
    assert "the first seal is signed by the key with id" in (v.first_bad or "")
    assert "this log was re-sealed" in (v.first_bad or "")


def test_cli_verify_reports_and_exits(log: tuple[Path, str]) -> None:
    d, pub = log
    res = run_cli("audit", "verify", str(d), "--key", pub)
    assert "valid: 45  modified: 0  missing: 0  reordered: 0  gaps: 0  bad seals: 0  " \
           "unsealed tail: 2" in res.stdout
    assert "verdict: valid (2 record(s) after the last seal are not proven yet)" in res.stdout
    # The key of another log: said so, with both key ids (the first seal checks it).
    init_log(str(d.parent / "other"), "other")
    other = (d.parent / "other" / "audit.pub").read_text().strip()
    res = run_cli("audit", "verify", str(d), "--key", other, check=False)
    assert res.returncode == 6, res.stdout + res.stderr
    assert f"the first seal is signed by the key with id {pub.split('+')[1]}, not by " \
           f"{other.split('+')[1]}, the key given: the key of another log" in res.stdout
    segments(d)[0].write_text(segments(d)[0].read_text().replace("/customers/001", "/customers/999"))
    res = run_cli("audit", "verify", str(d), "--key", str(d / "audit.pub"), check=False)
    assert res.returncode == 6 and "modified: 1" in res.stdout and "first bad:" in res.stdout
    assert res.stderr.startswith("cryptfs: error: the access log") and "Traceback" not in res.stderr
    res = run_cli("audit", "verify", str(d), "--key", "cryptfs-audit+not-a-key", check=False)
    assert res.returncode == 2 and "not an audit verifier key" in res.stderr
    res = run_cli("audit", "verify", str(d), "--key", str(d / "nosuch.pub"), check=False)
    assert res.returncode == 2, res.stderr
    assert f"--key {d / 'nosuch.pub'}: no such file, and not a verifier key" in res.stderr
    for age in ("nan", "inf", "-5", "0"):  # (nan passed click's range check: never failed)
        res = run_cli("audit", "verify", str(d), "--key", pub, "--max-age", age, check=False)
        assert res.returncode == 2 and "Invalid value for '--max-age'" in res.stderr, age
    empty = d.parent / "not-a-log"
    empty.mkdir()
    for cmd in (["verify", str(empty), "--key", pub], ["export", str(empty)],
                ["follow", str(empty), "--from-start"]):  # (follow waited forever)
        res = run_cli("audit", *cmd, check=False, timeout=30)
        assert res.returncode == 2 and f"{empty} holds no access log" in res.stderr, cmd
        assert res.stdout == "" and "Traceback" not in res.stderr
    for seg in segments(d):  # every segment removed: valid, but it says what it saw
        seg.unlink()
    res = run_cli("audit", "verify", str(d), "--key", pub)
    assert "verdict: valid; it holds no record: new, or every segment removed" in res.stdout


def test_cli_init_refuses_an_existing_log(log: tuple[Path, str]) -> None:
    d, _ = log
    res = run_cli("audit", "init", str(d), check=False)
    assert res.returncode == 2 and "already holds an audit log" in res.stderr
    for opt in ("--log-id", "--server"):  # (--log-id "" fell back to the directory's name)
        res = run_cli("audit", "init", str(d.parent / "new"), opt, "", check=False)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert not (d.parent / "new").exists()


def test_a_seal_that_finds_the_disk_full_is_made_later(tmp_path: Path) -> None:
    """Disk full at a seal: nothing half-done (no epoch key used twice, no
    checkpoint lost); once there is room, the log seals and verifies."""
    from test_audit_mount import _fill, _tmpfs

    small = tmp_path / "small"
    _tmpfs(small, "256k")
    try:
        d = small / "log"
        pub = init_log(str(d), "full")
        log = AuditLog(str(d), seal_every=10**9)
        for i in range(5):
            log.record(event="open", outcome="allowed", path=f"/{i}")
        filler = _fill(small)
        written = 5
        with pytest.raises(OSError):
            while True:  # (until the segment's last page is full too)
                log.record(event="open", outcome="allowed", path="/" + "x" * 200)
                written += 1
        with pytest.raises(OSError):
            log.seal()
        filler.unlink()
        log.record(event="unlink", outcome="allowed", path="/0")
        log.seal()
        os.close(log._fd)  # a crash after the seal
        os.close(log._lock)
        again = AuditLog(str(d))
        again.record(event="unlink", outcome="allowed", path="/1")
        again.close()
        v = verdict(d, pub)
        assert v.ok and v.bad_seals == 0 and v.unsealed == 0 and v.valid == written + 2
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(
    st.text(min_size=1, max_size=12),
    st.one_of(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40),
              st.integers(min_value=-(2**63), max_value=2**64 - 1), st.booleans(), st.none(),
              st.lists(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=8),
                       max_size=4)),
    max_size=14))
def test_canonical_is_the_json_text_the_format_describes(record: dict) -> None:
    """The writer's fast canonical form (orjson) gives the very bytes of the
    definition in docs/AUDIT.md (Python's json with sorted keys, no spaces,
    no ASCII escaping), so any JSON library can check the chain."""
    assert canonical(record) == json.dumps(record, sort_keys=True, separators=(",", ":"),
                                              ensure_ascii=False).encode()


def test_a_segment_that_cannot_be_started_leaves_the_log_whole(tmp_path: Path) -> None:
    """Review finding: a rotation whose new segment could not be opened left
    the writer with no file (records went nowhere, the mount died, the log
    never verified again).  Now it goes on in the old segment, and rotates
    at a later seal once it can."""
    d = tmp_path / "log"
    pub = init_log(str(d), "rot")
    log = AuditLog(str(d), seal_every=5, segment_bytes=1500)
    (d / "segment-000002.log").symlink_to(tmp_path / "nowhere" / "x")  # open() fails
    for i in range(30):
        log.record(event="open", outcome="allowed", path=f"/f{i}")
    assert segments(d) == [d / "segment-000001.log", d / "segment-000002.log"]
    (d / "segment-000002.log").unlink()
    for i in range(30, 40):
        log.record(event="open", outcome="allowed", path=f"/f{i}")
    log.close()
    assert len(segments(d)) >= 2
    v = verdict(d, pub)
    assert v.ok and v.valid == 40 and v.unsealed == 0, v.problems


def test_a_restart_after_a_rotation_whose_state_was_not_written(tmp_path: Path) -> None:
    """The state file names the old segment, a newer one exists: the next
    writer goes on in the newest, and the chain holds."""
    d = tmp_path / "log"
    pub = init_log(str(d), "rot")
    log = AuditLog(str(d), seal_every=5, segment_bytes=1500)
    state = (d / "audit.key").read_text()
    for i in range(12):
        log.record(event="open", outcome="allowed", path=f"/f{i}")
    os.close(log._fd)  # a crash
    os.close(log._lock)
    n = len(segments(d))
    assert n >= 2
    st = json.loads((d / "audit.key").read_text())
    st["segment"] = 1  # as if the state write after the rotation had not happened
    (d / "audit.key").write_text(json.dumps(st))
    again = AuditLog(str(d), seal_every=5, segment_bytes=1500)
    again.record(event="unlink", outcome="allowed", path="/f0")
    again.close()
    assert state and len(segments(d)) >= n
    v = verdict(d, pub)
    assert v.ok and v.valid == 13, v.problems


def test_a_live_log_is_sealed_on_time_even_when_idle(tmp_path: Path) -> None:
    """Review finding: seals came only with records, so an idle mount's last
    records stayed unsealed and `verify --max-age` cried wolf on an untouched
    live log.  A timer now seals every seal_seconds, records or not."""
    import trio

    d = tmp_path / "log"
    pub = init_log(str(d), "idle")
    auditor = Auditor(AuditLog(str(d), seal_seconds=0.4), "ab" * 16)

    async def day() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(auditor.sealer)
            auditor.write("open", "allowed", 0, os.getpid(), path="/a")
            await trio.sleep(1.0)  # idle: the record is sealed, then sealed again
            nursery.cancel_scope.cancel()

    trio.run(day)
    v = verdict(d, pub)
    assert v.ok and v.valid == 1 and v.unsealed == 0 and v.epochs >= 2
    assert v.last_seal_ns is not None and time.time_ns() - v.last_seal_ns < 0.8e9
    res = run_cli("audit", "verify", str(d), "--key", pub, "--max-age", "5")
    assert "verdict: valid" in res.stdout
    auditor.close()


def test_max_age_fails_a_log_with_no_seal_at_all(tmp_path: Path) -> None:
    d = tmp_path / "log"
    pub = init_log(str(d), "cut")
    res = run_cli("audit", "verify", str(d), "--key", pub, "--max-age", "60", check=False)
    assert res.returncode == 6 and "no seal at all" in res.stdout


@pytest.mark.parametrize("line", [
    '{"seq":"7","h":"AAAA","event":"open"}',
    '{"checkpoint":5}',
    '{"seq":4,"h":"AAAA","event":"open","time_ns":"soon"}',
    '{"seq":4,"h":"AAAA","event":"open","time_ns":1,"path":5,"exe":["x"]}',
    '{"seq":4,"event":"open"}',
    '[1,2]',
], ids=["seq-text", "checkpoint-number", "time-text", "path-number", "no-h", "not-an-object"])
def test_a_hostile_line_gets_a_verdict_not_a_traceback(tmp_path: Path, line: str) -> None:
    """Review finding: lines of the wrong shape made verify, report and export
    fail with "internal error" (and the next writer with a raw exception)."""
    d = tmp_path / "log"
    pub = write_log(d, n=3, close=True)
    seg = segments(d)[-1]
    seg.write_text(seg.read_text() + line + "\n")
    res = run_cli("audit", "verify", str(d), "--key", pub, check=False)
    assert res.returncode == 6 and "first bad:" in res.stdout, res.stdout + res.stderr
    for fmt in ("jsonl", "csv", "cef", "ecs", "ocsf"):
        res = run_cli("audit", "export", str(d), "--format", fmt, "--since", "2000-01-01",
                      check=False)
        assert res.returncode == 0 and "Traceback" not in res.stderr, (fmt, res.stderr)
        assert "/customers/002.csv" in res.stdout, fmt
    res = run_cli("audit", "report", str(d), "--key", pub, "--html", str(tmp_path / "r.html"),
                  check=False)
    assert res.returncode == 6 and "DOES NOT VERIFY" in (tmp_path / "r.html").read_text()
    AuditLog(str(d), wait=0).close()  # a writer still opens it
