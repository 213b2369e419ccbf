"""Inputs that are not what they seem (issue 12, item 4 and part of 15), through the real CLI.

- A file truncated while it is separated (a download or a render still running): a real writer in
  this process truncates it to half once the CLI has started on it; pedalboard would pad the rest
  with silence, the CLI must say that the file changed and write nothing.
- A FLAC cut in half at rest (a partial download): libsndfile's own error, before any engine.
- A named pipe: said to be one (it was "no such file"), never opened (that would block), and with
  `unbake bounce` never hashed either.
Each case has a good input after the bad one, which must still be separated.
"""
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

MODEL = "spleeter-2stems"
RATE = 44100


def unbake(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def mix(eval_dir) -> np.ndarray:
    """The 6.8 s song, float32 [frames, 2]."""
    data, sr = sf.read(str(eval_dir / "music-delta-80s-rock" / "mixture.wav"), dtype="float32")
    assert sr == RATE
    return data


@pytest.fixture
def good(mix, tmp_path) -> Path:
    path = tmp_path / "good.wav"
    sf.write(str(path), mix[:22050], RATE, subtype="PCM_16")
    return path


def good_stems(out: Path) -> list[str]:
    return [MODEL, f"{MODEL}/good", f"{MODEL}/good/accompaniment.wav", f"{MODEL}/good/vocals.wav"]


@pytest.mark.parametrize("path", ["daemon", "in-process"])
def test_a_file_truncated_while_it_is_separated_is_an_error_for_that_file(mix, good, spleeter_repo, engine_endpoint,
                                                                          tmp_path, monkeypatch, path):
    monkeypatch.setenv("UNBAKE_ENDPOINT", engine_endpoint)
    song = tmp_path / "growing.wav"
    long = np.concatenate([mix] * 6)  # 40.8 s: more than one of spleeter's 34 s segments
    sf.write(str(song), long, RATE, subtype="PCM_16")
    size = song.stat().st_size
    half = 44 + (size - 44) // 2 // 4 * 4
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "plugin_bridge.cli", "separate", "-n", MODEL, "-q", "-o", out,
                             *(["--in-process"] if path == "in-process" else []), song, good],
                            stderr=subprocess.PIPE, text=True)
    truncated = threading.Event()

    def writer():  # truncate the input once the CLI writes its stems (it has opened and is reading it)
        deadline = time.monotonic() + 120
        track = out / MODEL / "growing"
        while time.monotonic() < deadline and proc.poll() is None:
            if track.is_dir() and any(p.name.endswith(".partial.wav") for p in track.iterdir()):
                os.truncate(song, half)
                truncated.set()
                return
            time.sleep(0.002)

    t = threading.Thread(target=writer)
    t.start()
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        t.join()
    assert truncated.is_set(), err
    assert proc.returncode == 1, err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[1] == "error: 1 of 2 file(s) failed", err
    m = re.fullmatch(rf"error: {re.escape(str(song))}: changed while it was read \({size} -> {half} bytes, after "
                     rf"(\d+) of {len(long)} frames\); nothing written for it", lines[0])
    assert m, err
    assert everything_under(out) == good_stems(out)  # nothing for the truncated file, not even its folder


@pytest.mark.parametrize("path", ["daemon", "in-process"])
def test_a_flac_cut_in_half_is_refused_before_any_separation(mix, good, spleeter_repo, engine_endpoint, tmp_path,
                                                             monkeypatch, path):
    monkeypatch.setenv("UNBAKE_ENDPOINT", engine_endpoint)
    song = tmp_path / "partial.flac"
    sf.write(str(song), mix, RATE, subtype="PCM_16")
    data = song.read_bytes()
    song.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    r = unbake("separate", "-n", MODEL, "-q", "-o", out, *(["--in-process"] if path == "in-process" else []),
               song, good)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and lines[1] == "error: 1 of 2 file(s) failed", r.stderr
    m = re.fullmatch(rf"error: {re.escape(str(song))}: truncated: the header says {len(mix)} frames, decoding "
                     rf"fails after frame (\d+) \(libsndfile: .+\)", lines[0])
    assert m, r.stderr
    # decoded in 1024-frame reads up to the cut: half of the bytes, a little less than half of the frames
    assert int(m.group(1)) % 1024 == 0 and 0.45 * len(mix) < int(m.group(1)) < 0.5 * len(mix)
    assert everything_under(out) == good_stems(out)


def test_a_named_pipe_is_said_to_be_one_and_never_opened(good, spleeter_repo, engine_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("UNBAKE_ENDPOINT", engine_endpoint)
    fifo = tmp_path / "stream.wav"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    r = unbake("separate", "-n", MODEL, "-q", "-o", out, fifo, good, timeout=30)  # opening it would block
    assert r.returncode == 1
    line = (f"{fifo}: is a named pipe (FIFO), not a regular file; unbake reads audio files (save the audio to a file "
            f"first)")
    assert r.stderr.splitlines() == [f"error: {line}", "error: 1 of 2 file(s) failed"]
    assert everything_under(out) == good_stems(out)

    # bounce: named, and found in a folder (where it would have been hashed: a read that blocks)
    folder = tmp_path / "album"
    folder.mkdir()
    os.mkfifo(folder / "live.wav")
    r = unbake("bounce", "-n", MODEL, "-q", "-o", tmp_path / "bounced", fifo, folder, good, timeout=30)
    assert r.returncode == 1
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert errors == [f"error: {fifo}: is a named pipe (FIFO), not a regular file; unbake reads audio files (save "
                      f"the audio to a file first)",
                      f"error: {folder / 'live.wav'}: is a named pipe (FIFO), not a regular file; unbake reads audio "
                      f"files (save the audio to a file first)"], r.stderr
    assert sf.info(str(tmp_path / "bounced" / MODEL / "good" / "vocals.wav")).frames == 22050
