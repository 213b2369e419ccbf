"""StemChain: per-stem pedalboard chains around the real daemon. Offline output is the input's length
and alignment; streaming with any block sizes equals offline after exactly ``latency_samples``."""
import numpy as np
import pytest
from pedalboard import Chorus, Compressor, Delay, Gain, Pedalboard, Reverb

from engine.errors import BadAudio, BadRequest
from plugin_bridge import StemChain
from plugin_bridge.client import Client
from tests.conftest import read

OPTIONS = {"segment_s": 1.0}  # a short grid: small latency, several segments


@pytest.fixture(scope="module")
def client(engine_endpoint):
    with Client(engine_endpoint, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def music_and_clicks(eval_dir):
    """4 s of a dev song with a click every 0.25 s on top."""
    mix, sr = read(eval_dir / "music-delta-80s-rock" / "mixture.wav")
    x = 0.7 * mix[:, sr:5 * sr].copy()
    x[:, ::sr // 4] += 0.25
    return x, sr


class LatentDelay:
    """A pedalboard-shaped callable that delays by ``reported_latency_samples`` (as an external
    plugin with latency does when streamed) and scales by 0.5."""

    def __init__(self, frames: int):
        self.reported_latency_samples = frames
        self.buf = None

    def reset(self):
        self.buf = None

    def __call__(self, audio, sample_rate, buffer_size=8192, reset=True):
        if reset or self.buf is None:
            self.buf = np.zeros((audio.shape[0], self.reported_latency_samples), np.float32)
        joined = np.concatenate([self.buf, audio], axis=1)
        out, self.buf = joined[:, :audio.shape[1]], joined[:, audio.shape[1]:]
        return 0.5 * out


def stream_through(chain, x, sr, seed):
    """Feed x in random blocks of 1 to 8192 frames; returns (everything out, latency)."""
    rng = np.random.default_rng(seed)
    outs, pos = [], 0
    while pos < x.shape[1]:
        n = int(rng.integers(1, 8193))
        block = x[:, pos:pos + n]
        out = chain(block, sr, reset=False)
        assert out.shape == block.shape and out.dtype == np.float32
        outs.append(out)
        pos += block.shape[1]
    outs.append(chain.flush())
    return np.concatenate(outs, axis=1), chain.latency_samples


def test_empty_chains_give_the_sum_of_the_engine_stems(client, music_and_clicks):
    x, sr = music_and_clicks
    stems = client.separate(x, sr, "spleeter-2stems", **OPTIONS)
    chain = StemChain({}, "spleeter-2stems", client=client, **OPTIONS)
    remix = chain(x, sr)
    assert remix.shape == x.shape and remix.dtype == np.float32 and chain.latency_samples == 0
    assert float(np.abs(remix - (stems["vocals"] + stems["accompaniment"])).max()) <= 1e-5
    processed = chain.process_stems(x, sr)
    for name in ("vocals", "accompaniment"):
        assert float(np.abs(processed[name] - stems[name]).max()) <= 1e-5


def test_mute_gain_and_mono_layout(client, music_and_clicks):
    x, sr = music_and_clicks
    stems = client.separate(x, sr, "spleeter-2stems", **OPTIONS)
    karaoke = StemChain({"vocals": None}, "spleeter-2stems", gains_db={"accompaniment": 6.0},
                        client=client, **OPTIONS)
    out = karaoke.process_stems(x, sr)
    assert float(np.abs(out["vocals"]).max()) == 0.0
    gain = 10 ** (6 / 20)
    assert float(np.abs(out["accompaniment"] - gain * stems["accompaniment"]).max()) <= 1e-5
    mono = x[0].copy()
    mono_out = StemChain({}, "spleeter-2stems", client=client, **OPTIONS)(mono, sr)
    assert mono_out.shape == mono.shape  # 1-D in, 1-D out, as pedalboard


@pytest.mark.parametrize("fx", ["none", "delay", "reverb", "chorus", "latent"])
def test_streaming_equals_offline_after_latency(client, music_and_clicks, fx):
    x, sr = music_and_clicks

    def chains():
        return {"none": {},
                "delay": {"vocals": Pedalboard([Delay(delay_seconds=0.1, feedback=0.3, mix=0.5)])},
                "reverb": {"vocals": Pedalboard([Reverb(room_size=0.7)]),
                           "accompaniment": Pedalboard([Compressor(threshold_db=-20), Gain(gain_db=-2)])},
                "chorus": {"accompaniment": Chorus(rate_hz=2.0, mix=0.6)},  # a bare plugin, with an LFO
                "latent": {"vocals": LatentDelay(300)}}[fx]

    offline = StemChain(chains(), "spleeter-2stems", client=client, **OPTIONS)(x, sr)
    streaming = StemChain(chains(), "spleeter-2stems", client=client, **OPTIONS)
    out, latency = stream_through(streaming, x, sr, seed=len(fx))
    with client.stream("spleeter-2stems", sr, 2, **OPTIONS) as probe:
        engine_latency = probe.latency_samples
    # the engine's + one 8192-frame chain block - 1 + the chain's own (LatentDelay: 300)
    assert latency == engine_latency + 8191 + (300 if fx == "latent" else 0)
    assert out.shape[1] == x.shape[1] + latency
    assert float(np.abs(out[:, :latency]).max()) == 0.0  # the pre-roll is silence
    diff = float(np.abs(out[:, latency:] - offline).max())
    print(f"\nStemChain streaming, chain {fx}: latency {latency} samples, max abs diff vs offline {diff:.2e}")
    assert diff <= 1e-5


def test_offline_compensates_a_callable_that_reports_latency(client, music_and_clicks):
    x, sr = music_and_clicks
    stems = client.separate(x, sr, "spleeter-2stems", **OPTIONS)
    out = StemChain({"vocals": LatentDelay(300)}, "spleeter-2stems", client=client, **OPTIONS).process_stems(x, sr)
    assert float(np.abs(out["vocals"] - 0.5 * stems["vocals"]).max()) <= 1e-5  # aligned, not 300 late


def test_errors(client, music_and_clicks):
    x, sr = music_and_clicks
    with pytest.raises(BadRequest, match="no stem 'drums'"):
        StemChain({"drums": Compressor()}, "spleeter-2stems", client=client)(x, sr)
    with pytest.raises(BadAudio, match="transpose"):
        StemChain({}, "spleeter-2stems", client=client)(x.T.copy(), sr)
    with pytest.raises(BadRequest, match="returned shape"):
        StemChain({"vocals": lambda a, sr, buffer_size=0, reset=True: a[:, :10]}, "spleeter-2stems",
                  client=client, **OPTIONS)(x, sr)
    streaming = StemChain({}, "spleeter-2stems", client=client, **OPTIONS)
    streaming(x[:, :1000], sr, reset=False)
    with pytest.raises(BadRequest, match="reset"):
        streaming(x[:, :1000], 48000, reset=False)
    streaming.reset()
    with pytest.raises(BadRequest, match="no stream"):
        streaming.flush()
