"""engine.apply on HT-Demucs equals demucs' own apply_model (same random weights, 30 s of stereo)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from demucs.apply import BagOfModels
from demucs.apply import apply_model as demucs_apply_model

from engine.apply import apply_model
from engine.models.htdemucs import load_demucs_bag, load_demucs_package
from tests.engine import demucs_fixtures as F

pytestmark = pytest.mark.slow

SR = 44100
SONG = Path(__file__).resolve().parents[2].parent / "shared/eval-audio/real-dev-v1/cristina-vane-so-easy/mixture.wav"
TOL = 1e-4


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return F.build_fixture_repo(tmp_path_factory.mktemp("demucs_parity"))


@pytest.fixture(scope="module")
def mix():
    """30 s of stereo 44.1 kHz: a real song when ../shared has it, noise otherwise."""
    frames = 30 * SR
    if SONG.exists():
        import soundfile as sf
        data, rate = sf.read(str(SONG), dtype="float32", always_2d=True, frames=frames)
        if rate == SR and data.shape[1] == 2 and data.shape[0] >= 20 * SR:
            print(f"\nparity input: {SONG.parent.name}/{SONG.name}, {data.shape[0] / SR:.1f} s")
            return torch.from_numpy(data.T.copy())
    print("\nparity input: noise")
    return 0.1 * torch.randn(2, frames, generator=torch.Generator().manual_seed(0))


def _reference(model, mix, segment=7.8):
    with torch.inference_mode():
        return demucs_apply_model(model, mix[None], segment=segment, overlap=0.25, shifts=0, split=True)[0]


def _check(name, out, ref):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    diff = torch.max(torch.abs(out - ref)).item()
    print(f"{name}: max abs diff vs demucs.apply.apply_model = {diff:.3e} (peak {ref.abs().max().item():.3f})")
    assert diff < TOL


def test_single_model_equals_demucs_apply_model(repo, mix):
    adapter = load_demucs_package(repo["packages"][F.SIG_HT_A])
    ref = _reference(repo["models"][F.SIG_HT_A], mix)
    out = apply_model(adapter, mix, segment_s=7.8, overlap=0.25)
    _check("htdemucs", out, ref)
    out3 = apply_model(adapter, mix, segment_s=7.8, overlap=0.25, batch_segments=3)
    _check("htdemucs batch_segments=3", out3, ref)
    # The default grid of the adapter is the same one (training segment, overlap 0.25).
    _check("htdemucs defaults", apply_model(adapter, mix), ref)


def test_bag_equals_demucs_bag_of_models(repo, mix):
    bag = load_demucs_bag(repo["bag_ft"], repo["resolve"])
    ref_bag = BagOfModels([repo["models"][F.SIG_HT_B], repo["models"][F.SIG_HT_C]],
                          weights=[[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 0.5]])
    ref = _reference(ref_bag, mix)
    out = apply_model(bag, mix, segment_s=7.8, overlap=0.25, batch_segments=3)
    _check("htdemucs_ft-like bag", out, ref)


def test_shorter_segment_equals_demucs_apply_model(repo, mix):
    """segment < training segment: demucs feeds int(segment * rate) frames, which HTDemucs pads on
    the right to its training length; the engine must do the same, not feed a longer window."""
    adapter = load_demucs_package(repo["packages"][F.SIG_HT_A])
    part = mix[:, :12 * SR]
    ref = _reference(repo["models"][F.SIG_HT_A], part, segment=5.0)
    out = apply_model(adapter, part, segment_s=5.0, overlap=0.25, batch_segments=2)
    _check("htdemucs segment 5 s", out, ref)
    assert adapter.segment_frames == int(7.8 * SR)  # the shared adapter is left untouched
