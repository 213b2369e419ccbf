"""`unbake separate --repo DIR` against an engine that is already running and was started without
--repo: the model in DIR is used (equal to --in-process), its files are verified as usual, bad
folders are the usual one-line errors, and an engine on TCP refuses in one line.

Each test talks to an engine of this module (``--endpoint``), never the shared test engine.
"""
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import read
from tests.engine import demucs_fixtures as fx
from tests.engine.engine_proc import EngineProcess

NAME = "mine"
SIG = "5eed2a01"


def unbake(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights") / "mine-repo"
    fx.write_package(fx.make_htdemucs(seed=11), folder, SIG)
    fx.write_bag(folder, NAME, [SIG])
    return folder


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "song.wav"
    rng = np.random.default_rng(5)
    t = np.arange(2 * 44100) / 44100
    x = 0.2 * np.sin(2 * np.pi * 220 * t)[:, None] + 0.05 * rng.standard_normal((t.size, 2))
    sf.write(str(path), x.astype(np.float32), 44100, subtype="FLOAT")
    return path


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """Running before any `unbake separate`, without --repo; its own weights folder is empty."""
    tmp = tmp_path_factory.mktemp("engine")
    own = tmp / "own"
    own.mkdir()
    with EngineProcess(f"ipc://{tmp}/e.sock", "-d", "cpu", env={"UNBAKE_REPO": str(own)},
                       log=tmp / "daemon.log") as proc:
        yield proc


def test_repo_model_through_a_running_engine_equals_in_process(engine, repo, song, tmp_path):
    r = unbake("separate", "--endpoint", engine.endpoint, "-n", NAME, "--repo", repo, "-o", tmp_path / "d",
               "--float32", song)
    assert r.returncode == 0, r.stderr
    assert f"model {NAME} from {repo} on cpu (engine at {engine.endpoint})" in r.stderr
    r = unbake("separate", "--in-process", "-d", "cpu", "-n", NAME, "--repo", repo, "-o", tmp_path / "p",
               "--float32", "-q", song)
    assert r.returncode == 0, r.stderr
    mix, _ = read(song)
    for stem in fx.SOURCES:
        via, sr_d = read(tmp_path / "d" / NAME / "song" / f"{stem}.wav")
        local, sr_p = read(tmp_path / "p" / NAME / "song" / f"{stem}.wav")
        assert sr_d == sr_p == 44100 and via.shape == local.shape == mix.shape
        diff = float(np.abs(via - local).max())
        assert diff <= 1e-5, (stem, diff)
    assert float(np.abs(via).max()) > 1e-3  # not silence
    # the engine's own folder did not change: without --repo the model is unknown to it
    r = unbake("separate", "--endpoint", engine.endpoint, "-n", NAME, "-o", tmp_path / "x", song)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"error: unknown model '{NAME}'"), line


def test_a_relative_repo_is_the_callers_folder(engine, repo, song, tmp_path):
    r = unbake("separate", "--endpoint", engine.endpoint, "-n", NAME, "--repo", repo.name, "-o", tmp_path / "o",
               "-q", song, cwd=repo.parent)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "o" / NAME / "song").iterdir()) == sorted(f"{s}.wav" for s in fx.SOURCES)


def test_bad_repos_are_one_line_each(engine, repo, song, tmp_path):
    missing = tmp_path / "no-such-folder"
    r = unbake("separate", "--endpoint", engine.endpoint, "-n", NAME, "--repo", missing, "-o", tmp_path / "o", song)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"error: unknown model '{NAME}'") and str(missing) in line, line
    r = unbake("separate", "--endpoint", engine.endpoint, "-n", "htdemucs", "--repo", missing, "-o", tmp_path / "o",
               song)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("error: htdemucs: weights not installed (") and "unbake fetch htdemucs" in line, line
    tampered = tmp_path / "tampered"
    path = fx.write_package(fx.make_htdemucs(seed=12), tampered, "5eed2b02")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    fx.write_bag(tampered, NAME, ["5eed2b02"])
    r = unbake("separate", "--endpoint", engine.endpoint, "-n", NAME, "--repo", tampered, "-o", tmp_path / "o", song)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: sha256 mismatch: file name says "), line
    assert not (tmp_path / "o").exists()
    assert engine.status()["sessions"] == 0


def test_an_engine_on_tcp_refuses_a_repo_in_one_line(repo, song, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with EngineProcess(endpoint, "-d", "cpu", "--allow-any-local-user", env={"UNBAKE_REPO": str(tmp_path)},
                       log=tmp_path / "log") as proc:
        r = unbake("separate", "--endpoint", endpoint, "-n", NAME, "--repo", repo, "-o", tmp_path / "o", song)
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [
            f"error: --repo {repo}: the engine at {endpoint} does not open folders its peers name (only peers of "
            f"its own ipc:// socket may); use an engine on an ipc:// endpoint, or start one with "
            f"`unbake serve --repo {repo}`"]
        assert not (tmp_path / "o").exists()
        assert proc.status()["kind"] == "status" and proc.proc.poll() is None  # still serving
