"""A real systemd service manager for tests of the unit files in packaging/systemd/.

The machine running the tests need not be booted with systemd (a container's
PID 1 is often something else), and the tests must not touch the host's
manager.  So this starts a private one: ``systemd --user`` as root, which
applies the same sandboxing as the system manager does for a root service
(capability bounding set, seccomp filters, mount, network and IPC namespaces),
inside

* its own mount namespace, where a tmpfs over /run/systemd holds the marker
  /run/systemd/system that systemd wants to see before it runs at all; and
* its own cgroup namespace, rooted at fresh, empty cgroups made for it, with
  the cgroup hierarchies mounted again inside it so that systemd sees those
  alone.  This matters: at start systemd moves *every process of its root
  cgroup* into ``init.scope``.  Started plainly as root, that root is the
  machine's, and every process on it is moved.  The launcher therefore checks
  that it is alone in each root it will hand over, and only then becomes
  systemd.  ``stop()`` removes the cgroups again.

Units are loaded from one directory (plus the distribution's user units,
which provide exit.target and the like); tests adapt them through drop-ins,
as an operator would.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"


def missing_tools() -> list[str]:
    """What this harness needs and the machine lacks."""
    missing = [t for t in ("systemctl", "unshare") if shutil.which(t) is None]
    if not os.access(SYSTEMD, os.X_OK):
        missing.append(SYSTEMD)
    return missing


@dataclass
class Hierarchy:
    """One mounted cgroup hierarchy: where, how to mount it again, and our cgroup in it."""

    target: Path
    fstype: str
    options: str
    own: Path  # this process's cgroup directory in it


def _hierarchies() -> tuple[bool, list[Hierarchy]]:
    """Whether /sys/fs/cgroup is a tmpfs holding the hierarchies (v1 or hybrid), and
    every hierarchy except cpuset (systemd does not use cpuset v1, and a v1 cpuset
    cgroup accepts no process before its cpus and mems are set)."""
    tmpfs = False
    mounts: list[tuple[Path, str, set[str]]] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fstype, _, opts = right.split()[:3]
            target = Path(left.split()[4])
            if target == Path("/sys/fs/cgroup") and fstype == "tmpfs":
                tmpfs = True
            elif fstype in ("cgroup", "cgroup2") and target.parts[:4] == ("/", "sys", "fs", "cgroup"):
                kept = {o for o in opts.split(",")
                        if o not in ("rw", "ro") and not o.startswith("release_agent=")}
                if "cpuset" not in kept:
                    mounts.append((target, fstype, kept))
    found = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            num, controllers, path = line.rstrip("\n").split(":", 2)
            wanted = set(controllers.split(",")) if controllers else set()
            for target, fstype, kept in mounts:
                if (fstype == "cgroup2" and num == "0" and not controllers) or \
                        (fstype == "cgroup" and wanted and wanted <= kept):
                    options = ",".join(sorted(kept))
                    if fstype == "cgroup" and all(o.startswith("name=") for o in kept):
                        options = "none," + options
                    found.append(Hierarchy(target, fstype, options, target / path.lstrip("/")))
    return tmpfs, found


@dataclass
class Manager:
    """One private systemd service manager; ``units`` is its unit directory."""

    root: Path
    proc: subprocess.Popen[bytes] | None = None
    cgroups: list[Path] = field(default_factory=list)

    @property
    def units(self) -> Path:
        return self.root / "units"

    @property
    def runtime(self) -> Path:
        return self.root / "runtime"

    def drop_in(self, unit: str, text: str) -> None:
        d = self.units / f"{unit}.d"
        d.mkdir(parents=True, exist_ok=True)
        (d / "test.conf").write_text(text)

    def _launcher(self, unit: str) -> list[str]:
        """The command that moves itself into fresh cgroups, enters new mount and
        cgroup namespaces, mounts the cgroup hierarchies again there (so that they
        are rooted at the fresh cgroups), checks that it is alone in each, and
        only then becomes systemd."""
        tmpfs, hierarchies = _hierarchies()
        if not hierarchies:
            raise AssertionError("no cgroup hierarchy mounted under /sys/fs/cgroup")
        name = f"cryptfs-test-{uuid.uuid4().hex[:12]}"
        q = shlex.quote
        outer, inner = [], ["set -e"]
        if tmpfs:
            inner.append("mount -t tmpfs -o mode=0755 tmpfs /sys/fs/cgroup")
        for h in hierarchies:
            fresh = h.own / name
            fresh.mkdir()
            self.cgroups.append(fresh)
            outer.append(f"echo $$ > {q(str(fresh / 'cgroup.procs'))}")
            inner.append(f"mkdir -p {q(str(h.target))}")
            opts = f"-o {q(h.options)} " if h.options else ""
            inner.append(f"mount -t {h.fstype} {opts}{h.fstype} {q(str(h.target))}")
            # Nothing but this shell may be in the root systemd will take over.
            inner.append(f"while read -r p; do [ \"$p\" = $$ ] || "
                         f"{{ echo \"refusing: process $p in {h.target}\" >&2; exit 1; }}; "
                         f"done < {q(str(h.target / 'cgroup.procs'))}")
        inner += ["mount -t tmpfs -o mode=0755 tmpfs /run/systemd", "mkdir /run/systemd/system",
                  f"exec {SYSTEMD} --user --unit={q(unit)}"]
        outer += ["mkdir -p /run/systemd",
                  "exec unshare --mount --propagation private --cgroup sh -c "
                  + q("\n".join(inner))]
        return ["sh", "-c", "set -e\n" + "\n".join(outer)]

    def start(self, unit: str) -> Manager:
        """Run the manager with ``unit`` as its default unit; return once its
        control socket answers."""
        self.runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.root), "LANG": "C.UTF-8",
               "XDG_RUNTIME_DIR": str(self.runtime), "XDG_CONFIG_HOME": str(self.root / "config"),
               "SYSTEMD_UNIT_PATH": f"{self.units}:"}
        with open(self.root / "manager.log", "ab") as log:
            self.proc = subprocess.Popen(self._launcher(unit), env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while not (self.runtime / "systemd" / "private").exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd exited ({self.proc.returncode}):\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"systemd did not start:\n{self.log_text()}")
            time.sleep(0.05)
        return self

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["systemctl", "--user", "--no-pager", *args], capture_output=True,
                             text=True, timeout=60,
                             env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                  "XDG_RUNTIME_DIR": str(self.runtime), "LANG": "C.UTF-8"})
        if check and res.returncode != 0:
            raise AssertionError(f"systemctl --user {' '.join(args)} failed ({res.returncode}):\n"
                                 f"{res.stdout}{res.stderr}")
        return res

    def main_pid(self, unit: str) -> int:
        return int(self.systemctl("show", "-P", "MainPID", unit).stdout.strip() or 0)

    def wait_active(self, unit: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = self.systemctl("is-active", unit, check=False).stdout.strip()
            if state == "active":
                return
            if state == "failed" or time.monotonic() > deadline:
                status = self.systemctl("status", unit, check=False)
                raise AssertionError(f"{unit} is {state}:\n{status.stdout}{status.stderr}")
            time.sleep(0.05)

    def _processes(self) -> list[int]:
        pids: set[int] = set()
        for cg in self.cgroups:
            for procs in cg.rglob("cgroup.procs"):
                try:
                    pids.update(int(p) for p in procs.read_text().split())
                except OSError:
                    pass
        return sorted(pids)

    def stop(self) -> None:
        """Stop the manager (it stops its units first), then remove its cgroups.

        Whatever is left after 15 s is killed: every process in those cgroups
        is one this manager started."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # a user manager starts exit.target
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self.proc = None
        deadline = time.monotonic() + 10
        while (left := self._processes()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        problems = []
        for cg in self.cgroups:
            for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()
                except OSError as e:
                    problems.append(f"{d}: {e.strerror}")
            try:
                cg.rmdir()
            except OSError as e:
                problems.append(f"{cg}: {e.strerror}")
        self.cgroups = []
        if problems:
            raise AssertionError("cgroups of the test manager left behind: " + "; ".join(problems))

    def log_text(self) -> str:
        p = self.root / "manager.log"
        return p.read_text(errors="replace") if p.exists() else ""
