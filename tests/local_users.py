"""A second, real local user for attack tests ("another user on this machine").

``other_user()`` returns the user ``unbake-other`` (created with ``useradd`` when the tests run as
root, as CI does; a skip with the reason otherwise). ``run_as_other(args, ...)`` runs a Python
program as that user: the system's ``/usr/bin/python3`` (the venv's interpreter lives under /root,
which the other user cannot enter) with this checkout and the venv's site-packages on its path, so
the program can use pyzmq, msgpack, numpy and ``plugin_bridge.client`` like any local process.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAME = "unbake-other"
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str


def other_user() -> User:
    """The second local user (created once); pytest.skip with the reason where that is impossible."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second local user (useradd); CI runs as root")
    try:
        entry = pwd.getpwnam(NAME)
    except KeyError:
        if not shutil.which("useradd"):
            pytest.skip("useradd not found: cannot create a second local user")
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", NAME], check=True,
                       capture_output=True)
        entry = pwd.getpwnam(NAME)
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def run_as_other(args: list[str], *, timeout_s: float = 60.0, env: dict | None = None,
                 cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``/usr/bin/python3 ARGS...`` as the other user; returns the finished process (text output).

    The interpreter must be the venv's version (both 3.11 here): the venv's site-packages go on its
    PYTHONPATH. env: extra variables (HOME, TMPDIR and PYTHONPATH are set here)."""
    user = other_user()
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} not found: the other user has no Python to run")
    site = sysconfig.get_paths()["purelib"]
    full_env = {"PATH": "/usr/bin:/bin", "HOME": user.home, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
                "PYTHONPATH": os.pathsep.join([str(REPO), site]), "PYTHONDONTWRITEBYTECODE": "1"}
    full_env.update(env or {})
    return subprocess.run([SYSTEM_PYTHON, *args], user=user.uid, group=user.gid, extra_groups=[],
                          env=full_env, cwd=cwd or user.home, capture_output=True, text=True,
                          timeout=timeout_s)


if __name__ == "__main__":  # a quick check by hand: the other user can import the client
    print(run_as_other(["-c", "import os, zmq, msgpack, numpy, plugin_bridge.client; print(os.getuid())"]),
          file=sys.stderr)
