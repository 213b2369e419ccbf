"""Issue 12 item 14: SIGTERM with sessions running. One client got "the engine is shutting down",
another no reply at all, because messages still in the socket were never answered. Every request
received before exit now gets its terminal reply: the work in flight finishes (or is told the engine
is shutting down), and what is still in the socket is read and answered before the engine exits."""
import signal
import threading
import time

import numpy as np

from engine import protocol as P
from tests.engine.engine_proc import EngineProcess, Peer

MODEL = "spleeter-2stems"
HELLOS = 3000


def test_sigterm_answers_every_request_received_before_exit(tmp_path, spleeter_repo):
    x = (0.1 * np.random.default_rng(0).standard_normal((2, 5 * 44100))).astype(np.float32)
    with EngineProcess(f"ipc://{tmp_path}/e.sock", "--preload", MODEL, log=tmp_path / "log",
                       env={"UNBAKE_REPO": str(spleeter_repo)}) as proc:
        streams = [Peer(proc.endpoint) for _ in range(2)]   # sessions with pushes in flight
        chatty = [Peer(proc.endpoint) for _ in range(3)]    # bursts of requests
        sent: dict[int, list[int]] = {}
        for peer in streams:
            session = peer.call(P.OPEN, sample_rate=44100, channels=2, model=MODEL)["session"]
            sent[id(peer)] = [peer.request(P.PUSH, [x], session=session, channels=2, frames=x.shape[1])
                              for _ in range(3)] + [peer.request(P.CLOSE, session=session)]
        for peer in chatty:
            sent[id(peer)] = [peer.request(P.HELLO if i % 3 else P.STATUS) for i in range(HELLOS)]
        proc.proc.send_signal(signal.SIGTERM)  # every request above was sent before this
        answers: dict[int, dict[int, dict]] = {}

        def collect(peer):
            got = answers.setdefault(id(peer), {})
            want = set(sent[id(peer)])
            try:
                while not want <= set(got):
                    header, _ = peer.recv(timeout_s=15)
                    if header["kind"] in P.TERMINAL:
                        assert header["re"] not in got, header
                        got[header["re"]] = header
            except TimeoutError:
                pass
        threads = [threading.Thread(target=collect, args=(p,)) for p in streams + chatty]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert proc.proc.wait(30) == 0, proc.log_text()[-2000:]
        for peer in streams + chatty:
            missing = set(sent[id(peer)]) - set(answers[id(peer)])
            assert not missing, f"{len(missing)} of {len(sent[id(peer)])} requests got no reply: {proc.log_text()[-1500:]}"
            for header in answers[id(peer)].values():
                assert header["kind"] != "error" or header["code"] == "E_UNAVAILABLE", header
        kinds = [h["kind"] for p in streams for h in answers[id(p)].values()]
        print("stream replies:", {k: kinds.count(k) for k in set(kinds)})
        for peer in streams + chatty:
            peer.close()
