"""Issue 12 item 13: a slow reader (pushes for a long time, reads nothing) grew the engine by 650 MB
per 10 minutes, and at the send high-water mark replies were dropped silently (2,001 of 12,000 got
no terminal reply). Now what the engine holds for a client is bounded (its sessions pause while it
has replies unread, pushes past the queued-audio limits get E_QUEUE_FULL) and no reply is dropped
without a log line; another client's separation goes on meanwhile, within 2x its unloaded time."""
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np

from engine import protocol as P
from plugin_bridge.client import Client
from tests.conftest import REPO
from tests.engine.engine_proc import EngineProcess, Peer, proc_rss_mb

MODEL = "spleeter-2stems"
BUDGET_GB = 0.5
PUSH_S = 20  # how long the slow reader pushes

SLOW_READER = textwrap.dedent("""
    import sys, time, numpy as np, zmq
    from engine import protocol as P
    s = zmq.Context().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 2)
    s.connect(sys.argv[1])
    s.send_multipart(P.request(P.OPEN, 1, model="spleeter-2stems", sample_rate=44100, channels=2))
    while True:
        h = P.unpack_header(s.recv_multipart()[0], P.Limits())
        if h["kind"] in P.TERMINAL:
            break
    assert h["kind"] == "ready", h
    x = (0.1 * np.random.default_rng(0).standard_normal((2, 44100))).astype(np.float32)
    print("pushing", flush=True)
    t0, rid, sent = time.monotonic(), 2, 0
    while time.monotonic() - t0 < float(sys.argv[2]):   # 1 s of audio per push, never reading
        try:
            s.send_multipart(P.request(P.PUSH, rid, [x], session=h["session"], channels=2, frames=44100),
                             flags=zmq.NOBLOCK, copy=False)
            rid += 1
            sent += 1
            time.sleep(0.02)  # 50 s of audio per second, far faster than it is separated
        except zmq.Again:
            time.sleep(0.01)
    print("sent", sent, flush=True)
    time.sleep(600)
""")


def _separate_s(endpoint: str, x: np.ndarray) -> float:
    with Client(endpoint, autostart=False, timeout_s=60) as client:
        t0 = time.monotonic()
        stems = client.separate(x, 44100, model=MODEL)
        assert stems["vocals"].shape == x.shape
        return time.monotonic() - t0


def test_slow_reader_holds_bounded_memory_and_others_are_served(tmp_path, spleeter_repo):
    x = (0.1 * np.random.default_rng(1).standard_normal((2, 20 * 44100))).astype(np.float32)
    with EngineProcess(f"ipc://{tmp_path}/e.sock", "--preload", MODEL, "--memory-budget-gb", str(BUDGET_GB),
                       log=tmp_path / "log", env={"UNBAKE_REPO": str(spleeter_repo)}) as proc:
        unloaded = min(_separate_s(proc.endpoint, x) for _ in range(2))
        reader = subprocess.Popen([sys.executable, "-c", SLOW_READER, proc.endpoint, str(PUSH_S)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert reader.stdout.readline().strip() == "pushing", reader.stderr.read()
            rss = [proc_rss_mb(proc.proc.pid)]
            stop = threading.Event()

            def sample():
                while not stop.wait(0.2):
                    rss.append(proc_rss_mb(proc.proc.pid))
            sampler = threading.Thread(target=sample)
            sampler.start()
            time.sleep(PUSH_S / 2)
            loaded = [_separate_s(proc.endpoint, x) for _ in range(2)]
            reader.stdout.readline()  # "sent N": it stopped pushing (and still reads nothing)
            time.sleep(1)
            stop.set()
            sampler.join()
            status = proc.status()
            print(f"separation unloaded {unloaded:.2f} s, during the slow reader {loaded}; RSS max "
                  f"{max(rss):.0f} MB, peak {status['peak_rss_mb']} MB, unread {status['unread_mb']} MB, "
                  f"paused {status['clients_paused']}")
            assert min(loaded) <= 2 * unloaded + 0.2, (unloaded, loaded)
            assert status["peak_rss_mb"] < BUDGET_GB * 1024 + 500, status
            assert status["unread_mb"] < 64, status
            # its sessions paused while it had replies unread; flooding on, it was cut off, and said so
            assert status["clients_paused"] + status["clients_cut_off"] >= 1, status
            for line in proc.log_text().splitlines():
                if "cut off" in line:
                    assert "replies dropped" in line and "unread" in line, line
        finally:
            reader.kill()
            reader.wait()


def test_every_request_of_a_client_that_reads_late_gets_its_terminal_reply(tmp_path, spleeter_repo):
    """12,000 requests sent without reading, then read: 12,000 terminal replies (zmq's send
    high-water mark used to drop 2,001 of them silently)."""
    n = 12_000
    with EngineProcess(f"ipc://{tmp_path}/e.sock", "--preload", MODEL, log=tmp_path / "log",
                       env={"UNBAKE_REPO": str(spleeter_repo)}) as proc, Peer(proc.endpoint) as peer:
        peer.sock.setsockopt(zmq_RCVHWM(), 2)
        for i in range(n):
            peer.send(P.request(P.STATUS if i % 2 else P.HELLO, i + 1))
        time.sleep(3)  # the engine answers all of them meanwhile; this peer reads nothing yet
        answered = set()
        while len(answered) < n:
            header, _ = peer.recv(timeout_s=10)
            if header["kind"] in P.TERMINAL:
                assert header["re"] not in answered
                answered.add(header["re"])
        assert answered == set(range(1, n + 1))
        assert "dropped" not in proc.log_text()


def zmq_RCVHWM():
    import zmq
    return zmq.RCVHWM
