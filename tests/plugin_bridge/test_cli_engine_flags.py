"""Engine flags a running engine does not honour (`-d`, `--fp16`, `-j`, `--batch-segments`) are never
dropped silently: one warning line each says what the engine uses and how to get what was asked, and
the separation still runs on the engine as it is. Flags it honours print nothing."""
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from plugin_bridge.cli import engine_flag_warnings
from tests.engine.engine_proc import EngineProcess

MODEL = "spleeter-2stems"


def unbake(*args):
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def engine(spleeter_repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine-flags")
    with EngineProcess(f"ipc://{tmp}/e.sock", "-d", "cpu", "-j", "2", "--max-batch", "1",
                       env={"UNBAKE_REPO": str(spleeter_repo)}, log=tmp / "daemon.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "song.wav"
    x = 0.1 * np.random.default_rng(3).standard_normal((44100, 2))
    sf.write(str(path), x.astype(np.float32), 44100, subtype="FLOAT")
    return path


def expected(endpoint: str, pid: int, used: str, asked: str, flag: str, serve_flag: str) -> str:
    return (f"warning: the running engine at {endpoint} uses {used}, not {asked} ({flag}); stop it (kill {pid}) "
            f"so that this command starts one with {flag}, or start one with `unbake serve {serve_flag} "
            f"--endpoint ENDPOINT` and pass --endpoint ENDPOINT")


def test_each_flag_not_honoured_is_one_warning_line(engine, song, tmp_path):
    e, pid = engine.endpoint, engine.proc.pid
    r = unbake("separate", "--endpoint", e, "-n", MODEL, "-d", "cuda", "--fp16", "-j", "3", "--batch-segments", "4",
               "-q", "-o", tmp_path, song)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        expected(e, pid, "cpu", "cuda", "-d cuda", "-d cuda"),
        expected(e, pid, "float32", "float16", "--fp16", "--fp16"),
        expected(e, pid, "2 CPU threads", "3", "-j 3", "-j 3"),
        expected(e, pid, "1 segment(s) per forward pass", "4", "--batch-segments 4", "--max-batch 4"),
    ]
    assert sorted(p.name for p in (tmp_path / MODEL / "song").iterdir()) == ["accompaniment.wav", "vocals.wav"]


def test_flags_the_engine_honours_print_nothing(engine, song, tmp_path):
    r = unbake("separate", "--endpoint", engine.endpoint, "-n", MODEL, "-d", "cpu", "-j", "2", "--batch-segments",
               "1", "-q", "-o", tmp_path, song)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


def test_bounce_warns_the_same_way(engine, song, tmp_path):
    e, pid = engine.endpoint, engine.proc.pid
    r = unbake("bounce", "--endpoint", e, "-n", MODEL, "-d", "cuda:1", "--fp16", "-q", "-o", tmp_path, song)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [expected(e, pid, "cpu", "cuda:1", "-d cuda:1", "-d cuda:1"),
                                     expected(e, pid, "float32", "float16", "--fp16", "--fp16")]


@pytest.mark.parametrize("asked, used, ok", [("cuda", "cuda", True), ("cuda", "cuda:1", True),
                                             ("cuda:0", "cuda", True), ("cuda:1", "cuda", False),
                                             ("cuda:1", "cuda:1", True), ("cpu", "cuda", False),
                                             ("CPU", "cpu", True), ("auto", "mps", True), ("mps", "cpu", False)])
def test_device_equivalence(asked, used, ok):
    hello = {"device": used, "pid": 42}
    lines = engine_flag_warnings(hello, "ipc:///x", device=asked)
    assert len(lines) == (0 if ok else 1), lines


def test_an_engine_that_does_not_state_a_setting_is_warned_about():
    lines = engine_flag_warnings({"device": "cpu"}, "ipc:///x", fp16=True, jobs=2, batch_segments=3)
    assert [line.split(";")[0] for line in lines] == [
        "the running engine at ipc:///x uses an unstated precision, not float16 (--fp16)",
        "the running engine at ipc:///x uses unstated CPU threads, not 2 (-j 2)",
        "the running engine at ipc:///x uses an unstated batch size, not 3 (--batch-segments 3)"]
    assert all("`unbake status` shows its pid" in line for line in lines)


def test_cpu_runtime_of_the_running_engine():
    hello = {"device": "cpu", "cpu_runtime": "torch", "pid": 42}
    assert engine_flag_warnings(hello, "ipc:///x", cpu_runtime="torch") == []
    lines = engine_flag_warnings(hello, "ipc:///x", cpu_runtime="onnx")
    assert lines == ["the running engine at ipc:///x uses the torch CPU runtime, not onnx (--cpu-runtime onnx); "
                     "stop it (kill 42) so that this command starts one with --cpu-runtime onnx, or start one with "
                     "`unbake serve --cpu-runtime onnx --endpoint ENDPOINT` and pass --endpoint ENDPOINT"]
    assert engine_flag_warnings({"device": "cpu"}, "ipc:///x", cpu_runtime="torch") == []  # older: torch
    assert len(engine_flag_warnings({"device": "cpu"}, "ipc:///x", cpu_runtime="onnx")) == 1
