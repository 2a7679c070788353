"""Option types shared by the commands and the key agent."""

from __future__ import annotations

import math
from typing import Any

import click


class Seconds(click.FloatRange):
    """A duration in seconds within a range, and a number: click's FloatRange lets
    ``nan`` through (every comparison with it is false) and ``inf`` above no max."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return number


class PathArg(click.Path):
    """click.Path that refuses an empty name: "" named the current directory
    (mount over it, fsck it), the default (a socket, a state file), or nothing
    (an error message with no path in it), whichever the code under it did."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        if value == "" or value == b"":
            self.fail("an empty path names nothing", param, ctx)
        return super().convert(value, param, ctx)


class UserName(click.ParamType):
    """A system user's name as given on the command line: "" stood for the
    invoking user (`user passwd VOL ""` changed root's own passphrase)."""

    name = "user"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        if not isinstance(value, str):
            return value
        if not value or len(value) > 256 or any(c.isspace() or not c.isprintable()
                                                  for c in value):
            self.fail(f"{value[:40]!r} is not a user name", param, ctx)
        return value
