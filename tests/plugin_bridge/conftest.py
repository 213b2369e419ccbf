"""A real engine daemon for the CLI tests: one process for the whole session, on a private socket.

``engine_endpoint`` starts ``python -m engine.daemon`` on ``ipc://<tmp>/engine.sock`` with the test
weights (UNBAKE_REPO) and stops it with SIGTERM at the end. In the CLI test modules
(``test_cli_*.py``) UNBAKE_ENDPOINT points at it, so `unbake separate` (daemon path by default) never
starts a daemon at the user's real per-user endpoint.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

START_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def engine_endpoint(spleeter_repo, tmp_path_factory):
    from engine.errors import UnbakeError
    from plugin_bridge.client import Client
    tmp = tmp_path_factory.mktemp("engine")
    endpoint = f"ipc://{tmp}/engine.sock"
    log = tmp / "engine.log"
    env = dict(os.environ, UNBAKE_REPO=str(spleeter_repo), UNBAKE_ENDPOINT=endpoint)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "engine.daemon", "--endpoint", endpoint,
                                 "--idle-exit-s", "900"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the engine daemon exited with status {proc.returncode} before answering:\n"
                            f"{log.read_text(errors='replace')[-4000:]}")
            try:
                with Client(endpoint, autostart=False, timeout_s=2, retries=0) as client:
                    client.hello()
                break
            except UnbakeError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the engine daemon did not answer at {endpoint} within {START_TIMEOUT_S:g} s:\n"
                                f"{log.read_text(errors='replace')[-4000:]}")
                time.sleep(0.2)
        yield endpoint
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module", autouse=True)
def _cli_uses_test_engine(request):
    """CLI tests talk to the test daemon (started on first use), never to the user's default endpoint.
    Module-scoped, so that it is in place before the modules' own module-scoped fixtures run."""
    if not request.node.path.name.startswith("test_cli_"):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNBAKE_ENDPOINT", request.getfixturevalue("engine_endpoint"))
        yield
