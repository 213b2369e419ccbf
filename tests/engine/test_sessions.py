"""engine.sessions.TrackSeparator: rate/channel conversion, exact length, streaming == offline."""
import numpy as np
import pytest

from engine.errors import BadAudio, BadRequest
from engine.sessions import TrackSeparator, separate_array
from tests.engine.toy_models import FixedWindowSeparator
from tests.engine.test_apply import Identity


@pytest.mark.parametrize("rate,channels,frames", [(8000, 2, 5000), (8000, 1, 1), (11025, 1, 7001),
                                                  (44100, 2, 30000)])
def test_identity_model_roundtrip_keeps_length_and_alignment(rate, channels, frames):
    t = np.arange(frames) / rate
    mix = np.stack([np.sin(2 * np.pi * 440 * t)] * channels).astype(np.float32) * 0.5
    out = separate_array(Identity(), mix, rate)
    assert list(out) == ["same", "double"]
    assert out["same"].shape == mix.shape and out["same"].dtype == np.float32
    if rate == 8000:
        assert np.max(np.abs(out["same"] - mix)) < 1e-6
    elif frames > 100:  # resampled there and back: a 440 Hz tone comes back aligned
        inner = slice(200, frames - 200)
        assert np.max(np.abs(out["same"][:, inner] - mix[:, inner])) < 0.02


def test_two_stems_gives_stem_and_sum_of_others():
    mix = np.random.default_rng(1).standard_normal((2, 4000)).astype(np.float32)
    out = separate_array(Identity(), mix, 8000, two_stems="double")
    assert list(out) == ["double", "no_double"]
    assert np.max(np.abs(out["no_double"] - mix)) < 1e-6
    with pytest.raises(BadRequest, match="vocals"):
        separate_array(Identity(), mix, 8000, two_stems="vocals")


@pytest.mark.parametrize("rate", [8000, 12000])
def test_streamed_blocks_equal_one_shot(rate):
    model = FixedWindowSeparator(800)
    mix = np.random.default_rng(2).standard_normal((1, 9000)).astype(np.float32)
    offline = separate_array(model, mix, rate)
    track = TrackSeparator(model, rate, 1)
    parts, pos = [], 0
    for n in [1, 13, 700, 2048, 5, 3000, 10000]:
        parts.append(track.push(mix[:, pos:pos + n]))
        pos += n
    parts.append(track.close())
    for stem in offline:
        streamed = np.concatenate([p[stem] for p in parts], axis=-1)
        assert streamed.shape == offline[stem].shape
        assert np.max(np.abs(streamed - offline[stem])) < 1e-5


def test_nan_is_refused_with_its_position():
    mix = np.zeros((2, 1000), np.float32)
    mix[1, 500] = np.nan
    with pytest.raises(BadAudio, match="frame 500"):
        separate_array(Identity(), mix, 8000)
    with pytest.raises(BadAudio, match="3 channels"):
        separate_array(Identity(), np.zeros((3, 10), np.float32), 8000)
