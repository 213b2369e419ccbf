"""engine.ensemble: EnsembleTrack (avg, median, max_spec, min_spec) equals the combination of its
members' separate outputs; streaming == offline; latency; residual."""
import numpy as np
import pytest
import torch
from torch import nn

from engine.ensemble import EnsembleTrack, ResidualTrack, open_track, residual_target
from engine.presets import Member, Plan
from engine.sessions import TrackSeparator, separate_array

RATE = 16000  # the client's rate


class Toy(nn.Module):
    """A random 1-D conv net with any stem set, rate and segment (real nn.Module, not a fake)."""
    audio_channels = 2
    default_overlap = 0.25

    def __init__(self, sources, sample_rate, segment_frames, pad=2, seed=0, linear=False):
        super().__init__()
        torch.manual_seed(seed)
        self.name = f"toy-{seed}"
        self.sources, self.sample_rate, self.segment_frames, self.pad = list(sources), sample_rate, segment_frames, pad
        self.max_segment_frames = None
        self.linear = linear
        self.conv = nn.Conv1d(2, 2 * len(sources), 2 * pad + 1, padding=pad, bias=not linear)

    def valid_length(self, frames):
        return frames + 2 * self.pad

    def forward(self, mix):
        b, c, t = mix.shape
        y = self.conv(mix)
        y = y if self.linear else torch.tanh(y)
        return y.view(b, len(self.sources), c, t)


A = Toy(["vocals", "accompaniment"], 8000, 700, seed=1)
B = Toy(["vocals", "drums", "accompaniment"], 22050, 1500, pad=5, seed=2)
C = Toy(["vocals", "accompaniment"], 16000, 1000, pad=1, seed=3)
MODELS = {"a": A, "b": B, "c": C}


def mix_of(frames=6000, channels=2, seed=0):
    return (0.5 * np.random.default_rng(seed).standard_normal((channels, frames))).astype(np.float32)


def members_of(names, **member_kw):
    return [(TrackSeparator(MODELS[n], RATE, 2), Member(model=n, **member_kw.get(n, {}))) for n in names]


def run(track, mix, chunks=None):
    parts, pos = [], 0
    for n in chunks or []:
        parts.append(track.push(mix[:, pos:pos + n]))
        pos += n
    if pos < mix.shape[1]:
        parts.append(track.push(mix[:, pos:]))
    parts.append(track.close())
    return {s: np.concatenate([p[s] for p in parts], axis=-1) for s in track.stems}


def spec_pick(xs, mode, n_fft, hop):
    """Independent whole-signal reference: xs float64 [k, C, L] -> [C, L]."""
    k, c, length = xs.shape
    pad = n_fft - hop
    n_frames = (pad + length - 1) // hop + 1
    total = (n_frames - 1) * hop + n_fft
    x = np.zeros((k, c, total))
    x[..., pad:pad + length] = xs
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    y = np.zeros((c, total))
    norm = np.zeros(total)
    for j in range(n_frames):
        spec = np.fft.rfft(x[..., j * hop:j * hop + n_fft] * w, axis=-1)
        idx = np.abs(spec).argmax(0) if mode == "max_spec" else np.abs(spec).argmin(0)
        picked = np.take_along_axis(spec, idx[None], 0)[0]
        y[:, j * hop:j * hop + n_fft] += np.fft.irfft(picked, n=n_fft, axis=-1) * w
        norm[j * hop:j * hop + n_fft] += w ** 2
    return y[:, pad:pad + length] / norm[pad:pad + length]


def separate_outputs(names, mix):
    return {n: separate_array(MODELS[n], mix, RATE) for n in names}


def test_avg_is_weighted_average_with_union_of_stems():
    mix = mix_of()
    sep = separate_outputs("ab", mix)
    ens = EnsembleTrack(members_of("ab", a=dict(weights={"vocals": 3.0}), b=dict(weight=1.0)), "avg")
    assert ens.stems == ["vocals", "accompaniment", "drums"]
    out = run(ens, mix)
    want_v = (3 * sep["a"]["vocals"] + sep["b"]["vocals"]) / 4
    want_a = (sep["a"]["accompaniment"] + sep["b"]["accompaniment"]) / 2
    np.testing.assert_allclose(out["vocals"], want_v, atol=1e-5)
    np.testing.assert_allclose(out["accompaniment"], want_a, atol=1e-5)
    np.testing.assert_allclose(out["drums"], sep["b"]["drums"], atol=1e-5)  # only b has drums
    assert all(v.shape == mix.shape for v in out.values())


def test_zero_weight_leaves_member_out_of_stem():
    mix = mix_of(3000)
    sep = separate_outputs("ab", mix)
    out = run(EnsembleTrack(members_of("ab", b=dict(weights={"vocals": 0.0})), "avg"), mix)
    np.testing.assert_allclose(out["vocals"], sep["a"]["vocals"], atol=1e-5)


def test_median_of_three():
    mix = mix_of()
    sep = separate_outputs("abc", mix)
    out = run(EnsembleTrack(members_of("abc"), "median"), mix)
    want = np.median(np.stack([sep[n]["vocals"] for n in "abc"]), axis=0)
    np.testing.assert_allclose(out["vocals"], want, atol=1e-5)
    np.testing.assert_allclose(out["drums"], sep["b"]["drums"], atol=1e-5)


@pytest.mark.parametrize("mode", ["max_spec", "min_spec"])
def test_spec_pick_matches_whole_signal_reference(mode):
    mix = mix_of(5000)
    sep = separate_outputs("ab", mix)
    out = run(EnsembleTrack(members_of("ab"), mode, n_fft=256, hop=64), mix)
    for stem in ("vocals", "accompaniment"):
        xs = np.stack([sep[n][stem] for n in "ab"]).astype(np.float64)
        np.testing.assert_allclose(out[stem], spec_pick(xs, mode, 256, 64), atol=1e-5)
    # one member only: the STFT round trip gives its stem back
    np.testing.assert_allclose(out["drums"], sep["b"]["drums"], atol=1e-5)


def test_spec_pick_of_identical_members_is_identity():
    mix = mix_of(3000)
    sep = separate_array(A, mix, RATE)
    out = run(EnsembleTrack(members_of("aa"), "max_spec", n_fft=128, hop=32), mix)
    np.testing.assert_allclose(out["vocals"], sep["vocals"], atol=1e-5)


@pytest.mark.parametrize("algorithm", ["avg", "median", "max_spec", "min_spec"])
def test_streaming_equals_offline_in_random_chunks(algorithm):
    mix = mix_of(9000, channels=1, seed=4)
    names = "abc"

    def make():
        return EnsembleTrack([(TrackSeparator(MODELS[n], RATE, 1), Member(model=n)) for n in names],
                             algorithm, n_fft=512, hop=128)
    offline = run(make(), mix)
    rng = np.random.default_rng(5)
    chunks = list(rng.integers(1, 1500, 30))
    track = make()
    streamed = run(track, mix, chunks)
    for s in offline:
        assert streamed[s].shape == offline[s].shape == mix.shape
        np.testing.assert_allclose(streamed[s], offline[s], atol=1e-5)


@pytest.mark.parametrize("algorithm", ["avg", "max_spec"])
def test_latency_is_max_member_latency_and_bounds_the_stream(algorithm):
    lin = {n: Toy(["vocals", "accompaniment"], r, seg, pad=p, seed=7, linear=True)
           for n, r, seg, p in (("x", 8000, 700, 2), ("y", 16000, 1300, 4))}
    members = [(TrackSeparator(lin[n], RATE, 1), Member(model=n)) for n in "xy"]
    lat = [t.latency_samples for t, _ in members]
    ens = EnsembleTrack(members, algorithm, n_fft=256, hop=64)
    extra = 255 if algorithm == "max_spec" else 0
    assert ens.latency_samples == max(lat) + extra
    # As StemStream uses it: a delay line of latency_samples frames per stem never runs dry, and an
    # impulse comes out exactly latency_samples later (members linear: the output at the impulse is
    # the impulse response's centre).
    frames, at = 6000, 3000
    mix = np.zeros((1, frames), np.float32)
    mix[0, at] = 1.0
    offline = run(EnsembleTrack([(TrackSeparator(lin[n], RATE, 1), Member(model=n)) for n in "xy"],
                                algorithm, n_fft=256, hop=64), mix)
    pushed, out, tight = 0, 0, False
    delayed = np.zeros((1, 0), np.float32)
    for n in np.random.default_rng(0).integers(1, 10, 3000):
        n = int(min(n, frames - pushed))
        if not n:
            break
        got = ens.push(mix[:, pushed:pushed + n])
        pushed += n
        out += got["vocals"].shape[-1]
        assert out >= pushed - ens.latency_samples  # the delay line never runs dry
        tight |= out - (pushed - ens.latency_samples) <= 20
        delayed = np.concatenate([delayed, got["vocals"]], axis=-1)
    assert tight  # and the bound is reached (to a few frames: the chunks, the resampler's block)
    stream = np.concatenate([np.zeros((1, ens.latency_samples), np.float32), delayed], axis=-1)
    peak = int(np.argmax(np.abs(stream[0])))
    assert peak == int(np.argmax(np.abs(offline["vocals"][0]))) + ens.latency_samples
    # and that is the impulse's frame to within the members' kernels (+-4 frames at 16 kHz)
    assert abs(peak - (at + ens.latency_samples)) <= 8


@pytest.mark.parametrize("algorithm", [None, "avg", "max_spec"])
def test_residual_stems_sum_to_input(algorithm):
    mix = mix_of(7000, seed=9)
    if algorithm is None:
        track = ResidualTrack(TrackSeparator(B, RATE, 2))
    else:
        track = ResidualTrack(EnsembleTrack(members_of("ab"), algorithm, n_fft=256, hop=64))
    assert track.target == "accompaniment"
    out = run(track, mix, [100, 2000, 7])
    total = sum(out[s].astype(np.float64) for s in track.stems)
    assert np.max(np.abs(total - mix)) < 1e-6
    assert track.latency_samples == track.track.latency_samples


def test_residual_target_choice():
    assert residual_target(["drums", "bass", "other", "vocals"]) == "other"
    assert residual_target(["vocals", "no_vocals"]) == "no_vocals"
    assert residual_target(["vocals", "accompaniment"]) == "accompaniment"
    assert residual_target(["vocals", "instrumental"]) == "instrumental"
    assert residual_target(["x", "y"]) == "y"
    assert residual_target(["x", "y"], "x") == "x"


def test_open_track_from_plan_with_two_stems_and_residual():
    plan = Plan(name="p", preset="p", members=(Member(model="a"), Member(model="b")), algorithm="avg",
                options={"two_stems": "vocals", "residual": True, "overlap": 0.5})
    mix = mix_of(4000)
    track = open_track(plan, MODELS, RATE, 2, where="test")
    assert track.stems == ["vocals", "no_vocals"] and track.target == "no_vocals"
    out = run(track, mix)
    assert np.max(np.abs(out["vocals"] + out["no_vocals"] - mix)) < 1e-6
