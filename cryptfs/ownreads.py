"""A plaintext handle of a masked role reads only what that role wrote.

A role that sees structured files masked (an agent) holds a *plaintext*
handle of a file a mask governs in two ways only: it created the file there
(the file was empty; reading back its own writes is what every program
expects), or it opened the file before the file came under a mask (moved
into a masked directory).  Either way, whatever the file held at that open
was readable to it in clear.  What is new is what *someone else* puts into
the file while the handle is open: a supervisor's or an export's rows,
another agent's appended rows.

So every change of a file's plaintext (a write, a truncate, an ``O_TRUNC``
open) made by another uid marks such handles *foreign*, for as long as they
are open, whether or not a mask governs the file at that moment.  A foreign
handle reads nothing while a mask governs the file (the mount asks at each
read).  And while one is open and readable, nobody else's read of the file
is served either: a private ``mmap`` of the agent's would show the pages
such a read brings into the kernel's one page cache of the file (reads of a
mapping are the daemon's only sight of it).  Another handle of the same uid
changes nothing: its own writes are its own to read.

The same holds for the one plaintext handle a user gets of a hybrid file
they are not a recipient of: a drop-box writer's create handle.  The file
key is in memory for the writes; what a recipient writes into the file while
that handle is open is not the writer's to read, and the handle is foreign
from then on, whatever the masks.

Pure: the state lives on the mount's handles; the mount asks the questions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

# The decisions the access log records (the refused read's record).
FOREIGN_READ = ("plaintext handle of a masked role: someone else changed the file since it "
                "was opened (a masked view shows it)")
HELD_FOREIGN = ("refused while a masked role holds a plaintext handle of the file that someone "
                "else changed (its private mapping would see these pages)")
DROPBOX_READ = ("a writer who is not a recipient: a recipient changed the file since it was "
                "created (the writer reads back only its own writes)")
HELD_DROPBOX = ("refused while a writer who is not a recipient holds the file open, and a "
                "recipient changed it (the writer's mapping would see these pages)")


class Watched(Protocol):
    uid: int
    readable: bool
    own_only: bool  # a plaintext handle of a masked role (or of a writer, not a recipient)
    not_recipient: bool  # the create handle of a writer who is not a recipient
    foreign: bool  # someone else changed the file's plaintext while it was open


def changed_by(handles: Iterable[Watched], uid: int) -> bool:
    """``uid`` is about to change the file's plaintext: every plaintext
    handle of a masked role held by another uid becomes foreign (True if
    one did)."""
    marked = False
    for h in handles:
        if h.own_only and h.uid != uid:
            h.foreign = marked = True
    return marked


def foreign_held(handles: Iterable[Watched]) -> bool:
    """Whether a foreign handle that can read is open on the file."""
    return any(h.foreign and h.readable for h in handles)


def keyless_foreign_held(handles: Iterable[Watched]) -> bool:
    """Whether a writer who is not a recipient holds the file open for reading
    since someone else changed it."""
    return any(h.foreign and h.readable and h.not_recipient for h in handles)
