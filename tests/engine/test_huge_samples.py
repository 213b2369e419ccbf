"""Finite but huge samples (issue 12, item 6): spleeter's ratio masks no longer overflow float32, the
model's bound (spleeter-2stems: peaks up to 1e3) is one line naming the file, and non-finite stems
are never handed out (TrackSeparator) nor written (engine.stemfiles), whatever the model does.

The same through the real `unbake separate` (both paths): tests/plugin_bridge/test_cli_huge_samples.py.
"""
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from engine.errors import BadAudio
from engine.sessions import TrackSeparator
from engine.stemfiles import OutputFormat, write_track
from tests.engine.test_apply import Identity

MODEL = "spleeter-2stems"
SONG = "music-delta-80s-rock"
HUGE = 8.8e17


@pytest.fixture(scope="module")
def excerpt(eval_dir) -> np.ndarray:
    """2 s of a real song, float32 [2, frames] at 44.1 kHz (peak 0.9)."""
    x, sr = sf.read(str(eval_dir / SONG / "mixture.wav"), dtype="float32", frames=2 * 44100, start=44100)
    assert sr == 44100
    return np.ascontiguousarray(x.T)


def test_masks_of_a_huge_input_are_finite_and_the_saturated_ones(spleeter, excerpt):
    # Without the overflow-free masks, y**2 overflows float32 (y ~ 1e21 here): inf / inf = NaN stems.
    x = torch.from_numpy(excerpt)[None]
    with torch.inference_mode():
        huge = spleeter(x * np.float32(HUGE))[0]
        loud = spleeter(x * np.float32(1e12))[0]  # 1e12 ** 2 fits in float32: the plain formula
    assert torch.isfinite(huge).all()
    # The U-Net saturates long before 1e12 (hard masks that no longer depend on the level): the
    # output scales with the input, to float32 rounding.
    a, b = (huge / HUGE).double(), (loud / 1e12).double()
    assert float((a - b).abs().max()) < 1e-4 * float(b.abs().max())
    # and the stems still sum to the mix below 11 kHz (the masks sum to 1)
    resid = torch.fft.rfft(x[0].double() - a.sum(0), dim=-1)
    assert float(resid[:, : resid.shape[-1] * 10000 // 22050].abs().max()) < 1e-3 * float(
        torch.fft.rfft(x[0].double(), dim=-1).abs().max())


def test_mask_exponent_8_on_a_loud_input_within_the_bound_stays_finite(spleeter, excerpt):
    # mask_exponent 8 overflows y ** 8 at y > 6.3e4: a song peaking just under the bound (1e3) does.
    model = spleeter.with_options(mask_exponent=8.0)
    x = torch.from_numpy(excerpt * np.float32(999 / np.abs(excerpt).max()))[None]
    with torch.inference_mode():
        out = model(x)[0]
        masks = model.masks(model.stft(x[0], 1024).abs()[None, :, :64])
    assert torch.isfinite(out).all()
    assert float((masks.sum(1) - 1).abs().max()) < 1e-5  # ratio masks: they sum to 1, no NaN


def test_a_peak_beyond_the_bound_is_refused_with_the_frame(spleeter, excerpt):
    assert spleeter.max_input_peak == 1e3
    track = TrackSeparator(spleeter, 44100, 2, where="song.wav")
    ok = excerpt[:, :44100] * np.float32(1000 / 0.9 * 0.999)  # just under the bound: taken
    track.feed(ok)
    bad = excerpt[:, 44100:].copy()
    bad[1, 1234] = 1000.5
    with pytest.raises(BadAudio) as e:
        track.feed(bad)
    assert str(e.value) == ("song.wav: input peak 1e+03 (from frame 45334, 1.028 s) is beyond what "
                            "spleeter-2stems can separate (peaks up to 1000, +60 dBFS); scale the audio down")
    assert track.frames_in == 44100  # the refused block was not taken


def test_non_finite_stems_are_never_handed_out():
    # Identity's "double" stem is 2x the input: 2e38 overflows float32 to inf (a real overflow).
    track = TrackSeparator(Identity(), 8000, 2, where="loud.wav")
    block = np.full((2, 2000), 1.0, np.float32)
    block[0, 1500] = 2e38
    with pytest.raises(BadAudio, match=r"^loud\.wav: the separation gave NaN or Inf samples in stem "
                                       r"'double' at frame 1500 \(0\.188 s\); the model overflowed"):
        track.push(block)
        track.close()


def test_write_track_never_writes_a_non_finite_stem(tmp_path):
    src = tmp_path / "loud.wav"
    mix = np.full((3000, 2), 0.5, np.float32)
    mix[2500, 1] = 2e38
    sf.write(str(src), mix, 8000, subtype="FLOAT")
    out = tmp_path / "out"

    class Unchecked(TrackSeparator):  # a model path without the session's own check
        def collect(self, final=False):
            stems = self._stems_from(self.streamer.collect())
            return self._emit_unchecked(stems, final)

        def _emit_unchecked(self, stems, final):
            n = min(stems.shape[-1], self.frames_in - self.frames_out)
            self.frames_out += n
            return {s: np.ascontiguousarray(stems[i, :, :n]) for i, s in enumerate(self.stems)}

    dests = {"same": out / "same.wav", "double": out / "double.wav"}
    with pytest.raises(BadAudio) as e:
        write_track(src, dests, OutputFormat(bit_depth=32),
                    lambda sr, ch, where: Unchecked(Identity(), sr, ch, where=where))
    assert str(e.value) == (f"{src}: the separation gave NaN or Inf samples in stem 'double' at frame 2500 "
                            f"(input peak 2e+38); nothing written for it")
    assert os.listdir(tmp_path) == ["loud.wav"]  # no stems, no temp files, no folder
