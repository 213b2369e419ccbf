"""StemStream: pedalboard-style streaming through the daemon. Every block comes back with exactly its
length, delayed by exactly ``latency_samples``; removing that delay gives the offline output."""
import numpy as np
import pytest

from engine.sessions import separate_array
from plugin_bridge.client import Client


def clicks_and_music(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    t = np.arange(n) / sr
    x = 0.2 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 0.5 * t))
    x = np.stack([x, np.roll(x, 17)]) + 0.02 * rng.standard_normal((2, n))
    x[:, ::sr // 2] = 0.9  # a click every half second
    return x.astype(np.float32)


@pytest.mark.parametrize("sr", [44100, 48000])
def test_impulse_comes_out_exactly_latency_samples_later(engine_endpoint, spleeter, sr):
    mix = clicks_and_music(sr, 4.0)
    want = separate_array(spleeter, mix, sr, segment_s=1.0)
    with Client(engine_endpoint, timeout_s=30) as client:
        stream = client.stream("spleeter-2stems", sr, 2, segment_s=1.0)
        latency = stream.latency_samples
        assert isinstance(latency, int) and 0 < latency < 2 * sr
        rng = np.random.default_rng(sr)
        outs, pos = [], 0
        while pos < mix.shape[1]:
            n = int(rng.integers(1, 8193))
            block = mix[:, pos:pos + n]
            out = stream.process(block)
            assert all(v.shape == block.shape for v in out.values())  # exactly the block's length
            outs.append(out)
            pos += block.shape[1]
        tail = stream.flush()
    for name in want:
        y = np.concatenate([o[name] for o in outs] + [tail[name]], axis=1)
        assert y.shape[1] == mix.shape[1] + latency
        assert not y[:, :latency].any()  # the pre-roll is silence
        assert float(np.abs(y[:, latency:] - want[name]).max()) <= 1e-5


def test_stated_latency_is_reached_not_overstated(engine_endpoint, spleeter):
    """At the model's rate the latency is segment + right context - 1 frames: after exactly that many
    frames nothing is final yet (the output lags by the full latency), one frame more completes the
    first segment."""
    sr = 44100
    with Client(engine_endpoint) as client:
        session = client.open("spleeter-2stems", sr, 2, segment_s=1.0)
        window = spleeter.valid_length(sr)
        latency = sr + (window - sr) - (window - sr) // 2 - 1
        assert session.latency_samples == latency
        x = clicks_and_music(sr, 2.0)
        assert session.push(x[:, :latency])["vocals"].shape[1] == 0
        stride = int(0.9 * sr)  # spleeter's default overlap is 0.1
        assert session.push(x[:, latency:latency + 1])["vocals"].shape[1] == stride
        session.cancel()
