"""The torch Spleeter 2-stems port against TensorFlow spleeter's own outputs (../shared/reference).

- network: both U-Nets on the reference's random spectrogram, vs TF's U-Net outputs;
- pipeline: separate_reference on the three dev songs vs TF's Separator(MWF=False) stems;
- segment mode (forward): exact where it must equal the reference, close elsewhere.
"""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from engine.models.spleeter import (
    Spleeter, convert_tf_checkpoint, load_spleeter, separate_reference, state_dict_from_tf,
)
from engine.tf_checkpoint import read_tf_checkpoint

SHARED = Path(__file__).resolve().parents[3] / "shared"
REFERENCE = SHARED / "reference"
SONGS = ("bearlin-roads", "cristina-vane-so-easy", "music-delta-80s-rock")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"reference data not found at {SHARED}")


@pytest.fixture(scope="module")
def model(spleeter_safetensors):
    return load_spleeter(spleeter_safetensors)


def read_audio(path: Path) -> torch.Tensor:
    """float32 [channels, frames]."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    assert sr == 44100
    return torch.from_numpy(np.ascontiguousarray(data.T))


def snr_db(ref: torch.Tensor, est: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.double().square().sum() / (ref.double() - est.double()).square().sum()))


@needs_shared
def test_unet_matches_tensorflow(model):
    ref = np.load(REFERENCE / "spleeter-2stems-unet-tf.npz")
    x = torch.from_numpy(ref["input_spectrogram"]).permute(0, 3, 1, 2)  # [1, 2, frames, bins]
    with torch.inference_mode():
        for unet, source in zip(model.unets, model.sources):
            out = unet(x).permute(0, 2, 3, 1).numpy()  # back to TF's [1, frames, bins, 2]
            diff = float(np.abs(out - ref[f"{source}_spectrogram"]).max())
            print(f"U-Net {source}: max abs diff {diff:.3g}")
            assert diff <= 1e-4, source


@needs_shared
@pytest.mark.parametrize("song", SONGS)
def test_pipeline_matches_tensorflow(model, song):
    mix = read_audio(SHARED / "eval-audio/real-dev-v1" / song / "mixture.wav")
    out = separate_reference(model, mix)
    assert out.shape == (2, 2, mix.shape[1]) and out.dtype == torch.float32
    for stem, est in zip(model.sources, out):
        ref = read_audio(REFERENCE / "spleeter-2stems-tf-outputs" / song / f"{stem}.flac")
        diff, snr = float((est - ref).abs().max()), snr_db(ref, est)
        print(f"{song} {stem}: max abs diff {diff:.3g}, SNR {snr:.1f} dB")
        assert diff <= 1e-3 or snr >= 60, (song, stem, diff, snr)


@needs_shared
def test_segment_forward_equals_reference_on_one_block(model):
    """A 512-frame STFT is one reference block and one forward pass: same numbers."""
    mix = read_audio(SHARED / "eval-audio/real-dev-v1/cristina-vane-so-easy/mixture.wav")
    n = 512 * 1024 - 4096
    assert model.stft_frames(n) == 512 and model.valid_length(n) == n
    with torch.inference_mode():
        seg = model(mix[None, :, 5 * 44100:5 * 44100 + n])[0]
    ref = separate_reference(model, mix[:, 5 * 44100:5 * 44100 + n])
    assert float((seg - ref).abs().max()) <= 1e-5


@needs_shared
def test_segment_forward_on_a_30s_song(model):
    mix = read_audio(SHARED / "eval-audio/real-dev-v1/cristina-vane-so-easy/mixture.wav")
    n = mix.shape[1]
    assert n == 30 * 44100
    with torch.inference_mode():
        out = model(torch.stack([mix, mix.flip(1)]))  # two independent items
        single = model(mix[None])
    assert out.shape == (2, 2, 2, n) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert float((out[:1] - single).abs().max()) <= 1e-5  # batch items are independent
    ref = separate_reference(model, mix)
    for k, stem in enumerate(model.sources):
        sdr = snr_db(ref[k], out[0, k])
        print(f"segment forward vs reference-mode {stem}: {sdr:.1f} dB")
        assert sdr > 20, stem  # differs only by the reference's 512-frame block seams
    # mask_extension "zeros": the stems add up to the mix below 11 kHz, and nothing above.
    spec_sum = torch.fft.rfft(out[0].sum(0)[:, 44100:-44100].double())
    spec_mix = torch.fft.rfft(mix[:, 44100:-44100].double())
    hz = 44100 / (n - 2 * 44100)  # per bin of this long FFT; the cut is at 11025 Hz (bin 1024)
    lo, hi = int((11025 - 300) / hz), int((11025 + 300) / hz)
    low = float((spec_sum[:, :lo] - spec_mix[:, :lo]).abs().max() / spec_mix.abs().max())
    high = float(spec_sum[:, hi:].abs().max() / spec_mix.abs().max())
    print(f"stems sum vs mix below 10.7 kHz {low:.2g}, stems above 11.3 kHz {high:.2g} (of max |mix|)")
    assert low < 1e-4 and high < 1e-4, (low, high)


def test_geometry_and_full_band_stems_sum_to_the_mix(model):
    assert model.valid_length(model.segment_frames) == model.segment_frames
    for frames in (1, 1000, 61440, 61441, 1_323_000):
        v = model.valid_length(frames)
        assert v >= frames and model.stft_frames(v) % 64 == 0
    full = Spleeter(full_band=True)
    full.load_state_dict(model.state_dict())
    mix = torch.randn(1, 2, 70_000, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.inference_mode():
        out = full.eval()(mix)
    assert out.shape == (1, 2, 2, 70_000)
    assert float((out.sum(1) - mix).abs().max()) < 1e-5


def test_conversion_is_deterministic(spleeter_checkpoint, spleeter_safetensors, tmp_path):
    again = tmp_path / "again.safetensors"
    convert_tf_checkpoint(spleeter_checkpoint, again)
    digest = hashlib.sha256(again.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(spleeter_safetensors.read_bytes()).hexdigest()
    state = state_dict_from_tf(read_tf_checkpoint(spleeter_checkpoint, verify_crc=False))
    assert state.keys() == Spleeter().state_dict().keys()
    with pytest.raises(ValueError, match="conv2d_transpose"):
        state_dict_from_tf({k: v for k, v in read_tf_checkpoint(spleeter_checkpoint).items()
                            if not k.startswith("conv2d_transpose_11/")})
