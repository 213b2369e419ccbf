"""`unbake separate` end to end through the real command: outputs, formats, and every bad input
(one line naming the file and the problem, non-zero exit, nothing partial, other files still done)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import read

MODEL = "spleeter-2stems"


def unbake(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def separated(song_excerpt, spleeter_repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    r = unbake("separate", "-o", out, "--float32", song_excerpt)
    assert r.returncode == 0, r.stderr
    return out, r


def test_default_model_writes_aligned_float32_stems(separated, song_excerpt):
    out, r = separated
    assert f"model {MODEL}" in r.stderr  # says which model it used
    assert files_under(out) == [f"{MODEL}/excerpt/accompaniment.wav", f"{MODEL}/excerpt/vocals.wav"]
    mix, sr = read(song_excerpt)
    voc, sr_v = read(out / MODEL / "excerpt" / "vocals.wav")
    acc, _ = read(out / MODEL / "excerpt" / "accompaniment.wav")
    assert sr_v == sr and voc.shape == mix.shape and acc.shape == mix.shape
    assert sf.info(str(out / MODEL / "excerpt" / "vocals.wav")).subtype == "FLOAT"
    # Spleeter's masks sum to 1 below 11 kHz: the stems add up to the mix there (aligned, same gain).
    resid = np.fft.rfft(mix - voc - acc, axis=1)
    low = np.abs(resid[:, : resid.shape[1] * 10000 // 22050]).max()
    assert low < 1e-2 * np.abs(np.fft.rfft(mix, axis=1)).max()


def test_two_stems_flac_int24_and_filename_template(song_excerpt, spleeter_repo, tmp_path):
    r = unbake("separate", "-n", MODEL, "-o", tmp_path, "--two-stems", "vocals", "--flac", "--int24",
               "--filename", "{track}-{stem}.{ext}", "-q", song_excerpt)
    assert r.returncode == 0, r.stderr
    assert files_under(tmp_path) == [f"{MODEL}/excerpt-no_vocals.flac", f"{MODEL}/excerpt-vocals.flac"]
    assert sf.info(str(tmp_path / MODEL / "excerpt-vocals.flac")).subtype == "PCM_24"


def test_8khz_mono_comes_back_8khz_mono_same_length(song_excerpt, spleeter_repo, tmp_path):
    mix, sr = read(song_excerpt)
    mono = tmp_path / "mono8k.wav"
    sf.write(str(mono), mix.mean(0)[::5][:, None] * 0.5, 8820, subtype="PCM_16")  # 8.82 kHz mono
    r = unbake("separate", "-o", tmp_path / "o", "-q", "--float32", mono)
    assert r.returncode == 0, r.stderr
    voc, sr_v = read(tmp_path / "o" / MODEL / "mono8k" / "vocals.wav")
    assert sr_v == 8820 and voc.shape == (1, sf.info(str(mono)).frames)


def test_integer_output_warns_how_much_was_clipped(spleeter_repo, tmp_path):
    loud = tmp_path / "loud.wav"
    t = np.arange(44100) / 44100
    sf.write(str(loud), np.stack([1.8 * np.sin(2 * np.pi * 220 * t)] * 2, 1).astype(np.float32), 44100,
             subtype="FLOAT")
    r = unbake("separate", "-o", tmp_path / "o", "-q", loud)
    assert r.returncode == 0, r.stderr
    assert "clipped to [-1, 1]" in r.stderr and "--float32" in r.stderr
    r = unbake("separate", "-o", tmp_path / "f", "-q", "--float32", loud)
    assert "clipped" not in r.stderr
    acc, _ = read(tmp_path / "f" / MODEL / "loud" / "accompaniment.wav")
    assert np.abs(acc).max() > 1.0  # float32 keeps the peaks as they are


def _bad_inputs(folder: Path, song: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its error line must say)."""
    mix, sr = read(song)
    cases = {}
    p = folder / "empty.wav"
    p.write_bytes(b"")
    cases["empty"] = (p, "cannot read audio")
    p = folder / "text.wav"
    p.write_text("this is not audio\n" * 100)
    cases["text"] = (p, "cannot read audio")
    p = folder / "truncated.wav"
    sf.write(str(p), mix.T, sr, subtype="PCM_16")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    cases["truncated"] = (p, "truncated")
    p = folder / "nan.wav"
    bad = mix.T.copy()
    bad[1000, 0] = np.nan
    sf.write(str(p), bad, sr, subtype="FLOAT")
    cases["nan"] = (p, "NaN or Inf sample at frame 1000")
    p = folder / "inf.wav"
    bad = mix.T.copy()
    bad[2000, 1] = np.inf
    sf.write(str(p), bad, sr, subtype="FLOAT")
    cases["inf"] = (p, "NaN or Inf sample at frame 2000")
    p = folder / "surround96k.wav"
    sf.write(str(p), np.zeros((9600, 6), np.float32), 96000, subtype="PCM_16")
    cases["6ch"] = (p, "6 channels")
    cases["missing"] = (folder / "nope.wav", "no such file")
    return cases


def test_bad_inputs_one_line_each_others_still_processed(song_excerpt, spleeter_repo, tmp_path):
    cases = _bad_inputs(tmp_path, song_excerpt)
    one_sample = tmp_path / "one.wav"
    sf.write(str(one_sample), np.array([[0.25, -0.25]], np.float32), 44100, subtype="FLOAT")
    out = tmp_path / "out"
    files = [c[0] for c in cases.values()]
    r = unbake("separate", "-o", out, "-q", "--float32", files[0], song_excerpt, *files[1:], one_sample)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(cases) + 1, r.stderr  # one per bad file, plus the summary line
    for name, (path, says) in cases.items():
        line = [e for e in errors if str(path) in e]
        assert len(line) == 1 and says in line[0], (name, r.stderr)
    assert "Traceback" not in r.stderr
    # The good files were separated; nothing partial or hidden was left for the bad ones.
    assert files_under(out) == sorted([f"{MODEL}/excerpt/accompaniment.wav", f"{MODEL}/excerpt/vocals.wav",
                                       f"{MODEL}/one/accompaniment.wav", f"{MODEL}/one/vocals.wav"])
    one_voc, _ = read(out / MODEL / "one" / "vocals.wav")
    assert one_voc.shape == (2, 1)  # a 1-sample file is valid audio: 1-sample stems


def test_unknown_model_and_missing_weights(song_excerpt, tmp_path):
    r = unbake("separate", "-n", "no-such-model", "-o", tmp_path / "o", song_excerpt)
    assert r.returncode == 1 and "unknown model 'no-such-model'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = unbake("separate", "-n", "htdemucs", "--repo", tmp_path / "empty-repo", "-o", tmp_path / "o", song_excerpt)
    assert r.returncode == 1 and "unbake fetch htdemucs" in r.stderr
    assert not (tmp_path / "o").exists()


def test_output_folder_that_cannot_be_written(song_excerpt, spleeter_repo, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a folder cannot be made under a file, even as root
    r = unbake("separate", "-o", blocker / "out", "-q", song_excerpt, song_excerpt)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if "cannot write" in line]
    assert len(errors) == 2 and all(str(song_excerpt) in e for e in errors), r.stderr
    assert os.listdir(tmp_path) == ["a-file"]
