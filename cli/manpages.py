"""Man pages written from the click commands themselves, so they cannot drift.

``python -m cryptfs.cli.manpages OUTDIR`` writes one roff page per command:
``cryptfs.1``, ``cryptfs-COMMAND.1`` for every command and subcommand (e.g.
``cryptfs-user-add.1``), ``cryptfs-agent.8`` for the key agent daemon and
``cryptfs-pam.8`` (with ``cryptfs-pam-lock.8``, ``cryptfs-pam-unlock.8``) for
the PAM helper.  Each page has NAME, SYNOPSIS (click's usage), DESCRIPTION
(the help text), COMMANDS for a group, OPTIONS (with their help, defaults
and environment variables), EXIT STATUS and SEE ALSO.  The output depends on
nothing but the code (no date), so packaging/man/ can be compared with it.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import click

from cryptfs import __version__
from cryptfs.cli.common import EXIT_CODE_HELP
from cryptfs.errors import EXIT_CODES


@dataclass(frozen=True)
class Program:
    """A top-level executable: its click command, man section, exit codes."""

    name: str
    command: click.Command
    section: int
    exit_codes: dict[int, str]
    see_also: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    environment: tuple[tuple[str, str], ...] = ()


@dataclass
class Page:
    name: str  # e.g. cryptfs-user-add
    section: int
    ctx: click.Context
    program: Program
    parent: str | None
    children: list[str] = field(default_factory=list)

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.section}"


def programs() -> list[Program]:
    from cryptfs.cli.main import cli
    from cryptfs.keyagent.daemon import main as agent
    from cryptfs.keyagent.pam import main as pam

    agent_codes = {0: "stopped by SIGTERM, SIGINT or SIGHUP (every session locked)",
                   1: "could not start (socket in use, directory not safe, unknown "
                      "--service-user)",
                   2: "bad usage (unknown option, bad value)"}
    debug = ("CRYPTFS_DEBUG", "If set, an internal error shows its traceback instead of one line.")
    return [
        Program("cryptfs", cli, 1, dict(EXIT_CODES),
                see_also=("cryptfs-agent(8)", "cryptfs-pam(8)", "fusermount3(1)"),
                environment=(debug,)),
        Program("cryptfs-agent", agent, 8, agent_codes,
                see_also=("cryptfs(1)", "cryptfs-unlock(1)", "cryptfs-mount(1)", "cryptfs-pam(8)",
                          "systemd.socket(5)"),
                files=(("/run/cryptfs/agent.sock", "The socket it listens on (by default)."),
                       ("/usr/lib/systemd/system/cryptfs-agent.socket",
                        "The systemd socket unit that starts it on the first connection."),
                       ("BACKING/cryptfs.lastuse",
                        "Time of each key slot's last unlock, written after a successful "
                        "unlock."))),
        Program("cryptfs-pam", pam, 8, {c: EXIT_CODES[c] for c in (0, 1, 2, 3, 7, 8)},
                see_also=("cryptfs-agent(8)", "cryptfs-unlock(1)", "pam_exec(8)", "pam.d(5)"),
                files=(("/etc/pam.d/cryptfs", "The PAM lines that run it; included from a "
                        "login service with @include cryptfs."),
                       ("/etc/profile.d/cryptfs-unlock.sh", "Asks for volume passphrases at an "
                        "interactive login (the default, instead of the login password)."),
                       ("/etc/cryptfs/unlock-at-login", "The volumes it asks for, one backing "
                        "directory per line.")),
                environment=(("PAM_USER", "The user logging in or out (set by pam_exec)."),
                             ("PAM_TYPE", "The PAM stack running it (set by pam_exec): auth for "
                              "unlock, close_session for lock."), debug)),
    ]


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    return click.Context(command, info_name=name, parent=parent, **command.context_settings)


def pages() -> list[Page]:
    """Every page, each command before its subcommands."""
    out: list[Page] = []

    def walk(prog: Program, ctx: click.Context, name: str, parent: str | None) -> None:
        page = Page(name, prog.section, ctx, prog, parent)
        out.append(page)
        command = ctx.command
        if isinstance(command, click.Group):
            for sub_name in sorted(command.list_commands(ctx)):
                sub = command.get_command(ctx, sub_name)
                if sub is None or sub.hidden:
                    continue
                child = f"{name}-{sub_name}"
                page.children.append(child)
                walk(prog, _context(sub, sub_name, ctx), child, name)

    for prog in programs():
        walk(prog, _context(prog.command, prog.name, None), prog.name, None)
    return out


# -- roff ------------------------------------------------------------------------

def escape(text: str) -> str:
    """Plain text to roff: backslashes, and hyphen-minus (so options copy as typed)."""
    return text.replace("\\", "\\e").replace("-", "\\-")


def line(text: str) -> str:
    """One line of text to roff, safe from being read as a request (leading . or ')."""
    text = escape(text)
    return "\\&" + text if text.startswith((".", "'")) else text


def inline(text: str) -> str:
    """One line of help text to roff: `code` becomes bold."""
    parts = re.split(r"`([^`]+)`", text)
    out = "".join(escape(p) if i % 2 == 0 else f"\\fB{escape(p)}\\fR" for i, p in enumerate(parts))
    return "\\&" + out if out.startswith((".", "'")) else out


def paragraphs(text: str) -> Iterator[tuple[bool, str]]:
    """click help text as (verbatim, text) paragraphs: a paragraph that starts
    with a line holding only \\b is kept as it is, the others are reflowed."""
    text = inspect.cleandoc(text).split("\f", 1)[0]
    for para in re.split(r"\n\s*\n", text):
        if para.startswith("\b\n"):
            yield True, para[2:]
        elif para.strip():
            yield False, " ".join(line.strip() for line in para.splitlines())


def body(text: str) -> list[str]:
    lines: list[str] = []
    for verbatim, para in paragraphs(text):
        if lines:
            lines.append(".PP")
        if verbatim:
            lines += [".nf", *(inline(line) for line in para.splitlines()), ".fi"]
        else:
            lines.append(inline(para))
    return lines


def summary(ctx: click.Context) -> str:
    """The first paragraph of the help, without a leading "NAME: "."""
    help_text = inspect.cleandoc(ctx.command.help or "").split("\f", 1)[0]
    first = re.split(r"\n\s*\n", help_text, maxsplit=1)[0]
    text = " ".join(first.split()).rstrip(".")
    prefix = f"{ctx.info_name}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def synopsis(ctx: click.Context) -> list[str]:
    pieces = []
    for piece in ctx.command.collect_usage_pieces(ctx):
        pieces.append(re.sub(r"([A-Z][A-Z_]*(?:\.\.\.)?)", r"\\fI\1\\fR", escape(piece)))
    return [f'.SY "{escape(ctx.command_path)}"', *pieces, ".YS"]


def option_entries(ctx: click.Context) -> list[tuple[str, str]]:
    entries = []
    for param in ctx.command.get_params(ctx):
        if not isinstance(param, click.Option) or param.hidden:
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        if param.envvar and isinstance(param.envvar, str) and "$" + param.envvar not in help_text:
            help_text += f"  [env: {param.envvar}]"
        entries.append((names, help_text))
    return entries


def render(page: Page, by_name: dict[str, Page]) -> str:
    ctx, prog = page.ctx, page.program
    command = ctx.command
    out = [
        ".\\\" Generated by python -m cryptfs.cli.manpages from the click commands; do not edit.",
        f'.TH {escape(page.name.upper())} {page.section} "" "cryptfs {escape(__version__)}" '
        f'"cryptfs manual"',
        ".nh",
        ".ad l",
        ".SH NAME",
        f"{escape(page.name)} \\- {inline(summary(ctx))}",
        ".SH SYNOPSIS",
        *synopsis(ctx),
        ".SH DESCRIPTION",
        *body(command.help or ""),
    ]
    if command.epilog and command.epilog != EXIT_CODE_HELP:  # exit codes have their own section
        out += [".PP", *body(command.epilog)]
    if page.children:
        out.append(".SH COMMANDS")
        for child_name in page.children:
            child = by_name[child_name]
            out += [".TP", f"\\fB{escape(child.ctx.command_path)}\\fR",
                    f"{inline(summary(child.ctx))}.  See \\fB\\%{escape(child.name)}\\fR"
                    f"({child.section})."]
    options = option_entries(ctx)
    if options:
        out.append(".SH OPTIONS")
        for names, help_text in options:
            out += [".TP", f"\\fB{escape(names)}\\fR", inline(help_text)]
    environment = list(prog.environment)
    if any("CRYPTFS_AGENT_SOCKET" in help_text for _, help_text in options):
        environment.insert(0, ("CRYPTFS_AGENT_SOCKET", "The key agent's socket, unless an option "
                               "names one (default: /run/cryptfs/agent.sock)."))
    if environment:
        out.append(".SH ENVIRONMENT")
        for var, meaning in environment:
            out += [".TP", f"\\fB{escape(var)}\\fR", line(meaning)]
    out.append(".SH EXIT STATUS")
    for code, meaning in prog.exit_codes.items():
        out += [".TP", f"\\fB{code}\\fR", line(meaning)]
    if prog.files and page.parent is None:
        out.append(".SH FILES")
        for path, meaning in prog.files:
            out += [".TP", f"\\fI{escape(path)}\\fR", line(meaning)]
    refs = []
    if page.parent is not None:
        parent = by_name[page.parent]
        refs.append(f"{parent.name}({parent.section})")
        refs += [f"{s}({page.section})" for s in parent.children if s != page.name]
    refs += [f"{c}({page.section})" for c in page.children]
    if page.parent is None:
        refs += list(prog.see_also)
    if refs:
        out.append(".SH SEE ALSO")
        for i, ref in enumerate(refs):
            name, section = ref[:-1].split("(")
            out.append(f".BR \\%{escape(name)} ({section}){',' if i < len(refs) - 1 else ''}")
    return "\n".join(out) + "\n"


def generate() -> dict[str, str]:
    """File name -> page text, for every page."""
    all_pages = pages()
    by_name = {p.name: p for p in all_pages}
    return {p.filename: render(p, by_name) for p in all_pages}


def write(outdir: str) -> list[str]:
    os.makedirs(outdir, exist_ok=True)
    written = []
    for filename, text in generate().items():
        path = os.path.join(outdir, filename)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m cryptfs.cli.manpages OUTDIR", file=sys.stderr)
        return 2
    for path in write(args[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
