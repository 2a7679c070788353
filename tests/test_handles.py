"""The handle types (cryptfs.fs.inodes) without a mount: what each one is, and
that cryptfs.ownreads, which asks every handle of a file, marks only plaintext
handles of a masked role.  (Real mounts exercise them in test_masking,
test_roles_ciphertext and test_programs.)"""

from __future__ import annotations

import os
import stat

from cryptfs import ownreads
from cryptfs.decision import ALLOWED
from cryptfs.fs.inodes import CiphertextView, Handle, Inode, MaskedView, PlainHandle, readable


def test_three_types_one_base() -> None:
    inode = Inode(7, -1, stat.S_IFREG)
    plain = PlainHandle(inode, 1001, True, own_only=True)
    raw = CiphertextView(inode, 1002, True, raw=99)
    view = MaskedView(inode, 1003, False, view=b"Sm***,F\n")
    assert all(isinstance(h, Handle) for h in (plain, raw, view))
    assert {type(h) for h in (plain, raw, view)} == {PlainHandle, CiphertextView, MaskedView}
    assert raw.raw == 99 and view.view == b"Sm***,F\n"
    assert not hasattr(plain, "raw") and not hasattr(plain, "view")
    assert plain.decision is ALLOWED  # (until its open hands it out with its decision)


def test_only_plaintext_handles_of_a_masked_role_become_foreign() -> None:
    inode = Inode(7, -1, stat.S_IFREG)
    agent = PlainHandle(inode, 1001, True, own_only=True)
    supervisor = PlainHandle(inode, 1002, True)
    view = MaskedView(inode, 1003, True, view=b"")
    raw = CiphertextView(inode, 1004, True, raw=-1)
    handles = [agent, supervisor, view, raw]
    ownreads.changed_by(handles, 1001)  # (its own write)
    assert not any(h.foreign for h in handles)
    ownreads.changed_by(handles, 1002)
    assert [h.foreign for h in handles] == [True, False, False, False]
    assert ownreads.foreign_held(handles)


def test_readable() -> None:
    assert readable(os.O_RDONLY) and readable(os.O_RDWR) and not readable(os.O_WRONLY)
