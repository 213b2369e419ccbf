"""``--cpu-runtime onnx`` end to end (HT-Demucs, random weights in the official package format): `unbake
separate --in-process` and `unbake serve` run the onnx core, agree with the torch path within 1e-4
(relative, per stem), streaming in any block size equals a one-shot separation through the same engine,
and the artefact is built once (the second command loads it)."""
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from engine.models import onnx_core
from tests.conftest import read
from tests.engine import demucs_fixtures as F
from tests.engine.engine_proc import REPO, EngineProcess

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow

SIG = "5eed0e11"
STEMS = ["drums", "bass", "other", "vocals"]


def unbake(*args):
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def setup(eval_dir, tmp_path_factory):
    """(weights folder, 12 s of a real song as a float32 file, its float32 samples [channels, frames])."""
    tmp = tmp_path_factory.mktemp("cpu_runtime")
    repo = tmp / "repo"
    repo.mkdir()
    F.write_package(F.make_htdemucs(seed=5), repo, SIG)
    data, sr = sf.read(str(eval_dir / "cristina-vane-so-easy" / "mixture.wav"), dtype="float32",
                       frames=12 * 44100, start=5 * 44100)
    song = tmp / "song12.wav"
    sf.write(str(song), data, sr, subtype="FLOAT")  # read alike by soundfile and pedalboard
    return repo, song, read(song)[0]


def _separate(repo, song, out, runtime):
    r = unbake("separate", "--in-process", "--cpu-runtime", runtime, "-n", SIG, "--repo", repo, "-o", out,
               "--float32", "-q", song)
    assert r.returncode == 0, r.stderr
    stems = np.stack([read(out / SIG / song.stem / f"{s}.wav")[0] for s in STEMS])
    return stems, r.stderr


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_in_process_onnx_agrees_with_torch_and_builds_once(setup, tmp_path):
    repo, song, mix = setup
    torch_out, err = _separate(repo, song, tmp_path / "torch", "torch")
    assert err == ""
    onnx_out, err = _separate(repo, song, tmp_path / "onnx", "onnx")
    assert err.startswith(f"warning: {SIG}: built its onnx core in ") and err.count("\n") == 1, err
    assert onnx_out.shape == torch_out.shape == (4,) + mix.shape
    for i, stem in enumerate(STEMS):
        rel = _rel(onnx_out[i], torch_out[i])
        print(f"\n{stem}: onnx vs torch, relative {rel:.2e}")
        assert 0 < rel <= 1e-4, (stem, rel)
    again, err = _separate(repo, song, tmp_path / "onnx2", "onnx")
    assert err == ""  # the artefact beside the weights was loaded, not rebuilt
    assert float(np.abs(again - onnx_out).max()) == 0.0
    assert len(list((repo / onnx_core.ARTEFACT_DIR).glob("*.onnx"))) == 1


def test_daemon_streaming_equals_one_shot_on_the_onnx_core(setup, tmp_path):
    from plugin_bridge.client import Client
    repo, song, mix = setup
    in_process, _ = _separate(repo, song, tmp_path / "onnx", "onnx")
    endpoint = f"ipc://{tmp_path}/e.sock"
    log = tmp_path / "engine.log"
    with EngineProcess(endpoint, "--cpu-runtime", "onnx", "--repo", repo, "--preload", SIG, log=log):
        with Client(endpoint, timeout_s=120) as client:
            one_shot = client.separate(mix, 44100, SIG, chunk_s=60.0)
            small = client.separate(mix, 44100, SIG, chunk_s=0.37)
    stems_a = np.stack([one_shot[s] for s in STEMS])
    stems_b = np.stack([small[s] for s in STEMS])
    assert stems_a.shape == in_process.shape
    assert float(np.abs(stems_b - stems_a).max()) == 0.0  # streaming == offline, same path
    assert float(np.abs(stems_a - in_process).max()) <= 1e-6  # the daemon runs the same onnx core
    text = log.read_text()
    assert "built its onnx core" not in text and "using torch" not in text, text  # loaded from the cache


def test_bag_with_shifts_on_the_onnx_core(setup, tmp_path):
    """An ensemble (a demucs bag of two HTDemucs, one core each) with a shifted pass: onnx within 1e-4
    of torch, every member on its core."""
    _, song, _ = setup
    repo = tmp_path / "repo"
    repo.mkdir()
    F.build_fixture_repo(repo)
    outs = {}
    for runtime in ("torch", "onnx"):
        r = unbake("separate", "--in-process", "--cpu-runtime", runtime, "-n", "tiny_htdemucs_ft", "--repo", repo,
                   "--shifts", "1", "-o", tmp_path / runtime, "--float32", "-q", song)
        assert r.returncode == 0, r.stderr
        if runtime == "onnx":
            assert r.stderr.count("built its onnx core") == 2, r.stderr
        outs[runtime] = np.stack([read(tmp_path / runtime / "tiny_htdemucs_ft" / song.stem / f"{s}.wav")[0]
                                  for s in STEMS])
    for i, stem in enumerate(STEMS):
        rel = _rel(outs["onnx"][i], outs["torch"][i])
        assert 0 < rel <= 1e-4, (stem, rel)
