"""Issue 12 items 11, 12 and 15 against a real engine process.

- Quotas per peer identity, not per connection: one process with 4 sockets tries to hold every
  session; another peer identity (a second CURVE key; a second local user on ipc) still opens one,
  and its separation takes at most twice its unloaded time.
- The idle TTL counts audio pushed, not messages: 1-frame pushes no longer keep a session forever.
- A killed client's session is freed within seconds (ipc: its process ended; TCP: unroutable).
- overlap=0.999999 (and a grid of more than 50 segments per second) is refused, naming the bound.
"""
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth

from engine import protocol as P
from plugin_bridge.client import Client
from tests.conftest import REPO
from tests.engine.engine_proc import EngineProcess, Peer

MODEL = "spleeter-2stems"
BUDGET_GB = 1.0
CLIP_S = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clip(seconds: float = CLIP_S, rate: int = 44100) -> np.ndarray:
    return (0.1 * np.random.default_rng(1).standard_normal((2, int(seconds * rate)))).astype(np.float32)


def separation_s(client: Client) -> float:
    t0 = time.monotonic()
    stems = client.separate(clip(), 44100, model=MODEL)
    assert stems["vocals"].shape == (2, CLIP_S * 44100)
    return time.monotonic() - t0


def curve_peer(endpoint: str, server_public: bytes, secret_file, ctx) -> Peer:
    public, secret = zmq.auth.load_certificate(secret_file)
    peer = Peer.__new__(Peer)
    peer.ctx, peer.next_id = ctx, 1
    peer.sock = ctx.socket(zmq.DEALER)
    peer.sock.setsockopt(zmq.LINGER, 0)
    peer.sock.curve_serverkey = server_public
    peer.sock.curve_publickey, peer.sock.curve_secretkey = public, secret
    peer.sock.connect(endpoint)
    return peer


def hold_sessions(peers: list[Peer]) -> tuple[int, dict]:
    """Open sessions on every socket until each is refused; (sessions held, the last refusal)."""
    held, refusal = 0, None
    for peer in peers:
        while True:
            reply = peer.call(P.OPEN, sample_rate=44100, channels=2, model=MODEL, timeout_s=30)
            if reply["kind"] != "ready":
                refusal = reply
                break
            held += 1
    return held, refusal


def test_one_curve_key_with_4_sockets_cannot_hold_every_session(tmp_path, spleeter_repo):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    _, server_secret = zmq.auth.create_certificates(str(keys), "server")
    for name in ("attacker", "victim"):
        public, _ = zmq.auth.create_certificates(str(keys), name)
        os.replace(public, allowed / f"{name}.key")
    server_public, _ = zmq.auth.load_certificate(server_secret)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    with EngineProcess(endpoint, "--preload", MODEL, "--curve-secret-key", server_secret, "--curve-allowed-keys",
                       allowed, "--max-sessions", "8", "--memory-budget-gb", str(BUDGET_GB),
                       log=tmp_path / "log", env={"UNBAKE_REPO": str(spleeter_repo)}).start(wait=False) as proc:
        victim = curve_peer(endpoint, server_public, keys / "victim.key_secret", ctx)
        for _ in range(240):  # wait until it serves
            try:
                assert victim.call(P.HELLO, timeout_s=0.5)["kind"] == "hello"
                break
            except TimeoutError:
                assert proc.proc.poll() is None, proc.log_text()
        env = {P.ENDPOINT_ENV: endpoint}
        os.environ.update({"UNBAKE_CURVE_SERVER_KEY": server_public.decode(),
                           "UNBAKE_CURVE_CLIENT_CERT": str(keys / "victim.key_secret")})
        try:
            with Client(endpoint, autostart=False, timeout_s=60) as client:
                unloaded = min(separation_s(client) for _ in range(2))
                attackers = [curve_peer(endpoint, server_public, keys / "attacker.key_secret", ctx) for _ in range(4)]
                held, refusal = hold_sessions(attackers)
                assert held == 4, (held, refusal)  # half of --max-sessions 8, however many sockets
                assert refusal["code"] == "E_QUEUE_FULL" and "limit per peer is 4" in refusal["message"], refusal
                assert victim.call(P.OPEN, sample_rate=44100, channels=2, model=MODEL)["kind"] == "ready"
                loaded = separation_s(client)
                print(f"victim separation: unloaded {unloaded:.2f} s, with the attacker's sessions {loaded:.2f} s")
                assert loaded <= 2 * unloaded + 0.5, (unloaded, loaded)
                status = victim.call(P.STATUS)
                assert status["peak_rss_mb"] < BUDGET_GB * 1024 + 500, status["peak_rss_mb"]
                for a in attackers:
                    a.close()
        finally:
            for k in ("UNBAKE_CURVE_SERVER_KEY", "UNBAKE_CURVE_CLIENT_CERT"):
                os.environ.pop(k, None)
            victim.close()
    ctx.term()


def test_one_local_user_with_4_sockets_leaves_sessions_for_another_user(tmp_path, spleeter_repo):
    from tests.local_users import other_user, run_as_other
    user = other_user()  # skips unless root
    folder = Path(tempfile.mkdtemp(prefix="unbake-quota-", dir="/tmp"))  # pytest's tmp is root-only
    os.chmod(folder, 0o711)
    request_cleanup = shutil.rmtree
    endpoint = f"ipc://{folder}/e.sock"
    with EngineProcess(endpoint, "--preload", MODEL, "--max-sessions", "8", "--memory-budget-gb", str(BUDGET_GB),
                       log=tmp_path / "log", env={"UNBAKE_REPO": str(spleeter_repo)}) as proc:
        os.chmod(folder / "e.sock", 0o666)  # this test's doing: the engine makes it 0600
        victim = textwrap.dedent(f"""
            import json, sys, time, numpy as np
            from plugin_bridge.client import Client
            x = (0.1 * np.random.default_rng(1).standard_normal((2, {CLIP_S} * 44100))).astype(np.float32)
            with Client({endpoint!r}, autostart=False, timeout_s=60) as c:
                s = c.open({MODEL!r}, 44100, 2)
                t0 = time.monotonic()
                c.separate(x, 44100, model={MODEL!r})
                print(json.dumps({{"uid": __import__("os").getuid(), "separate_s": time.monotonic() - t0}}))
                s.cancel()
        """)
        first = run_as_other(["-c", victim], timeout_s=120)
        assert first.returncode == 0, first.stderr[-2000:]
        unloaded = __import__("json").loads(first.stdout.splitlines()[-1])["separate_s"]
        with Peer(endpoint) as a1, Peer(endpoint) as a2, Peer(endpoint) as a3, Peer(endpoint) as a4:
            held, refusal = hold_sessions([a1, a2, a3, a4])  # root: 4 sockets, one uid
            assert held == 4 and "uid:0" in refusal["message"], (held, refusal)
            second = run_as_other(["-c", victim], timeout_s=120)
            assert second.returncode == 0, second.stderr[-2000:]  # its open and its separation succeed
            got = __import__("json").loads(second.stdout.splitlines()[-1])
            assert got["uid"] == user.uid
            print(f"other user's separation: unloaded {unloaded:.2f} s, while root holds its quota "
                  f"{got['separate_s']:.2f} s")
            assert got["separate_s"] <= 2 * unloaded + 0.5
            assert proc.status()["peak_rss_mb"] < BUDGET_GB * 1024 + 500
    request_cleanup(folder, ignore_errors=True)


def test_one_frame_pushes_do_not_keep_a_session_but_audio_does(tmp_path, spleeter_repo):
    ttl = 3.0
    with EngineProcess(f"ipc://{tmp_path}/e.sock", "--preload", MODEL, "--session-ttl-s", str(ttl),
                       log=tmp_path / "log", env={"UNBAKE_REPO": str(spleeter_repo)}) as proc, \
            Peer(proc.endpoint) as peer:
        trickle = peer.call(P.OPEN, sample_rate=44100, channels=2, model=MODEL)["session"]
        stream = peer.call(P.OPEN, sample_rate=44100, channels=2, model=MODEL)["session"]
        t0 = time.monotonic()
        trickle_end = None
        while time.monotonic() - t0 < 3 * ttl:
            if trickle_end is None:
                r = peer.call(P.PUSH, [np.zeros((2, 1), np.float32)], session=trickle, channels=2, frames=1)
                if r["kind"] == "error":
                    assert r["code"] == "E_UNKNOWN_SESSION", r
                    trickle_end = time.monotonic() - t0
            r = peer.call(P.PUSH, [clip(0.2)], session=stream, channels=2, frames=int(0.2 * 44100))
            assert r["kind"] == "done", (r, proc.log_text())  # 0.2 s of audio every 0.25 s: kept
            time.sleep(0.25)
        assert trickle_end is not None and trickle_end < ttl + 1.5, trickle_end
        assert "idle for 3 s" in proc.log_text()


def _client_holding_a_session(endpoint: str) -> subprocess.Popen:
    code = textwrap.dedent("""
        import sys, time, numpy as np
        from plugin_bridge.client import Client
        c = Client(sys.argv[1], autostart=False)
        s = c.open("spleeter-2stems", 44100, 2)
        s.push(np.zeros((2, 44100), np.float32))
        print("open", flush=True)
        time.sleep(600)
    """)
    return subprocess.Popen([sys.executable, "-c", code, endpoint], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "UNBAKE_ALLOW_ANY_LOCAL_USER": "1"})


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_a_killed_clients_session_is_freed_within_seconds(tmp_path, spleeter_repo, transport):
    """The TTL is the default 120 s: only the disconnect event can free it this soon."""
    endpoint = f"ipc://{tmp_path}/e.sock" if transport == "ipc" else f"tcp://127.0.0.1:{free_port()}"
    extra = ["--allow-any-local-user"] if transport == "tcp" else []
    with EngineProcess(endpoint, "--preload", MODEL, *extra, log=tmp_path / "log",
                       env={"UNBAKE_REPO": str(spleeter_repo)}) as proc:
        child = _client_holding_a_session(endpoint)
        try:
            assert child.stdout.readline().strip() == "open", child.stderr.read()
            assert proc.status()["sessions"] == 1
            child.send_signal(signal.SIGKILL)
            child.wait()
            t0 = time.monotonic()
            while proc.status()["sessions"]:
                assert time.monotonic() - t0 < 5.0, f"session not freed in 5 s: {proc.log_text()[-2000:]}"
                time.sleep(0.1)
            print(f"{transport}: freed {time.monotonic() - t0:.2f} s after SIGKILL")
            assert "left" in proc.log_text()
            assert proc.status()["models"][0]["sessions"] == 0
        finally:
            child.kill()


def test_overlap_near_one_and_tiny_segments_are_refused_naming_the_bound(tmp_path, spleeter_repo):
    with EngineProcess(f"ipc://{tmp_path}/e.sock", "--preload", MODEL, log=tmp_path / "log",
                       env={"UNBAKE_REPO": str(spleeter_repo)}) as proc, Peer(proc.endpoint) as peer:
        t0 = time.monotonic()
        err = peer.call(P.OPEN, sample_rate=44100, channels=2, model=MODEL, options={"overlap": 0.999999})
        assert err["code"] == "E_BAD_REQUEST" and "0.95" in err["message"], err
        err = peer.call(P.OPEN, sample_rate=44100, channels=2, model=MODEL, options={"segment_s": 0.001})
        assert err["code"] == "E_BAD_REQUEST" and "the limit is 50" in err["message"], err
        err = peer.call(P.OPEN, sample_rate=44100, channels=2, model=MODEL,
                        options={"segment_s": 0.1, "overlap": 0.9})
        assert err["code"] == "E_BAD_REQUEST" and "50 segments per second" in err["message"], err
        assert time.monotonic() - t0 < 5
        # the bound itself is served: 1 s of audio with overlap 0.95 in reasonable time
        ready = peer.call(P.OPEN, sample_rate=44100, channels=2, model=MODEL,
                          options={"overlap": 0.95, "segment_s": 2.0})
        assert ready["kind"] == "ready", ready
        t0 = time.monotonic()
        got = peer.replies(peer.request(P.PUSH, [clip(1.0)], session=ready["session"], channels=2, frames=44100))
        got += peer.replies(peer.request(P.CLOSE, session=ready["session"]))
        assert got[-1][0]["kind"] == "done" and got[-1][0]["frames_out"] == 44100
        assert time.monotonic() - t0 < 60
