"""The daemon's life: preload before ready, one daemon per endpoint, SIGTERM finishes work in flight
and removes the socket, idle exit, status."""
import os
import signal
import time

import numpy as np

from engine import protocol as P
from tests.engine.engine_proc import EngineProcess, Peer


def _engine(tmp_path, spleeter_repo, *args):
    return EngineProcess(f"ipc://{tmp_path}/e.sock", *args, env={"UNBAKE_REPO": str(spleeter_repo)},
                         log=tmp_path / "daemon.log")


def test_preloaded_model_is_warm_before_ready_and_status_reports_it(tmp_path, spleeter_repo):
    with _engine(tmp_path, spleeter_repo, "--preload", "spleeter-2stems") as proc:
        status = proc.status()
        assert status["kind"] == "status"
        [model] = status["models"]
        assert model["name"] == "spleeter-2stems" and model["loaded"] and 70 < model["memory_mb"] < 80
        assert status["sessions"] == 0 and status["queue_depth"] == 0 and status["pid"] == proc.proc.pid
        assert "spleeter-2stems loaded and warmed up" in proc.log_text()
        with Peer(proc.endpoint) as peer:
            ready = peer.call(P.OPEN, sample_rate=44100, channels=2)  # no model: the default one
            assert ready["model"] == "spleeter-2stems" and ready["stems"] == ["vocals", "accompaniment"]
            assert proc.status()["sessions"] == 1
            assert peer.call(P.CANCEL, session=ready["session"])["kind"] == "done"
        after = proc.status()
        assert after["sessions"] == 0 and after["served"] >= 4


def test_one_daemon_per_endpoint(tmp_path, spleeter_repo):
    with _engine(tmp_path, spleeter_repo) as first:
        second = _engine(tmp_path, spleeter_repo)
        second.start(wait=False)
        assert second.proc.wait(60) == 3
        assert "already serves" in second.log_text()
        assert first.status()["pid"] == first.proc.pid  # the first one is untouched


def test_sigterm_finishes_work_in_flight_then_exits_cleanly(tmp_path, spleeter_repo):
    proc = _engine(tmp_path, spleeter_repo, "--preload", "spleeter-2stems").start()
    try:
        with Peer(proc.endpoint) as peer:
            ready = peer.call(P.OPEN, sample_rate=44100, channels=2, options={"segment_s": 5.0})
            x = np.random.default_rng(0).standard_normal((2, 20 * 44100)).astype(np.float32) * 0.1
            rid = peer.request(P.PUSH, [x], session=ready["session"], channels=2, frames=x.shape[1])
            time.sleep(0.05)
            proc.proc.send_signal(signal.SIGTERM)
            replies = peer.replies(rid, timeout_s=30)
            assert replies[-1][0]["kind"] == "done", replies[-1][0]
            out = sum(h["frames"] for h, _ in replies if h["kind"] == "stems")
            assert out >= x.shape[1] - ready["latency_samples"]
        assert proc.proc.wait(30) == 0
        assert not os.path.exists(f"{tmp_path}/e.sock")
        assert "stopped" in proc.log_text()
    finally:
        proc.kill()


def test_idle_exit(tmp_path, spleeter_repo):
    proc = _engine(tmp_path, spleeter_repo, "--idle-exit-s", "1").start()
    try:
        t0 = time.monotonic()
        assert proc.proc.wait(30) == 0
        assert time.monotonic() - t0 < 10
        assert "no client for 1 s" in proc.log_text()
    finally:
        proc.kill()
