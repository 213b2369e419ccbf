"""Faults: a client killed mid-session, the daemon killed mid-request, a daemon restart under a
retrying one-shot, and several tools starting the embedded daemon at the same moment."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from engine.errors import EngineUnavailable
from plugin_bridge.client import Client
from tests.conftest import REPO
from tests.engine.engine_proc import EngineProcess


def _engine(tmp_path, spleeter_repo, *args, name="e"):
    return EngineProcess(f"ipc://{tmp_path}/{name}.sock", "--preload", "spleeter-2stems", *args,
                         env={"UNBAKE_REPO": str(spleeter_repo)}, log=tmp_path / f"{name}.log")


def _script(code: str, *args: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_killed_client_session_is_freed_within_ttl(tmp_path, spleeter_repo):
    ttl = 2.0
    with _engine(tmp_path, spleeter_repo, "--session-ttl-s", str(ttl)) as engine:
        child = _script("""
            import sys, time, numpy as np
            from plugin_bridge.client import Client
            c = Client(sys.argv[1], autostart=False)
            s = c.open("spleeter-2stems", 44100, 2)
            s.push(np.zeros((2, 44100), np.float32))
            print("open", flush=True)
            time.sleep(600)
        """, engine.endpoint)
        try:
            assert child.stdout.readline().strip() == "open", child.stderr.read()
            assert engine.status()["sessions"] == 1
            child.send_signal(signal.SIGKILL)
            child.wait()
            t0 = time.monotonic()
            while engine.status()["sessions"]:
                assert time.monotonic() - t0 < ttl + 2.0, "session not freed within the TTL"
                time.sleep(0.1)
            status = engine.status()
            assert status["queue_depth"] == 0 and status["models"][0]["sessions"] == 0
            # freed when its process ended (the disconnect event, engine.clients.Clients.probe), else by the TTL
            assert "left (process" in engine.log_text() or "idle for 2 s" in engine.log_text()
        finally:
            child.kill()


def test_daemon_killed_mid_request_raises_engine_unavailable_in_time(tmp_path, spleeter_repo):
    engine = _engine(tmp_path, spleeter_repo).start()
    try:
        with Client(engine.endpoint, autostart=False, timeout_s=2.0, retries=0) as client:
            session = client.open("spleeter-2stems", 44100, 2)
            engine.proc.send_signal(signal.SIGSTOP)  # the request below is surely in flight
            ticket = session.send_push(np.zeros((2, 44100), np.float32))
            engine.proc.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(EngineUnavailable, match="2"):
                session.receive(ticket)
            assert time.monotonic() - t0 < 2.0 + 1.0
            with pytest.raises(EngineUnavailable):  # and nothing hangs afterwards either
                client.status()
    finally:
        engine.kill()


def test_one_shot_survives_a_daemon_restart(tmp_path, spleeter_repo, spleeter):
    from engine.sessions import separate_array
    rng = np.random.default_rng(3)
    mix = (0.1 * rng.standard_normal((2, 3 * 44100))).astype(np.float32)
    want = separate_array(spleeter, mix, 44100)
    first = _engine(tmp_path, spleeter_repo).start()
    second = _engine(tmp_path, spleeter_repo)
    try:
        result = {}
        with Client(first.endpoint, autostart=False, timeout_s=2.0, retries=3) as client:
            client.hello()
            first.proc.send_signal(signal.SIGSTOP)  # the one-shot is sent to a daemon that dies

            def run():
                try:
                    result["stems"] = client.separate(mix, 44100, "spleeter-2stems")
                except Exception as e:  # reported below
                    result["error"] = e
            worker = threading.Thread(target=run)
            worker.start()
            time.sleep(0.5)
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait()
            second.start()
            worker.join(60)
        assert "error" not in result, result.get("error")
        for name in want:
            assert float(np.abs(result["stems"][name] - want[name]).max()) <= 1e-5
        assert second.status()["served"] >= 3  # open, push, close were redone there
    finally:
        first.kill()
        second.kill()


def test_tools_started_together_share_one_embedded_daemon(tmp_path, spleeter_repo):
    endpoint = f"ipc://{tmp_path}/auto.sock"
    env = {"UNBAKE_REPO": str(spleeter_repo), "UNBAKE_ENDPOINT": endpoint, "XDG_RUNTIME_DIR": str(tmp_path)}
    code = """
        import numpy as np
        from plugin_bridge.client import Client
        with Client(timeout_s=30) as c:
            out = c.separate(np.zeros((2, 22050), np.float32), 44100, "spleeter-2stems")
            assert out["vocals"].shape == (2, 22050)
            print(c.status()["pid"], flush=True)
    """
    tools = [_script(code, env=env) for _ in range(3)]
    pids = set()
    try:
        for tool in tools:
            out, err = tool.communicate(timeout=180)
            assert tool.returncode == 0, err
            pids.add(int(out.strip()))
        assert len(pids) == 1, pids
        daemons = subprocess.run(["pgrep", "-f", f"engine.daemon --endpoint {endpoint}"],
                                 capture_output=True, text=True).stdout.split()
        assert [int(p) for p in daemons] == list(pids)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for tool in tools:
            tool.kill()
