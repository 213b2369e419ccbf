"""Who may talk to the daemon: non-loopback TCP only with CURVE, CURVE refuses unknown keys, and the
default ipc socket sits in a 0700 folder that other users cannot enter."""
import os
import socket
import stat
import tempfile

import pytest
import zmq
import zmq.auth

from engine import protocol as P
from tests.engine.engine_proc import EngineProcess, Peer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_non_loopback_tcp_is_refused_without_curve(tmp_path, spleeter_repo):
    proc = EngineProcess(f"tcp://0.0.0.0:{free_port()}", log=tmp_path / "log",
                         env={"UNBAKE_REPO": str(spleeter_repo)})
    proc.start(wait=False)
    assert proc.proc.wait(60) == 1
    assert "refused without CURVE keys" in proc.log_text()


def test_curve_lets_allowed_keys_in_and_keeps_others_out(tmp_path, spleeter_repo):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    _, server_secret = zmq.auth.create_certificates(str(keys), "server")
    ok_public, ok_secret = zmq.auth.create_certificates(str(keys), "friend")
    _, bad_secret = zmq.auth.create_certificates(str(keys), "stranger")
    os.replace(ok_public, allowed / "friend.key")
    server_public_key, _ = zmq.auth.load_certificate(server_secret)
    endpoint = f"tcp://0.0.0.0:{free_port()}"
    with EngineProcess(endpoint, "--curve-secret-key", server_secret, "--curve-allowed-keys", allowed,
                       log=tmp_path / "log", env={"UNBAKE_REPO": str(spleeter_repo)}).start(wait=False) as proc:
        connect = endpoint.replace("0.0.0.0", "127.0.0.1")

        def hello(secret_file, timeout_s):
            ctx = zmq.Context()
            try:
                peer = Peer(connect, ctx)
                if secret_file is not None:
                    public, secret = zmq.auth.load_certificate(secret_file)
                    peer.sock.close(0)
                    peer.sock = ctx.socket(zmq.DEALER)
                    peer.sock.setsockopt(zmq.LINGER, 0)
                    peer.sock.curve_serverkey = server_public_key
                    peer.sock.curve_publickey, peer.sock.curve_secretkey = public, secret
                    peer.sock.connect(connect)
                try:
                    return peer.call(P.HELLO, timeout_s=timeout_s)
                finally:
                    peer.close()
            finally:
                ctx.term()

        for _ in range(120):  # wait until serving, as the allowed client
            try:
                assert hello(ok_secret, 0.5)["kind"] == "hello"
                break
            except TimeoutError:
                assert proc.proc.poll() is None, proc.log_text()
        else:
            pytest.fail(proc.log_text())
        with pytest.raises(TimeoutError):
            hello(bad_secret, 2)
        with pytest.raises(TimeoutError):
            hello(None, 2)  # plain-text client
        assert hello(ok_secret, 5)["kind"] == "hello"


def test_default_ipc_socket_is_private(spleeter_repo):
    # A world-traversable XDG_RUNTIME_DIR, so that only unbake's own 0700 folder keeps others out.
    base = tempfile.mkdtemp(dir="/tmp")
    os.chmod(base, 0o755)
    env = {"XDG_RUNTIME_DIR": base, "UNBAKE_REPO": str(spleeter_repo)}
    env.pop("UNBAKE_ENDPOINT", None)
    folder = os.path.join(base, "unbake")
    path = os.path.join(folder, "engine.sock")
    proc = EngineProcess(f"ipc://{path}", env=env)
    proc.args = []  # no --endpoint: the default one under XDG_RUNTIME_DIR
    proc.endpoint = f"ipc://{path}"
    import subprocess
    import sys
    proc.proc = subprocess.Popen([sys.executable, "-m", "engine.daemon"], cwd=proc.env.get("PWD"),
                                 env={k: v for k, v in proc.env.items() if k != "UNBAKE_ENDPOINT"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait_ready(60)
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        if os.getuid() != 0:
            pytest.skip("needs root to try as another user")
        pid = os.fork()
        if pid == 0:  # child: become nobody, then try to reach the daemon
            code = 0
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    os.stat(path)
                    code = 10  # could see the socket
                except PermissionError:
                    pass
                ctx = zmq.Context()
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(f"ipc://{path}")
                s.send_multipart(P.request(P.HELLO, 1))
                if s.poll(1500):
                    code = 11  # got an answer
                s.close(0)
                ctx.term()
            except Exception:
                code = 12
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert proc.stop() == 0
        assert not os.path.exists(path)
    finally:
        proc.kill()
