"""`unbake bounce --ray ADDRESS` end to end: the real command (a subprocess) on a real two-node Ray
cluster (``tests.ray_cluster.two_node_cluster``: two raylets on this machine, one CPU each), model
spleeter-2stems with its real weights.

Inputs: the three songs of real-dev-v1, read where they are in ../shared, plus six excerpts of them
(8 s or less, from 0 s and from 3 s) written to tmp (never into the repository): nine inputs. Both
nodes run on this machine, so "storage every node sees" holds for every path except one hidden from
the Ray nodes in a private mount namespace (``unshare -m``, a tmpfs only the driver sees).

The local reference is `unbake bounce` of the same inputs through the session's test engine (torch's
default threads; the workers run 1 thread each: the 16-bit stems are bit-identical all the same).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import soundfile as sf

from engine.raycluster import RAY_MISSING
from tests.conftest import REPO
from tests.plugin_bridge.test_cli_bounce import partials, rows
from tests.ray_cluster import ray_env, two_node_cluster

MODEL = "spleeter-2stems"
SONGS = ("bearlin-roads", "cristina-vane-so-easy", "music-delta-80s-rock")
EXCERPT_S, SR = 8, 44100
# sidecar fields that legitimately differ between two bounces of the same input (everything else,
# engine_version and device included, must be equal; output paths are compared relative to OUT)
VARYING = ("seconds", "finished_utc")
VARYING_PER_OUTPUT = ("mtime_ns", "path")


def unbake(*args, env=None, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env=env, **kw)


def files(out: Path) -> dict[str, bytes]:
    """{path relative to out: bytes} of every stem file."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.wav"))}


def sidecar_view(out: Path) -> dict[str, dict]:
    """{relative path: sidecar} with the VARYING fields left out and output paths made relative."""
    views = {}
    for p in sorted(out.rglob("bounce.json")):
        side = json.loads(p.read_text())
        for k in VARYING:
            assert k in side
            side.pop(k)
        for rec in [*side["stems"].values(), *([side["remix"]] if side["remix"] else [])]:
            assert Path(rec["path"]).is_relative_to(out.resolve())
            rec["relpath"] = str(Path(rec["path"]).relative_to(out.resolve()))
            for k in VARYING_PER_OUTPUT:
                rec.pop(k)
        views[str(p.relative_to(out))] = side
    return views


def worker_lines(stderr: str) -> dict[int, dict]:
    """{worker: {node, pid, daemon_pid}} from the ``ray: worker K on node N (pid P, engine pid D`` lines."""
    out = {}
    for line in stderr.splitlines():
        if line.startswith("ray: worker ") and " on node " in line and "(pid " in line:
            w = int(line.split()[2])
            node = line.split(" on node ")[1].split()[0]
            pid = int(line.split("(pid ")[1].split(",")[0])
            daemon = int(line.split("engine pid ")[1].split(",")[0])
            out[w] = {"node": node, "pid": pid, "daemon_pid": daemon}
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster():
    with two_node_cluster() as address:
        yield address


@pytest.fixture(scope="module")
def inputs(eval_dir, tmp_path_factory) -> list[Path]:
    """The three songs in ../shared and six excerpts of them in tmp (see the module docstring)."""
    root = tmp_path_factory.mktemp("excerpts")
    out = [eval_dir / s / "mixture.wav" for s in SONGS]
    for k in range(6):
        song, start = SONGS[k % 3], 3 * (k // 3)
        data, sr = sf.read(str(eval_dir / song / "mixture.wav"), dtype="float32", start=start * SR,
                           frames=EXCERPT_S * SR)
        path = root / f"{song}-{start}s.wav"
        sf.write(str(path), data, sr, subtype="PCM_16")
        out.append(path)
    return out


@pytest.fixture(scope="module")
def env(cluster, spleeter_repo, tmp_path_factory) -> dict:
    """The driver's environment: the cluster, the test weights, a private engine endpoint (unused by
    --ray, which starts one engine per worker; set so nothing reaches the user's default one)."""
    sock = tmp_path_factory.mktemp("no-engine") / "engine.sock"
    return dict(os.environ, **ray_env(cluster), UNBAKE_REPO=str(spleeter_repo), UNBAKE_ENDPOINT=f"ipc://{sock}")


@pytest.fixture(scope="module")
def local(inputs, engine_endpoint, spleeter_repo, tmp_path_factory):
    """The reference: `unbake bounce INPUTS -n spleeter-2stems -o OUT` through the test engine."""
    from plugin_bridge.client import Client
    with Client(engine_endpoint, autostart=False, timeout_s=60) as c:
        c.open(MODEL, 44100, 2).cancel()  # the model warm, as in the workers after they start
    out = tmp_path_factory.mktemp("local")
    t0 = time.perf_counter()
    r = unbake("bounce", *inputs, "-n", MODEL, "-o", out, "-q",
               env=dict(os.environ, UNBAKE_ENDPOINT=engine_endpoint, UNBAKE_REPO=str(spleeter_repo)))
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    print(f"\nlocal bounce of {len(inputs)} inputs: {seconds:.1f} s")
    return out


@pytest.fixture(scope="module")
def ray_run(cluster, env, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray")
    t0 = time.perf_counter()
    r = unbake("bounce", "--ray", cluster, *inputs, "-n", MODEL, "-o", out, env=env)
    seconds = time.perf_counter() - t0
    print(f"\nbounce --ray of {len(inputs)} inputs on 2 workers: {seconds:.1f} s (with the workers' start)")
    return out, r


def test_ray_bounce_equals_the_local_bounce_and_uses_both_nodes(ray_run, local, inputs):
    out, r = ray_run
    assert r.returncode == 0, r.stderr
    got = rows(r.stdout)
    assert len(got) == len(inputs) and all(s == "ok" for s, _ in got.values()), r.stdout
    assert r.stdout.splitlines()[-1].startswith(f"{len(inputs)} ok, 0 skipped, 0 failed")
    progress = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in progress] == [f"[{k}/{len(inputs)}" for k in range(1, len(inputs) + 1)]
    mine, theirs = files(out), files(local)
    assert len(mine) == 2 * len(inputs) and mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name] == theirs[name], f"{name} differs from the local bounce"
    assert sidecar_view(out) == sidecar_view(local)
    workers = worker_lines(r.stderr)
    assert len({w["node"] for w in workers.values()}) == 2, r.stderr
    per_node = [line for line in r.stderr.splitlines() if line.startswith("ray: node ")]
    assert len(per_node) == 2 and sum(int(line.split(": ")[2].split()[0]) for line in per_node) == len(inputs)
    assert partials(out) == [] and not any(p.name.startswith(".unbake-ray-check") for p in out.iterdir())
    for w in workers.values():  # the workers and their engines are gone once the command returns
        assert not alive(w["daemon_pid"])


def test_a_worker_killed_mid_run_its_inputs_are_redone_and_a_second_run_skips_all(cluster, env, inputs, local,
                                                                                  tmp_path):
    """SIGKILL the worker that holds a stem's .partial file open (deterministic: it is bouncing)."""
    out, err = tmp_path / "out", tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "plugin_bridge.cli", "bounce", "--ray", cluster, *inputs,
                                 "-n", MODEL, "-o", out], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=f,
                                text=True)
    killed, held = None, None
    deadline = time.monotonic() + 180
    try:
        while killed is None:
            assert proc.poll() is None, f"finished before a worker could be killed: {err.read_text()}"
            assert time.monotonic() < deadline, f"no worker held a partial file: {err.read_text()}"
            workers = worker_lines(err.read_text())
            sidecars_done = len(list(out.rglob("bounce.json"))) if out.is_dir() else 0
            for w in workers.values() if len(workers) == 2 and sidecars_done >= 1 else ():
                try:
                    fds = [os.readlink(f"/proc/{w['pid']}/fd/{fd}") for fd in os.listdir(f"/proc/{w['pid']}/fd")]
                except OSError:
                    continue
                held = [p for p in fds if ".partial" in p and p.startswith(str(out))]
                if held:
                    os.kill(w["pid"], signal.SIGKILL)
                    killed = w
                    break
            time.sleep(0.01)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.read_text()
    assert proc.returncode == 0, stderr
    assert any(line.startswith("ray: worker ") and " died " in line for line in stderr.splitlines()), stderr
    got = rows(stdout)
    assert len(got) == len(inputs) and all(s == "ok" for s, _ in got.values()), stdout
    assert partials(out) == [] and not any(Path(p).exists() for p in held)
    assert not alive(killed["daemon_pid"]), "the killed worker's engine outlived it"
    assert not list(Path(tempfile.gettempdir()).glob(f"unbake-bounce-{killed['pid']}-*")), "its folder was left"
    mine, theirs = files(out), files(local)
    assert mine.keys() == theirs.keys() and all(mine[k] == theirs[k] for k in mine)
    assert sidecar_view(out) == sidecar_view(local)

    again = unbake("bounce", "--ray", cluster, *inputs, "-n", MODEL, "-o", out, "-q", env=env)
    assert again.returncode == 0, again.stderr
    assert [s for s, _ in rows(again.stdout).values()] == ["skipped"] * len(inputs), again.stdout


def test_an_input_no_ray_node_sees_fails_in_one_line_and_the_others_are_ok(cluster, env, inputs, tmp_path):
    """The driver runs in a private mount namespace with a tmpfs on HIDDEN: it sees HIDDEN/only-here.wav,
    the Ray nodes (outside the namespace) see an empty folder."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    if subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -m (a private mount namespace) to hide a file from the Ray nodes")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "plugin_bridge.cli", "bounce", "--ray", cluster, str(hidden / "only-here.wav"),
           str(inputs[2]), "-n", MODEL, "-o", str(out), "-q"]
    script = (f'mount -t tmpfs none "{hidden}" && cp "{inputs[-1]}" "{hidden}/only-here.wav" && exec '
              + " ".join(f'"{c}"' for c in cmd))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    got = rows(r.stdout)
    status, error = got[str(hidden / "only-here.wav")]
    assert status == "failed" and error.startswith("no such file on Ray node ")
    assert error.endswith("(bounce --ray needs inputs on storage every node sees)")
    assert got[str(inputs[2])][0] == "ok"
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: {hidden / 'only-here.wav'}: {error}"]
    assert not (hidden / "only-here.wav").exists()  # outside the namespace: never there


def test_an_output_folder_no_ray_node_sees_stops_the_run_in_one_line(cluster, env, inputs, tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    if subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -m (a private mount namespace) to hide a folder from the Ray nodes")
    cmd = [sys.executable, "-m", "plugin_bridge.cli", "bounce", "--ray", cluster, str(inputs[2]), "-n", MODEL,
           "-o", str(hidden / "out"), "-q"]
    script = f'mount -t tmpfs none "{hidden}" && exec ' + " ".join(f'"{c}"' for c in cmd)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert r.stderr.startswith("error: --ray: Ray node ") and r.stderr.count("\n") == 1, r.stderr
    assert f"does not see the output folder {hidden / 'out'}" in r.stderr


def test_without_ray_it_says_how_to_install_it_in_one_line(tmp_path, inputs):
    """`import ray` fails (a ray.py that raises ImportError first on PYTHONPATH)."""
    (tmp_path / "ray.py").write_text("raise ImportError('No module named ray')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)]),
               UNBAKE_ENDPOINT=f"ipc://{tmp_path}/engine.sock")
    r = unbake("bounce", "--ray", "auto", inputs[2], "-o", tmp_path / "out", env=env)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", f"error: {RAY_MISSING}\n")
    assert not (tmp_path / "out").exists()


def test_a_dead_address_is_one_line_at_once(tmp_path, inputs):
    env = dict(os.environ, UNBAKE_ENDPOINT=f"ipc://{tmp_path}/engine.sock")
    t0 = time.monotonic()
    r = unbake("bounce", "--ray", "127.0.0.1:1", inputs[2], "-o", tmp_path / "out", env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: --ray 127.0.0.1:1: cannot join a Ray cluster there")
    assert time.monotonic() - t0 < 30


def test_worker_flags_need_ray(tmp_path, inputs):
    r = unbake("bounce", "--workers", "2", inputs[2], "-o", tmp_path / "out",
               env=dict(os.environ, UNBAKE_ENDPOINT=f"ipc://{tmp_path}/engine.sock"))
    assert (r.returncode, r.stderr) == (1, "error: --workers, --worker-threads and --worker-gpus go with --ray ADDRESS\n")


def test_workers_that_find_no_room_are_waited_for_a_while_then_left_to_join_later(cluster, env, inputs, tmp_path):
    """--workers 3 on two 1-CPU nodes: the third never starts; the run goes on with two and says so."""
    r = unbake("bounce", "--ray", cluster, "--workers", "3", *inputs[:3], "-n", MODEL, "-o", tmp_path / "out", env=env)
    assert r.returncode == 0, r.stderr
    assert [s for s, _ in rows(r.stdout).values()] == ["ok"] * 3
    assert len(worker_lines(r.stderr)) == 2
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --ray: 1 of 3 workers not started after "), r.stderr
