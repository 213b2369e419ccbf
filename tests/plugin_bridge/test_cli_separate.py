"""`unbake separate` end to end through the real command: outputs, formats, and every bad input
(one line naming the file and the problem, non-zero exit, nothing partial, other files still done).

The default path goes through the engine daemon (the test one, tests/plugin_bridge/conftest.py);
``--in-process`` is checked where it differs, and against the daemon's output.
"""
import json
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


PATHS = {"daemon": (), "in-process": ("--in-process",)}


@pytest.mark.parametrize("path", PATHS)
def test_bad_inputs_one_line_each_others_still_processed(song_excerpt, spleeter_repo, tmp_path, path):
    cases = _bad_inputs(tmp_path, song_excerpt)
    one_sample = tmp_path / "one.wav"
    sf.write(str(one_sample), np.array([[0.25, -0.25]], np.float32), 44100, subtype="FLOAT")
    out = tmp_path / "out"
    files = [c[0] for c in cases.values()]
    r = unbake("separate", *PATHS[path], "-o", out, "-q", "--float32", files[0], song_excerpt, *files[1:],
               one_sample)
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
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left
    one_voc, _ = read(out / MODEL / "one" / "vocals.wav")
    assert one_voc.shape == (2, 1)  # a 1-sample file is valid audio: 1-sample stems


@pytest.mark.parametrize("path", PATHS)
def test_unknown_model_and_missing_weights(song_excerpt, tmp_path, path):
    r = unbake("separate", *PATHS[path], "-n", "no-such-model", "-o", tmp_path / "o", song_excerpt)
    assert r.returncode == 1 and "unknown model 'no-such-model'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # (through the daemon the folder travels with the session: test_cli_separate_repo.py)
    r = unbake("separate", *PATHS[path], "-n", "htdemucs", "--repo", tmp_path / "empty-repo", "-o", tmp_path / "o",
               song_excerpt)
    assert r.returncode == 1 and "unbake fetch htdemucs" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_bad_stem_name_is_one_line_before_any_file(song_excerpt, spleeter_repo, tmp_path):
    r = unbake("separate", "--two-stems", "drums", "-o", tmp_path / "o", song_excerpt)
    assert r.returncode == 1 and "drums" in r.stderr and "vocals" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_output_folder_that_cannot_be_written(song_excerpt, spleeter_repo, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a folder cannot be made under a file, even as root
    r = unbake("separate", "-o", blocker / "out", "-q", song_excerpt, song_excerpt)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if "cannot write" in line]
    assert len(errors) == 2 and all(str(song_excerpt) in e for e in errors), r.stderr
    assert os.listdir(tmp_path) == ["a-file"]


def test_daemon_output_equals_in_process_output(song_excerpt, spleeter_repo, tmp_path):
    r = unbake("separate", "-o", tmp_path / "d", "-q", "--float32", song_excerpt)
    assert r.returncode == 0, r.stderr
    r = unbake("separate", "--in-process", "-j", "1", "-o", tmp_path / "p", "-q", "--float32", song_excerpt)
    assert r.returncode == 0, r.stderr
    assert files_under(tmp_path / "d") == files_under(tmp_path / "p")
    for stem in ("vocals", "accompaniment"):
        via, sr_d = read(tmp_path / "d" / MODEL / "excerpt" / f"{stem}.wav")
        local, sr_p = read(tmp_path / "p" / MODEL / "excerpt" / f"{stem}.wav")
        assert sr_d == sr_p and via.shape == local.shape
        assert float(np.abs(via - local).max()) <= 1e-5, stem


def test_fp16_on_cpu_is_refused_in_process(song_excerpt, spleeter_repo, tmp_path):
    r = unbake("separate", "--in-process", "-d", "cpu", "--fp16", "-o", tmp_path / "o", song_excerpt)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: --fp16 needs a CUDA device; on the CPU unbake computes in "
                                             "float32"]
    assert not (tmp_path / "o").exists()


def test_daemon_path_never_imports_torch(song_excerpt, spleeter_repo, tmp_path):
    code = ("import sys\n"
            "from plugin_bridge import cli\n"
            "rc = cli.main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, "separate", "-q", "-o", str(tmp_path), str(song_excerpt)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert files_under(tmp_path) == [f"{MODEL}/excerpt/accompaniment.wav", f"{MODEL}/excerpt/vocals.wav"]
    r = subprocess.run([sys.executable, "-c", code, "status"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_status_json_and_served_count(song_excerpt, spleeter_repo, tmp_path):
    r = unbake("status", "--json")
    assert r.returncode == 0, r.stderr
    before = json.loads(r.stdout)
    for key in ("endpoint", "pid", "engine_version", "protocol", "uptime_s", "device", "models",
                "memory_budget_gb", "queue_depth", "sessions", "served", "rss_mb"):
        assert key in before, key
    assert before["endpoint"] == os.environ["UNBAKE_ENDPOINT"]
    assert isinstance(before["sessions"], int) and isinstance(before["served"], int)
    r = unbake("separate", "-q", "-o", tmp_path, song_excerpt)
    assert r.returncode == 0, r.stderr
    after = json.loads(unbake("status", "--json").stdout)
    assert after["served"] > before["served"]
    # the separation's session is closed (other tests' sessions may still be open in this shared
    # engine, e.g. the bounce killed mid-run, until their TTL frees them)
    assert after["sessions"] <= before["sessions"]
    assert MODEL in [m["name"] for m in after["models"]]
    r = unbake("status")  # for people
    assert r.returncode == 0 and MODEL in r.stdout and str(after["pid"]) in r.stdout


@pytest.mark.parametrize("where", ["ipc", "tcp"])
def test_status_without_an_engine_is_one_line(tmp_path, where):
    endpoint = f"ipc://{tmp_path}/nobody.sock" if where == "ipc" else "tcp://127.0.0.1:9"  # discard port
    r = unbake("status", "--endpoint", endpoint, "--timeout-s", "0.5")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no unbake engine at {endpoint} ("), r.stderr
    assert not r.stdout
