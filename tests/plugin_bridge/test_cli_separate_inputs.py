"""Inputs of `unbake separate` that cannot be separated at all: a folder is one line ("is a folder",
pointing at `unbake bounce`, which searches folders), and when no input can be separated no engine
is started or contacted (and no model loaded in process)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

MODEL = "spleeter-2stems"


def unbake(*args, env=None):
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env)


def processes_mentioning(text: str) -> list[int]:
    """pids of running processes whose command line contains ``text``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def folder_line(path: Path) -> str:
    return (f"error: {path}: is a folder; `unbake separate` takes audio files (`unbake bounce {path}` "
            f"separates every audio file in a folder)")


@pytest.fixture
def song(tmp_path):
    path = tmp_path / "song.wav"
    sf.write(str(path), (0.1 * np.random.default_rng(1).standard_normal((22050, 2))).astype(np.float32), 44100,
             subtype="FLOAT")
    return path


def test_a_folder_is_one_line_and_the_other_files_are_separated(song, spleeter_repo, tmp_path):
    folder = tmp_path / "album"
    folder.mkdir()
    sf.write(str(folder / "inside.wav"), np.zeros((100, 2), np.float32), 44100)
    r = unbake("separate", "-n", MODEL, "-q", "-o", tmp_path / "out", folder, song)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [folder_line(folder), "error: 1 of 2 file(s) failed"]
    assert sorted(p.name for p in (tmp_path / "out" / MODEL).iterdir()) == ["song"]  # not "album", not "inside"


@pytest.mark.parametrize("path", [(), ("--in-process",)])
def test_no_engine_is_started_when_no_input_can_be_separated(tmp_path, path):
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    endpoint = f"ipc://{tmp_path}/fresh/engine.sock"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "UNBAKE_ENDPOINT": endpoint}
    text = tmp_path / "notes.wav"
    text.write_text("not audio\n" * 50)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    missing = tmp_path / "missing.wav"
    r = unbake("separate", *path, "-n", MODEL, "-o", tmp_path / "out", missing, folder, text, empty, env=env)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 5, r.stderr
    assert lines[0] == f"error: {missing}: no such file"
    assert lines[1] == folder_line(folder)
    assert lines[2].startswith(f"error: {text}: cannot read audio (")
    assert lines[3].startswith(f"error: {empty}: cannot read audio (") or lines[3] == \
        f"error: {empty}: contains no audio frames"
    assert lines[4] == "error: 4 of 4 file(s) failed"
    assert not r.stdout and not (tmp_path / "out").exists()
    # no engine: no socket, no lock, no start lock, no log, no process
    assert not (tmp_path / "fresh").exists()
    assert sorted(os.listdir(runtime)) in ([], ["unbake"])
    if (runtime / "unbake").exists():
        assert os.listdir(runtime / "unbake") == []
    assert processes_mentioning(endpoint) == []
