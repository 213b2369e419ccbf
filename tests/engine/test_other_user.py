"""Another user on the same machine (issue 12 items 8 and 9), for real: the second local user of
tests/local_users.py (``unbake-other``) against root's engines and root's runtime folder.

8. TCP needs CURVE, loopback included, unless every local user is explicitly allowed
   (``--allow-any-local-user`` / ``UNBAKE_ALLOW_ANY_LOCAL_USER=1``): without either, root's engine on
   tcp://127.0.0.1 refuses to start in one line; with it, the other user is served (that is what it
   means). On ipc the other user reaches nothing (the socket file is 0600, even in a folder anyone
   may enter); with CURVE a key that is not allowed gets nothing.
9. The fallback runtime folder ($TMPDIR/unbake-UID) that the other user made first (a symlink to a
   root-owned folder, a folder of theirs, a folder open to all) is refused in one line by `unbake
   status`, `serve` and `separate`, and nothing is chmodded (modes and owners asserted unchanged).
"""
from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zmq
import zmq.auth

from engine import protocol as P
from tests.engine.engine_proc import REPO, EngineProcess, Peer
from tests.local_users import other_user, run_as_other

# Run as the other user: a hello to each argv target ("ENDPOINT" or "ENDPOINT SERVER_PUBLIC_KEY" for
# CURVE with a key pair of its own); one line per target: what a plain connect() to an ipc path says,
# then "ANSWER <kind>" or "NOTHING" (within 1.5 s; the engine answers a peer it lets in within ms).
KNOCK = r"""
import errno, socket, sys, zmq, msgpack
ctx = zmq.Context()
for target in sys.argv[1:]:
    endpoint, _, server_key = target.partition(" ")
    seen = []
    if endpoint.startswith("ipc://"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(endpoint[len("ipc://"):])
            seen.append("CONNECT ok")
        except OSError as e:
            seen.append("CONNECT " + errno.errorcode.get(e.errno, str(e.errno)))
        s.close()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if server_key:
        public, secret = zmq.curve_keypair()
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key.encode(), public, secret
    sock.connect(endpoint)
    sock.send_multipart([msgpack.packb({"v": 1, "op": "hello", "id": 1})])
    if sock.poll(1500):
        seen.append("ANSWER " + str(msgpack.unpackb(sock.recv_multipart()[0]).get("kind")))
    else:
        seen.append("NOTHING")
    sock.close(0)
    print(", ".join(seen))
"""


def knock(*targets: str) -> list[str]:
    r = run_as_other(["-c", KNOCK, *targets], timeout_s=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.daemon", *map(str, args)], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60)


# -- 8: who reaches root's engine ------------------------------------------------------------------

def test_loopback_tcp_without_curve_is_refused_unless_every_local_user_is_allowed(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "UNBAKE_ALLOW_ANY_LOCAL_USER"}
    for extra in ({}, {"UNBAKE_ALLOW_ANY_LOCAL_USER": "0"}):
        r = subprocess.run([sys.executable, "-m", "engine.daemon", "--endpoint", endpoint], cwd=REPO,
                           env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.splitlines() == [
            f"unbake serve: {endpoint}: every local user can connect to a TCP port, loopback included: refused "
            f"without CURVE keys (--curve-secret-key FILE --curve-allowed-keys DIR); use ipc:// (private to "
            f"you), or pass --allow-any-local-user (UNBAKE_ALLOW_ANY_LOCAL_USER=1) to let every local user "
            f"use this engine"]
    r = serve("--endpoint", endpoint, env={"UNBAKE_ALLOW_ANY_LOCAL_USER": "yes"})
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["unbake serve: UNBAKE_ALLOW_ANY_LOCAL_USER='yes': must be 1 (every local "
                                     "user may use the engine) or 0"]
    r = serve("--endpoint", f"tcp://0.0.0.0:{free_port()}", "--allow-any-local-user")
    assert r.returncode == 1 and "is reachable from other machines: refused without CURVE keys" in r.stderr


def test_the_other_user_reaches_an_engine_only_where_allowed(tmp_path, spleeter_repo):
    other_user()
    env = {"UNBAKE_REPO": str(spleeter_repo)}
    # a socket in a folder anyone may enter: only the socket file's own mode keeps others out
    open_folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="unbake-test-"))
    os.chmod(open_folder, 0o755)
    ipc = f"ipc://{open_folder}/engine.sock"
    tcp = f"tcp://127.0.0.1:{free_port()}"
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(str(keys), "server")
    friend_public, friend_secret = zmq.auth.create_certificates(str(keys), "friend")
    os.replace(friend_public, allowed / "friend.key")
    curve = f"tcp://127.0.0.1:{free_port()}"
    engines = [EngineProcess(tcp, "-d", "cpu", env={**env, "UNBAKE_ALLOW_ANY_LOCAL_USER": "1"},
                             log=tmp_path / "tcp.log"),
               EngineProcess(ipc, "-d", "cpu", env=env, log=tmp_path / "ipc.log"),
               EngineProcess(curve, "-d", "cpu", "--curve-secret-key", server_secret, "--curve-allowed-keys",
                             allowed, env=env, log=tmp_path / "curve.log")]
    try:
        for e in engines:
            e.start(wait=False)
        engines[0].wait_ready()
        engines[1].wait_ready()
        server_key = zmq.auth.load_certificate(server_public)[0]

        def friend_hello(timeout_s: float) -> dict:
            ctx = zmq.Context()
            try:
                peer = Peer.__new__(Peer)
                peer.ctx, peer.next_id = ctx, 1
                peer.sock = ctx.socket(zmq.DEALER)
                peer.sock.setsockopt(zmq.LINGER, 0)
                peer.sock.curve_serverkey = server_key
                peer.sock.curve_publickey, peer.sock.curve_secretkey = zmq.auth.load_certificate(friend_secret)
                peer.sock.connect(curve)
                try:
                    return peer.call(P.HELLO, timeout_s=timeout_s)
                finally:
                    peer.close()
            finally:
                ctx.term()

        deadline = time.monotonic() + 60
        while True:  # the CURVE engine is ready when the allowed client gets an answer
            try:
                assert friend_hello(0.5)["kind"] == "hello"
                break
            except TimeoutError:
                assert engines[2].proc.poll() is None and time.monotonic() < deadline, engines[2].log_text()
        path = ipc[len("ipc://"):]
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        with Peer(ipc) as peer:  # root, the engine's user, is answered on ipc
            assert peer.call(P.HELLO, timeout_s=10)["kind"] == "hello"
        assert knock(tcp, ipc, f"{curve} {server_key.decode()}", curve) == [
            "ANSWER hello",             # loopback TCP, every local user explicitly allowed: served
            "CONNECT EACCES, NOTHING",  # ipc: the socket file is 0600
            "NOTHING",                  # CURVE, a key pair that is not allowed
            "NOTHING",                  # CURVE engine, a plain-text peer
        ]
        assert "every local user may use this engine" in engines[0].log_text()
        assert friend_hello(10)["kind"] == "hello"
        for e in engines:
            assert e.proc.poll() is None
    finally:
        for e in engines:
            try:
                e.stop()
            except Exception:
                e.kill()
        shutil.rmtree(open_folder, ignore_errors=True)


# -- 9: the fallback runtime folder ------------------------------------------------------------------

def _planted(kind: str, tmpdir: Path, target: Path) -> Path:
    """The other user makes $TMPDIR/unbake-0 first: a symlink to ``target``, a folder of theirs, or
    a folder of theirs open to all."""
    path = tmpdir / f"unbake-{os.getuid()}"
    code = {"symlink": f"import os; os.symlink({str(target)!r}, {str(path)!r})",
            "their folder": f"import os; os.mkdir({str(path)!r}, 0o700)",
            "open folder": f"import os; os.mkdir({str(path)!r}); os.chmod({str(path)!r}, 0o777)"}[kind]
    r = run_as_other(["-c", code])
    assert r.returncode == 0, r.stderr
    return path


@pytest.mark.parametrize("kind", ["symlink", "their folder", "open folder"])
def test_a_runtime_folder_planted_by_another_user_is_refused(kind, tmp_path):
    user = other_user()
    if os.path.isdir(f"/run/user/{os.getuid()}"):
        pytest.skip(f"/run/user/{os.getuid()} exists: the $TMPDIR fallback is not used on this machine")
    tmpdir = Path(tempfile.mkdtemp(dir="/tmp", prefix="unbake-tmpdir-"))
    target = Path(tempfile.mkdtemp(dir="/tmp", prefix="unbake-target-"))  # root's own folder
    try:
        os.chmod(tmpdir, 0o1777)  # like /tmp: anyone may create, only owners may remove
        os.chmod(target, 0o755)
        path = _planted(kind, tmpdir, target)
        before = {p: (os.lstat(p).st_mode, os.lstat(p).st_uid) for p in (path, target)}
        song = tmp_path / "song.wav"
        sf.write(song, np.zeros((4410, 2), np.float32), 44100)
        env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "UNBAKE_ENDPOINT")}
        env["TMPDIR"] = str(tmpdir)
        why = {"symlink": "unbake's runtime folder is a symbolic link, not a folder; refused (left as it is: "
                          "remove it, or set XDG_RUNTIME_DIR or TMPDIR elsewhere)",
               "their folder": f"unbake's runtime folder belongs to another user (uid {user.uid}); refused "
                               f"(left as it is: remove it, or set XDG_RUNTIME_DIR or TMPDIR elsewhere)",
               "open folder": f"unbake's runtime folder belongs to another user (uid {user.uid}); refused "
                              f"(left as it is: remove it, or set XDG_RUNTIME_DIR or TMPDIR elsewhere)"}[kind]
        for command, prefix in ((["status"], "error: "), (["serve"], "unbake serve: "),
                                (["separate", str(song), "-o", str(tmp_path / "out")], "error: ")):
            r = subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *command], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 1, (command, r.stderr)
            assert "Traceback" not in r.stderr
            assert r.stderr.splitlines() == [f"{prefix}{path}: {why}"], command
            after = {p: (os.lstat(p).st_mode, os.lstat(p).st_uid) for p in (path, target)}
            assert after == before, command  # nothing chmodded, nothing followed
        assert os.listdir(target) == [] and not (tmp_path / "out").exists()
        assert sorted(os.listdir(tmpdir)) == [path.name]
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(tmpdir), str(target)], check=False)
