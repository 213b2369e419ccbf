"""Sessions through the real daemon: any chunking gives the offline output; one-shot separate()
is open + push all + close with progress; several sessions share one warm model."""
import numpy as np
import pytest

from engine.errors import BadAudio, ModelError, UnknownModel
from engine.sessions import separate_array
from plugin_bridge.client import Client
from tests.conftest import read

OPTIONS = {"segment_s": 2.0}  # several segments in a 10 s excerpt


@pytest.fixture(scope="module")
def song(eval_dir):
    mix, sr = read(eval_dir / "bearlin-roads" / "mixture.wav")
    return mix[:, 10 * sr:20 * sr], sr


@pytest.fixture(scope="module")
def offline(song, spleeter):
    mix, sr = song
    return separate_array(spleeter, mix, sr, segment_s=2.0)


@pytest.fixture
def client(engine_endpoint):
    with Client(engine_endpoint, timeout_s=30) as c:
        yield c


def test_one_shot_equals_in_process_with_progress(client, song, offline):
    mix, sr = song
    seen = []
    stems = client.separate(mix, sr, "spleeter-2stems", progress=seen.append, chunk_s=3.0, **OPTIONS)
    assert list(stems) == ["vocals", "accompaniment"] and stems.model == "spleeter-2stems"
    assert stems.sample_rate == sr and stems.latency_samples == 0
    for name in stems:
        assert stems[name].shape == mix.shape and stems[name].dtype == np.float32
        assert float(np.abs(stems[name] - offline[name]).max()) <= 1e-5
    assert seen and seen[-1] == pytest.approx(1.0) and all(a <= b for a, b in zip(seen, seen[1:]))


@pytest.mark.parametrize("seed", [0, 1])
def test_any_chunking_equals_offline(client, song, offline, seed):
    mix, sr = song
    rng = np.random.default_rng(seed)
    session = client.open("spleeter-2stems", sr, 2, **OPTIONS)
    assert session.latency_samples > 0
    parts, pos = [], 0
    while pos < mix.shape[1]:  # 1 sample to 3 s
        n = int(rng.choice([1, 7, 512, 4096, 44100, 3 * 44100]))
        block = mix[:, pos:pos + n]
        out = session.push(block)
        pos += block.shape[1]
        parts.append(out)
        got = sum(p["vocals"].shape[1] for p in parts)
        assert got >= pos - session.latency_samples  # the stated latency bounds the lag
    parts.append(session.close())
    for name in offline:
        streamed = np.concatenate([p[name] for p in parts], axis=1)
        assert streamed.shape == mix.shape
        assert float(np.abs(streamed - offline[name]).max()) <= 1e-5


def test_other_rate_and_mono_come_back_at_their_rate(client, song, spleeter):
    mix, sr = song
    mono = mix[:1, :5 * sr:2].copy()  # 5 s at 22.05 kHz, mono
    want = separate_array(spleeter, mono, sr // 2)
    got = client.separate(mono, sr // 2, "spleeter-2stems")
    for name in want:
        assert got[name].shape == mono.shape
        assert float(np.abs(got[name] - want[name]).max()) <= 1e-5


def test_two_stems_and_errors(client, song):
    mix, sr = song
    with pytest.raises(UnknownModel, match="no-such-model"):
        client.separate(mix[:, :1000], sr, "no-such-model")
    with pytest.raises(ModelError):
        client.open("no-such-model", sr, 2)
    bad = mix[:, :1000].copy()
    bad[0, 123] = np.inf
    with pytest.raises(BadAudio, match="frame 123"):
        client.separate(bad, sr, "spleeter-2stems")
    out = client.separate(mix[:, :sr], sr, "spleeter-2stems", two_stems="vocals")
    assert list(out) == ["vocals", "no_vocals"]


def test_sessions_share_one_warm_model(client, engine_endpoint, song):
    mix, sr = song
    with Client(engine_endpoint) as other:
        a = client.open("spleeter-2stems", sr, 2)
        b = other.open("spleeter-2stems", sr, 2)
        status = client.status()
        [model] = [m for m in status["models"] if m["name"] == "spleeter-2stems"]
        assert model["sessions"] >= 2 and status["sessions"] >= 2
        a.cancel()
        b.cancel()


def test_close_blocks_stream_the_tail_in_replies_of_at_most_2_16_frames(client, eval_dir, spleeter):
    """The default 34 s segment covers the whole 14 s song: all of it comes at close, in replies
    of 2**16 frames (and the rest), each yielded as it arrives; together they equal in process."""
    from engine.scheduler import MAX_REPLY_FRAMES
    mix, sr = read(eval_dir / "bearlin-roads" / "mixture.wav")
    session = client.open("spleeter-2stems", sr, 2)
    assert session.push(mix)["vocals"].shape[1] == 0
    blocks = list(session.close_blocks())
    assert MAX_REPLY_FRAMES == 2 ** 16
    assert mix.shape[1] == 617_401 == 9 * 2 ** 16 + 27_577
    assert [b["vocals"].shape[1] for b in blocks] == [2 ** 16] * 9 + [27_577]
    assert session.closed and session.frames_out == mix.shape[1]
    reference = separate_array(spleeter, mix, sr)
    for name in session.stems:
        whole = np.concatenate([b[name] for b in blocks], axis=1)
        assert float(np.abs(whole - reference[name]).max()) <= 1e-5
