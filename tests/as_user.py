"""Run the cryptfs command line as another system user: ``python as_user.py USER ARGS...``.

The interpreter of the test venv may live where other users cannot reach it
(pyenv under /root), so this starts as root, imports the command line
completely, then drops to the user's uid, gid and groups for good before
running it.  Everything the command does afterwards (connecting to the
agent, whose SO_PEERCRED check sees the user's uid; reading files) it does
as that user.
"""

from __future__ import annotations

import os
import pwd
import sys

import cryptfs.cli.main

if __name__ == "__main__":
    user = pwd.getpwnam(sys.argv[1])
    os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    assert os.getuid() == os.geteuid() == user.pw_uid
    os.environ.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    os.environ.pop("SUDO_USER", None)
    sys.argv = ["cryptfs", *sys.argv[2:]]
    cryptfs.cli.main.main()
