"""``unbake serve --ray``: the daemon as the front door, the forward passes on model replicas spread
over a real two-node Ray cluster (tests/ray_cluster.py). Outputs equal a local engine's exactly
(max |diff| 0), streaming and StemChain included; a replica killed mid-run loses no session; no
replica at all: E_UNAVAILABLE and the daemon keeps serving; no Ray: one line.

spleeter-2stems (real weights) on 12 s of a dev song. The local reference engine runs with one
torch thread, as each replica does.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from engine.errors import EngineUnavailable
from plugin_bridge.client import Client
from tests.engine.engine_proc import REPO, EngineProcess
from tests.ray_cluster import ray_env, two_node_cluster

pytestmark = pytest.mark.slow
MODEL = "spleeter-2stems"
STREAM_OPTIONS = {"segment_s": 1.0}  # many segments: many batches to spread and to kill in the middle of
STEM_CHAIN_OPTIONS = {"segment_s": 2.0}


@pytest.fixture(scope="module")
def cluster():
    with two_node_cluster(cpus_per_node=4) as address:  # logical CPUs: room for every engine's replicas
        yield address


@pytest.fixture(scope="module")
def song(eval_dir) -> tuple[np.ndarray, int]:
    data, sr = sf.read(str(eval_dir / "cristina-vane-so-easy" / "mixture.wav"), dtype="float32",
                       frames=12 * 44100, start=14 * 44100, always_2d=True)
    return np.ascontiguousarray(data.T), sr


@pytest.fixture(scope="module")
def engines(cluster, spleeter_repo, tmp_path_factory):
    """(ray engine with 2 replicas, local engine with 1 thread), both started as processes."""
    tmp = tmp_path_factory.mktemp("ray-serve")
    env = {"UNBAKE_REPO": str(spleeter_repo), **ray_env(cluster)}
    ray_engine = EngineProcess(f"ipc://{tmp}/ray.sock", "--ray", cluster, "--replicas", "2", "--preload", MODEL,
                               env=env, log=tmp / "ray.log").start(timeout_s=120)
    local = EngineProcess(f"ipc://{tmp}/local.sock", "--jobs", "1", env=env, log=tmp / "local.log").start()
    try:
        yield ray_engine, local
    finally:
        for e in (ray_engine, local):
            try:
                e.stop()
            except Exception:
                e.kill()


def _separate(endpoint: str, x: np.ndarray, sr: int, **options) -> dict[str, np.ndarray]:
    with Client(endpoint, timeout_s=120) as client:
        return client.separate(x, sr, MODEL, **options)


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_one_shot_equals_local_and_replicas_run_on_both_nodes(engines, song):
    ray_engine, local = engines
    x, sr = song
    for options in ({}, STREAM_OPTIONS):
        got, want = _separate(ray_engine.endpoint, x, sr, **options), _separate(local.endpoint, x, sr, **options)
        assert _max_diff(got, want) == 0.0, options
    st = ray_engine.status()
    assert st["device"] == "ray" and st["replicas"] and len(st["replicas"]) == 2
    assert len({r["node"] for r in st["replicas"]}) == 2  # SPREAD: one replica on each node
    assert all(r["device"] == "cpu" and r["threads"] == 1 for r in st["replicas"])
    assert all(r["served"] > 0 for r in st["replicas"])  # 12 s at 1 s segments: both took batches


def test_a_demucs_bag_from_a_session_weights_folder_equals_local(engines, tmp_path):
    """A bag of two HTDemucs (random weights, official package format) in a folder the session names
    (``Client(repo=...)``): the replicas load the same bag members from the same folder, by the name
    the front door loaded it by, with the session's segment override."""
    from tests.engine import demucs_fixtures as F
    ray_engine, local = engines
    repo = tmp_path / "bag-repo"
    F.write_package(F.make_htdemucs(seed=1), repo, F.SIG_HT_A)
    F.write_package(F.make_htdemucs(seed=2), repo, F.SIG_HT_B)
    F.write_bag(repo, "twobag", [F.SIG_HT_A, F.SIG_HT_B], weights=[[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    x = np.random.default_rng(3).standard_normal((2, 5 * 44100)).astype(np.float32) * 0.1
    outs = []
    for engine in (ray_engine, local):
        with Client(engine.endpoint, timeout_s=120, repo=str(repo)) as client:
            outs.append(client.separate(x, 44100, "twobag", segment_s=2.0))
    assert _max_diff(outs[0], outs[1]) == 0.0


def test_streaming_random_blocks_and_latency_equal_local(engines, song):
    ray_engine, local = engines
    x, sr = song
    outs, latencies = [], []
    for engine in (ray_engine, local):
        rng = np.random.default_rng(7)  # the same random blocks for both
        with Client(engine.endpoint, timeout_s=120) as client:
            stream = client.stream(MODEL, sr, 2, **STREAM_OPTIONS)
            latencies.append(stream.latency_samples)
            blocks, pos = [], 0
            while pos < x.shape[1]:
                n = int(rng.integers(1, 20000))
                blocks.append(stream.process(x[:, pos:pos + n]))
                pos += n
            blocks.append(stream.flush())
        outs.append({k: np.concatenate([b[k] for b in blocks], axis=1) for k in blocks[0]})
    assert latencies[0] == latencies[1] > 0
    assert _max_diff(outs[0], outs[1]) == 0.0


def test_stemchain_equals_local(engines, song):
    from pedalboard import Compressor, Reverb
    from plugin_bridge.stemchain import StemChain
    ray_engine, local = engines
    x, sr = song
    outs = []
    for engine in (ray_engine, local):
        with Client(engine.endpoint, timeout_s=120) as client:
            chain = StemChain({"vocals": Reverb(room_size=0.6), "accompaniment": Compressor(threshold_db=-20)},
                              MODEL, client=client, **STEM_CHAIN_OPTIONS)
            outs.append(chain(x, sr))
    assert outs[0].shape == x.shape
    assert float(np.abs(outs[0] - outs[1]).max()) == 0.0


def test_replica_killed_during_four_sessions(engines, song):
    """SIGKILL of a replica's worker process while 4 sessions run: every session completes and equals
    the local output; the killed replica's batches are counted as failed and redone elsewhere."""
    ray_engine, local = engines
    x, sr = song
    want = _separate(local.endpoint, x, sr, **STREAM_OPTIONS)
    before = {r["name"]: r for r in ray_engine.status()["replicas"]}
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = _separate(ray_engine.endpoint, x, sr, **STREAM_OPTIONS)
        except Exception as e:  # noqa: BLE001 - asserted below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    victim = before["unbake-replica-0"]
    deadline = time.monotonic() + 60
    while True:  # kill once the sessions are under way on the victim
        now = {r["name"]: r for r in ray_engine.status()["replicas"]}["unbake-replica-0"]
        if now["served"] >= victim["served"] + 3:
            break
        assert time.monotonic() < deadline, "the replica took no batch"
        time.sleep(0.05)
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(180)
    for i in range(4):
        assert not isinstance(results[i], Exception), results[i]
        assert _max_diff(results[i], want) == 0.0
    rows = {r["name"]: r for r in ray_engine.status()["replicas"]}
    assert rows["unbake-replica-0"]["failed"] >= 1
    # Ray restarts it: later work is served by a new worker process of the same replica
    deadline = time.monotonic() + 60
    while rows["unbake-replica-0"]["pid"] in (None, victim["pid"]):
        assert time.monotonic() < deadline, "the replica was not restarted"
        _separate(ray_engine.endpoint, x[:, :sr], sr)
        rows = {r["name"]: r for r in ray_engine.status()["replicas"]}


def test_no_replica_left_gives_unavailable_and_the_daemon_keeps_serving(cluster, spleeter_repo, song, tmp_path):
    import ray
    x, sr = song
    env = {"UNBAKE_REPO": str(spleeter_repo), **ray_env(cluster)}
    with EngineProcess(f"ipc://{tmp_path}/one.sock", "--ray", cluster, "--replicas", "1", env=env,
                       log=tmp_path / "one.log") as engine:
        assert _max_diff(_separate(engine.endpoint, x[:, :2 * sr], sr), _separate(engine.endpoint, x[:, :2 * sr], sr)) == 0
        namespace = engine.status()["ray_namespace"]
        ray.init(address=cluster, namespace=namespace, log_to_driver=False, logging_level="ERROR")
        try:
            ray.kill(ray.get_actor("unbake-replica-0"), no_restart=True)
        finally:
            ray.shutdown()
        t0 = time.monotonic()
        with pytest.raises(EngineUnavailable) as err:
            _separate(engine.endpoint, x[:, :2 * sr], sr)
        assert time.monotonic() - t0 < 30
        assert err.value.code == "E_UNAVAILABLE"
        assert "no model replica on the Ray cluster answers" in str(err.value) and "\n" not in str(err.value)
        st = engine.status()  # still serving
        assert st["replicas"][0]["failed"] >= 1


def _serve(*args: str, env: dict | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", "serve", *args], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout_s)


def test_without_ray_one_line(tmp_path):
    """No Ray installed (an import of ray that fails): exit 1, one line that says how to get it."""
    blocker = tmp_path / "noray"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ImportError('No module named ray')\n")
    r = _serve("--endpoint", f"ipc://{tmp_path}/e.sock", "--ray", "local",
               env={"PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["unbake serve: --ray needs Ray, an optional extra: pip install 'unbake[ray]'"]


def test_dead_address_one_line(tmp_path):
    t0 = time.monotonic()
    r = _serve("--endpoint", f"ipc://{tmp_path}/e.sock", "--ray", "127.0.0.1:1")
    assert r.returncode == 1 and time.monotonic() - t0 < 60
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unbake serve: --ray 127.0.0.1:1: cannot join a Ray cluster there"), lines


def test_replica_flags_need_ray(tmp_path):
    r = _serve("--endpoint", f"ipc://{tmp_path}/e.sock", "--replicas", "3")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["unbake serve: --replicas, --replica-gpus and --replica-threads go with --ray ADDRESS"]


def test_status_shows_the_replicas(engines):
    ray_engine, _ = engines
    r = subprocess.run([sys.executable, "-m", "plugin_bridge.cli", "status", "--endpoint", ray_engine.endpoint],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("model replicas on the Ray cluster at "))
    rows = lines[i + 2:i + 4]
    assert [row.split()[0] for row in rows] == ["unbake-replica-0", "unbake-replica-1"]
    assert all(row.split()[2] == "cpu" for row in rows)
