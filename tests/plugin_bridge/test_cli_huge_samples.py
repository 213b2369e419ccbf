"""`unbake separate` of a float WAV whose peak is 8.8e17 (issue 12, item 6), in process and through the
session's real engine: one line naming the file, the frame and the bound, exit status 1, nothing
written for it, the next file separated (finite stems). The engine side: tests/engine/test_huge_samples.py.
"""
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

MODEL = "spleeter-2stems"
HUGE = 8.8e17


@pytest.fixture(scope="module")
def excerpt(eval_dir) -> np.ndarray:
    """0.5 s of a real song, float32 [2, frames] at 44.1 kHz."""
    x, sr = sf.read(str(eval_dir / "music-delta-80s-rock" / "mixture.wav"), dtype="float32", frames=22050,
                    start=44100)
    return np.ascontiguousarray(x.T)


def unbake(*args):
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("path", ["daemon", "in-process"])
def test_huge_float_wav_is_one_line_and_the_next_file_is_separated(excerpt, spleeter_repo, tmp_path, path):
    huge = tmp_path / "huge.wav"
    x = excerpt / np.abs(excerpt).max() * np.float32(HUGE)
    sf.write(str(huge), x.T, 44100, subtype="FLOAT")
    first = int(np.argwhere(np.abs(x) > 1e3)[:, 1].min())
    good = tmp_path / "good.wav"
    sf.write(str(good), excerpt.T, 44100, subtype="FLOAT")
    out = tmp_path / "out"
    r = unbake("separate", *(["--in-process"] if path == "in-process" else []), "-n", MODEL, "-q", "--float32",
               "-o", out, huge, good)
    assert r.returncode == 1, r.stderr
    peak = float(np.abs(x).max())
    assert r.stderr.splitlines() == [
        f"error: {huge}: input peak {peak:.3g} (from frame {first}, {first / 44100:.3f} s) is beyond what "
        f"{MODEL} can separate (peaks up to 1000, +60 dBFS); scale the audio down",
        "error: 1 of 2 file(s) failed"]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert files == [MODEL, f"{MODEL}/good", f"{MODEL}/good/accompaniment.wav", f"{MODEL}/good/vocals.wav"]
    voc, _ = sf.read(str(out / MODEL / "good" / "vocals.wav"), dtype="float32")
    assert voc.shape == (22050, 2) and np.isfinite(voc).all()
