"""Generated packaging: bash completion and man pages.

Both are produced from the click commands and committed under packaging/;
these tests fail when the committed files differ from what the code produces
now (regenerate with the commands in packaging/README.md), and check that
the completion really completes in bash and that every page renders without
a single groff warning.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from cryptfs.cli import manpages
from cryptfs.cli.main import cli
from cryptfs.keyagent.daemon import main as agent_main
from cryptfs.keyagent.pam import main as pam_main

REPO = Path(__file__).resolve().parent.parent
COMPLETION = REPO / "packaging" / "completion" / "cryptfs.bash"
MAN = REPO / "packaging" / "man"
VENV_BIN = Path(sys.executable).parent


# -- bash completion -----------------------------------------------------------------------

def test_completion_file_is_current() -> None:
    fresh = subprocess.run([str(VENV_BIN / "cryptfs")], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "_CRYPTFS_COMPLETE": "bash_source"})
    assert fresh.returncode == 0 and fresh.stdout, fresh.stderr
    assert COMPLETION.read_text() == fresh.stdout, (
        "packaging/completion/cryptfs.bash is stale: regenerate it (packaging/README.md)")


def complete(*words: str) -> list[str]:
    """What bash offers for ``words`` (the last one being completed) with the committed script."""
    if shutil.which("bash") is None:
        pytest.fail("bash is missing")
    words_array = " ".join(f"'{w}'" for w in words)
    script = (f"source {COMPLETION}\n"
              "complete -p cryptfs >/dev/null || exit 3\n"
              f"COMP_WORDS=({words_array}); COMP_CWORD={len(words) - 1}\n"
              f"_cryptfs_completion cryptfs '{words[-1]}' '{words[-2]}'\n"
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    res = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                         text=True, timeout=30,
                         env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line]


def test_completion_completes() -> None:
    assert complete("cryptfs", "un") == ["unlock", "unmount"]
    assert complete("cryptfs", "user", "") == ["add", "list", "passwd", "remove"]
    assert complete("cryptfs", "mount", "--ag") == ["--agent", "--agent-socket"]
    assert complete("cryptfs", "zz") == []


# -- man pages ------------------------------------------------------------------------------

def expected_pages() -> set[str]:
    """A page for every command of the click trees, found without the generator."""
    names = set()

    def walk(command: click.Command, name: str, section: int) -> None:
        names.add(f"{name}.{section}")
        if isinstance(command, click.Group):
            for sub_name, sub in command.commands.items():
                if not sub.hidden:
                    walk(sub, f"{name}-{sub_name}", section)

    walk(cli, "cryptfs", 1)
    walk(agent_main, "cryptfs-agent", 8)
    walk(pam_main, "cryptfs-pam", 8)
    return names


def test_every_command_has_a_page() -> None:
    names = expected_pages()
    assert {"cryptfs.1", "cryptfs-user-add.1", "cryptfs-unlock.1", "cryptfs-agent.8",
            "cryptfs-pam.8"} <= names
    assert {p.name for p in MAN.iterdir()} == names
    assert set(manpages.generate()) == names


def test_committed_pages_are_current(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "cryptfs.cli.manpages", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_text() for p in MAN.iterdir()}
    stale = sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))
    assert not stale, f"packaging/man/ is stale ({', '.join(stale)}): regenerate it (packaging/README.md)"


def groff_warnings(page: Path) -> str:
    res = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True,
                         text=True, timeout=30)
    return res.stderr + ("" if res.returncode == 0 else f"exit {res.returncode}")


def test_pages_render_without_warnings(tmp_path: Path) -> None:
    for tool in ("groff", "man"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install man-db groff-base")
    # The check has teeth: an undefined macro is a warning.
    broken = tmp_path / "broken.1"
    broken.write_text((MAN / "cryptfs.1").read_text() + ".XY not a macro\n")
    assert "not defined" in groff_warnings(broken)

    for page in sorted(MAN.iterdir()):
        assert groff_warnings(page) == "", page.name
        res = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True,
                             text=True, timeout=30,
                             env={**os.environ, "MANWIDTH": "250", "MANPAGER": "cat", "PAGER": "cat",
                                  "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""})
        assert res.returncode == 0 and res.stderr == "", (page.name, res.stderr)
        text = res.stdout
        for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS"):
            assert f"\n{heading}\n" in text, (page.name, heading)
        name = page.name.rsplit(".", 1)[0]
        assert f"{name} - " in text, page.name  # NAME as apropos(1) reads it


def test_pages_say_what_the_commands_say() -> None:
    """Every option of each command, with its help, and every exit code reach its page."""
    pages = {p.filename: p for p in manpages.pages()}
    for filename, page in pages.items():
        text = (MAN / filename).read_text()
        plain = text.replace("\\-", "-").replace("\\fB", "").replace("\\fR", "").replace("\\fI", "")
        for param in page.ctx.command.get_params(page.ctx):
            if isinstance(param, click.Option):
                for opt in param.opts:
                    assert opt in plain, (filename, opt)
                if param.help:
                    assert " ".join(param.help.split()[:4]) in plain, (filename, param.help)
        for code, meaning in page.program.exit_codes.items():
            assert f"\\fB{code}\\fR\n{meaning.replace('-', chr(92) + '-')}" in text, (filename, code)
    user_add = (MAN / "cryptfs-user-add.1").read_text()
    assert '.SY "cryptfs user add"' in user_add and "\\fIBACKING\\fR" in user_add
    assert ".BR \\%cryptfs\\-user (1)" in user_add  # SEE ALSO the parent
    agent = (MAN / "cryptfs-agent.8").read_text()
    assert "\\fB0\\fR\nstopped by SIGTERM" in agent and ".SH FILES" in agent
    assert "CRYPTFS_AGENT_SOCKET" in (MAN / "cryptfs-unlock.1").read_text()
