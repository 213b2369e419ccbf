"""`unbake separate` with HT-Demucs checkpoints in the official package format (random weights, since
the official files cannot be downloaded here), through the same code path users hit: --repo DIR
with SIG-SHA8.th files and a bag yaml, verified by the sha256 prefix in the file name.
In process (--in-process) here; through a running engine started without --repo in
test_cli_separate_repo.py."""
import subprocess
import sys

import numpy as np
import torch
from demucs.apply import BagOfModels, apply_model

from tests.conftest import read
from tests.engine import demucs_fixtures as fx


def unbake(*args):
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_bag_from_repo_equals_demucs_apply_model(song_excerpt, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    fix = fx.build_fixture_repo(repo)
    out = tmp_path / "out"
    r = unbake("separate", "--in-process", "-n", "tiny_htdemucs_ft", "--repo", repo, "-o", out, "--float32", "-q",
               song_excerpt)
    assert r.returncode == 0, r.stderr
    mix, sr = read(song_excerpt)
    bag = BagOfModels([fix["models"][fx.SIG_HT_B], fix["models"][fx.SIG_HT_C]],
                      weights=[[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 0.5]])
    with torch.no_grad():
        ref = apply_model(bag, torch.from_numpy(mix)[None], segment=None, overlap=0.25, shifts=0, split=True)[0]
    for i, stem in enumerate(["drums", "bass", "other", "vocals"]):
        got, sr_out = read(out / "tiny_htdemucs_ft" / "excerpt" / f"{stem}.wav")
        assert sr_out == sr and got.shape == mix.shape
        diff = float(np.abs(got - ref[i].numpy()).max())
        assert diff <= 1e-4, (stem, diff)


def test_tampered_checkpoint_is_refused_before_loading(song_excerpt, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    path = fx.write_package(fx.make_htdemucs(seed=7), repo, "5eed0a99")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    fx.write_bag(repo, "mine", ["5eed0a99"])
    r = unbake("separate", "--in-process", "-n", "mine", "--repo", repo, "-o", tmp_path / "out", song_excerpt)
    assert r.returncode == 1
    assert "sha256 mismatch" in r.stderr and path.name in r.stderr
    assert not (tmp_path / "out").exists()
