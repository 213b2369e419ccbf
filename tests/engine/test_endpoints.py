"""Where the engine listens (engine.endpoints, issue 12 items 5 and 15), with real engine processes
and real files: a file, folder or symlink at an ``ipc://`` path is never replaced (one line, exit 1,
its content and inode untouched); only a stale socket of this user is; schemes libzmq would choke
on (``ws://``, ``TCP://``, ``udp://``, garbage, abstract ``ipc://@NAME``) are one line before
libzmq sees them; bad CURVE flags are one line before any model is preloaded."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

import pytest
import zmq
import zmq.auth

from engine import endpoints
from engine.errors import BadRequest
from tests.engine.engine_proc import REPO, EngineProcess, Peer

BAD_ENDPOINTS = [
    ("ws://127.0.0.1:5555", "unknown scheme 'ws'"),
    ("TCP://127.0.0.1:5555", "unknown scheme 'TCP' (schemes are lower case: tcp://)"),
    ("Ipc:///tmp/x.sock", "unknown scheme 'Ipc' (schemes are lower case: ipc://)"),
    ("udp://127.0.0.1:5555", "unknown scheme 'udp'"),
    ("inproc://engine", "unknown scheme 'inproc'"),
    ("garbage", "no scheme"),
    ("", "expected ipc://PATH or tcp://HOST:PORT"),
    ("ipc://@abstract", "abstract sockets (ipc://@NAME) have no file permissions"),
    ("ipc://", "no socket path after ipc://"),
    ("ipc:///tmp/" + "x" * 200, "the socket path is 205 bytes, the limit is 107"),
    ("tcp://127.0.0.1", "expected tcp://HOST:PORT with PORT in 1..65535"),
    ("tcp://127.0.0.1:0", "expected tcp://HOST:PORT with PORT in 1..65535"),
    ("tcp://127.0.0.1:65536", "expected tcp://HOST:PORT with PORT in 1..65535"),
    ("tcp://127.0.0.1:*", "expected tcp://HOST:PORT with PORT in 1..65535"),
    ("tcp://:5555", "is not a host name or address"),
    ("tcp://a b:5555", "is not a host name or address"),
    ("tcp://127.0.0.1:5555\n", "contains a control character"),
]


def serve(*args: str, env: dict | None = None, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.daemon", *map(str, args)], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout_s)


def one_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("endpoint,says", BAD_ENDPOINTS)
def test_check_endpoint_refuses_what_libzmq_would_choke_on(endpoint, says):
    with pytest.raises(BadRequest) as info:
        endpoints.check_endpoint(endpoint)
    assert says in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("endpoint", ["ipc:///run/user/1000/unbake/engine.sock", "ipc://engine.sock",
                                      "tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:65535",
                                      "tcp://*:5555", "tcp://studio.local:5555", "tcp://eth0:5555"])
def test_check_endpoint_accepts_ipc_and_tcp(endpoint):
    assert endpoints.check_endpoint(endpoint) == endpoint


@pytest.mark.parametrize("endpoint,says", [e for e in BAD_ENDPOINTS if e[0] not in ("", "tcp://127.0.0.1:5555\n")])
def test_serve_says_a_bad_endpoint_in_one_line(endpoint, says):
    r = serve("--endpoint", endpoint)
    assert r.returncode == 1
    line = one_line(r)
    assert line.startswith("unbake serve: endpoint ") and says in line, line


@pytest.mark.parametrize("endpoint", ["ws://127.0.0.1:5555", "TCP://127.0.0.1:5555", "ipc://@abstract"])
def test_status_and_the_client_say_a_bad_endpoint_in_one_line(endpoint):
    r = subprocess.run([sys.executable, "-m", "plugin_bridge.cli", "status", "--endpoint", endpoint], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert one_line(r).startswith(f"error: endpoint {endpoint!r}: ")
    from plugin_bridge.client import Client
    with pytest.raises(BadRequest):
        Client(endpoint, autostart=True)


def _snapshot(path):
    st = os.lstat(path)
    content = os.readlink(path) if stat.S_ISLNK(st.st_mode) else (
        sorted(os.listdir(path)) if stat.S_ISDIR(st.st_mode) else open(path, "rb").read())
    return st.st_ino, stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), content


@pytest.mark.parametrize("kind", ["file", "folder", "symlink", "dangling symlink"])
def test_a_file_folder_or_symlink_at_the_socket_path_is_left_alone(tmp_path, kind):
    path = tmp_path / "engine.sock"
    target = tmp_path / "precious.txt"
    target.write_bytes(b"do not delete me\n")
    if kind == "file":
        path.write_bytes(b"a user's file\n")
    elif kind == "folder":
        path.mkdir()
        (path / "inside.txt").write_text("x")
    elif kind == "symlink":
        path.symlink_to(target)
    else:
        path.symlink_to(tmp_path / "nothing-here")
    before, target_before = _snapshot(path), _snapshot(target)
    t0 = time.monotonic()
    r = serve("--endpoint", f"ipc://{path}", "--preload", "spleeter-2stems")
    assert r.returncode == 1 and time.monotonic() - t0 < 10
    what = {"file": "a regular file", "folder": "a folder"}.get(kind, "a symbolic link")
    assert one_line(r) == (f"unbake serve: {path}: {what} is in the way of the engine's socket; refused "
                           f"(left as it is: choose another --endpoint, or remove it)")
    assert _snapshot(path) == before and _snapshot(target) == target_before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"engine.sock", "precious.txt"})  # no lock made
    assert not (tmp_path / "nothing-here").exists()


def _stale_socket(path) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # nobody listens: stale
    return os.lstat(path).st_ino


def test_a_stale_socket_is_replaced_and_a_live_one_is_not(tmp_path, spleeter_repo):
    path = tmp_path / "engine.sock"
    _stale_socket(path)
    with EngineProcess(f"ipc://{path}", "-d", "cpu", env={"UNBAKE_REPO": str(spleeter_repo)},
                       log=tmp_path / "log") as proc:
        assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert proc.status()["kind"] == "status"
    assert proc.proc.returncode == 0 and not path.exists()  # it removes the socket it bound
    # another program listens there: not ours to replace
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    other.listen(1)
    try:
        ino = os.lstat(path).st_ino
        r = serve("--endpoint", f"ipc://{path}", "-d", "cpu", env={"UNBAKE_REPO": str(spleeter_repo)}, timeout_s=120)
        assert r.returncode == 1
        assert one_line(r) == (f"unbake serve: {path}: another program answers on this socket; left as it is "
                               f"(choose another --endpoint)")
        assert os.lstat(path).st_ino == ino
    finally:
        other.close()


def test_bad_curve_flags_are_reported_before_the_preload(tmp_path, spleeter_repo):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    public_file, secret_file = zmq.auth.create_certificates(str(keys), "server")
    env = {"UNBAKE_REPO": str(spleeter_repo)}
    endpoint = f"ipc://{tmp_path}/e.sock"
    cases = [
        ((tmp_path / "missing.key_secret", allowed), f"--curve-secret-key {tmp_path / 'missing.key_secret'}: no such file"),
        ((public_file, allowed), f"--curve-secret-key {public_file}: no secret key in this certificate file"),
        ((tmp_path / "allowed", allowed), f"--curve-secret-key {allowed}: not a file"),
        ((secret_file, tmp_path / "no-such-folder"),
         f"--curve-allowed-keys {tmp_path / 'no-such-folder'}: not a folder of allowed public keys"),
    ]
    (tmp_path / "garbage.key_secret").write_text("not a certificate\n")
    cases.append(((tmp_path / "garbage.key_secret", allowed),
                  f"--curve-secret-key {tmp_path / 'garbage.key_secret'}: not a readable CURVE certificate"))
    for (secret, folder), says in cases:
        t0 = time.monotonic()
        r = serve("--endpoint", endpoint, "--preload", "spleeter-2stems", "--curve-secret-key", secret,
                  "--curve-allowed-keys", folder, env=env)
        took = time.monotonic() - t0
        assert r.returncode == 1, r.stderr
        line = one_line(r)
        assert line.startswith(f"unbake serve: {says}"), line
        assert took < 5, took  # no model was loaded first
        assert "loaded" not in r.stderr
    r = serve("--endpoint", endpoint, "--preload", "spleeter-2stems", "--curve-secret-key", secret_file, env=env)
    assert r.returncode == 1
    assert one_line(r) == "unbake serve: CURVE needs both --curve-secret-key FILE and --curve-allowed-keys DIR"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["allowed", "garbage.key_secret", "keys"]


def test_a_lock_file_that_is_a_symlink_is_refused(tmp_path, spleeter_repo):
    target = tmp_path / "victim"
    target.write_text("precious\n")
    (tmp_path / "engine.sock.lock").symlink_to(target)
    r = serve("--endpoint", f"ipc://{tmp_path}/engine.sock", env={"UNBAKE_REPO": str(spleeter_repo)})
    assert r.returncode == 1
    assert one_line(r) == (f"unbake serve: {tmp_path}/engine.sock.lock: the lock file is a symbolic link; "
                           f"refused (left as it is)")
    assert target.read_text() == "precious\n" and not (tmp_path / "engine.sock").exists()
