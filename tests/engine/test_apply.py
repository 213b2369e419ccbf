"""engine.apply: the segment grid, overlap-add, streaming == offline, shifts, bags."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from engine.apply import Streamer, apply_model, grid_for, triangle_weight
from engine.models.base import Bag
from tests.engine.toy_models import (ConvSeparator, FixedWindowSeparator, ReflectConvSeparator,
                                     ReflectFixedWindowSeparator, WindowMeanSeparator)


class Identity(torch.nn.Module):
    name = "identity"
    sources = ["same", "double"]
    sample_rate = 8000
    audio_channels = 2
    segment_frames = 700
    max_segment_frames = None
    default_overlap = 0.25

    def valid_length(self, frames):
        return frames

    def forward(self, mix):
        return torch.stack([mix, 2 * mix], dim=1)


def stream_in_cuts(streamer, mix, cuts):
    """Push ``mix`` [channels, frames] through ``streamer`` in pieces of the sizes ``cuts`` (cycled),
    close it, and return everything it gave, concatenated: [sources, channels, frames]."""
    outs, pos, i = [], 0, 0
    while pos < mix.shape[1]:
        outs.append(streamer.push(mix[:, pos:pos + cuts[i % len(cuts)]]))
        pos += cuts[i % len(cuts)]
        i += 1
    outs.append(streamer.close())
    return torch.cat(outs, dim=-1)


def reference_overlap_add(model, mix, segment, overlap):
    """Straight transcription of demucs.apply.apply_model(split=True) for one model, no shifts;
    with ``pad_mode = "reflect"`` the windows are cut from ``numpy.pad(mix, mode="reflect")``."""
    c, length = mix.shape
    reflect = getattr(model, "pad_mode", "zeros") == "reflect"
    margin = 2 * model.valid_length(segment)
    padded = torch.from_numpy(np.pad(mix.numpy(), ((0, 0), (margin, margin)), mode="reflect"))
    stride = int((1 - overlap) * segment)
    out = torch.zeros(len(model.sources), c, length)
    sw = torch.zeros(length)
    weight = triangle_weight(segment)
    for offset in range(0, length, stride):
        n = min(segment, length - offset)
        w = model.valid_length(n)
        start = offset - (w - n) // 2
        window = torch.zeros(c, w)
        lo, hi = max(0, start), min(length, start + w)
        window[:, lo - start:hi - start] = mix[:, lo:hi]
        if reflect:
            window = padded[:, margin + start:margin + start + w]
        with torch.no_grad():
            y = model(window[None])[0]
        trim = (w - n) // 2
        out[..., offset:offset + n] += weight[:n] * y[..., trim:trim + n]
        sw[offset:offset + n] += weight[:n]
    return out / sw


def test_identity_model_gives_back_the_input_exactly():
    mix = torch.randn(2, 5000)
    out = apply_model(Identity(), mix)
    assert out.shape == (2, 2, 5000)
    assert torch.max(torch.abs(out[0] - mix)) < 1e-6
    assert torch.max(torch.abs(out[1] - 2 * mix)) < 1e-6


@pytest.mark.parametrize("model", [ConvSeparator(1000, pad=5), FixedWindowSeparator(1000)])
@pytest.mark.parametrize("length", [1, 999, 1000, 1001, 4321])
def test_offline_equals_demucs_rule(model, length):
    mix = torch.randn(2, length)
    out = apply_model(model, mix, overlap=0.25)
    ref = reference_overlap_add(model, mix, 1000, 0.25)
    assert torch.max(torch.abs(out - ref)).item() < 1e-6


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 6000), cuts=st.lists(st.integers(1, 2500), min_size=1, max_size=12),
       batch=st.integers(1, 4))
def test_stream_equals_offline_for_any_chunking(length, cuts, batch):
    model = FixedWindowSeparator(800)
    mix = torch.randn(2, length, generator=torch.Generator().manual_seed(length))
    offline = apply_model(model, mix)
    s = Streamer(model, batch_segments=batch)
    streamed = stream_in_cuts(s, mix, cuts)
    assert streamed.shape == offline.shape
    assert torch.max(torch.abs(streamed - offline)).item() < 1e-5


@pytest.mark.parametrize("model, zeros", [
    (ReflectConvSeparator(1000, pad=300), ConvSeparator(1000, pad=300)),
    (ReflectFixedWindowSeparator(1000), FixedWindowSeparator(1000))], ids=["context-300", "fixed-window"])
@pytest.mark.parametrize("length", [1, 2, 37, 299, 999, 1000, 1001, 2500, 6000])
def test_offline_reflect_equals_numpy_reflect_rule(model, zeros, length):
    """pad_mode "reflect": windows past the ends hold numpy.pad(mode="reflect") of the track,
    also where a window is longer than the track (mirrored again and again)."""
    mix = torch.randn(2, length, generator=torch.Generator().manual_seed(length))
    out = apply_model(model, mix, overlap=0.25)
    ref = reference_overlap_add(model, mix, 1000, 0.25)
    assert torch.max(torch.abs(out - ref)).item() < 1e-6
    # the same weights with zeros past the ends: the padding reaches the output
    assert torch.max(torch.abs(out - apply_model(zeros, mix, overlap=0.25))).item() > 1e-3


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 6000), cuts=st.lists(st.integers(1, 2500), min_size=1, max_size=12),
       batch=st.integers(1, 4), fixed=st.booleans())
def test_reflect_stream_equals_offline_for_any_chunking(length, cuts, batch, fixed):
    """Mirroring at the start uses frames that every window already holds, at the end only frames
    known once the track is closed: streamed == offline, also for tracks shorter than a segment."""
    model = ReflectFixedWindowSeparator(800) if fixed else ReflectConvSeparator(800, pad=300)
    mix = torch.randn(2, length, generator=torch.Generator().manual_seed(length))
    offline = apply_model(model, mix)
    s = Streamer(model, batch_segments=batch)
    streamed = stream_in_cuts(s, mix, cuts)
    assert streamed.shape == offline.shape == (2, 2, length)
    assert torch.max(torch.abs(streamed - offline)).item() < 1e-5


def test_unknown_pad_mode_is_refused():
    model = ConvSeparator(1000)
    model.pad_mode = "wrap"
    with pytest.raises(ValueError, match="pad_mode"):
        apply_model(model, torch.zeros(2, 10))


def test_shifts_are_deterministic_and_average_shifted_passes():
    model = FixedWindowSeparator(1000)  # not shift-equivariant: its windows see zeros at their edges
    mix = torch.randn(2, 3000)
    a = apply_model(model, mix, shifts=2, seed=3)
    b = apply_model(model, mix, shifts=2, seed=3)
    c = apply_model(model, mix, shifts=2, seed=4)
    assert torch.equal(a, b)
    assert torch.max(torch.abs(a - c)).item() > 1e-4
    # A shift of s frames = s zeros in front, output trimmed by s; check one pass by hand.
    import random
    rng = random.Random(3)
    max_shift = int(0.5 * model.sample_rate)
    prefixes = [max_shift - rng.randint(0, max_shift) for _ in range(2)]
    manual = sum(apply_model(model, torch.cat([torch.zeros(2, p), mix], 1))[..., p:] for p in prefixes) / 2
    assert torch.max(torch.abs(a - manual)).item() < 1e-5


def test_bag_is_per_source_weighted_average_of_members():
    m1, m2 = ConvSeparator(1000, pad=1, seed=1), ConvSeparator(1000, pad=1, seed=2)
    bag = Bag("pair", [m1, m2], weights=[[1.0, 0.0], [3.0, 1.0]])
    mix = torch.randn(2, 2500)
    out = apply_model(bag, mix)
    o1, o2 = apply_model(m1, mix), apply_model(m2, mix)
    assert torch.max(torch.abs(out[0] - (o1[0] + 3 * o2[0]) / 4)).item() < 1e-6
    assert torch.max(torch.abs(out[1] - o2[1])).item() < 1e-6


@pytest.mark.parametrize("segment", [1, 2, 7, 44100, 1503232])
@pytest.mark.parametrize("power", [1.0, 1.5, 2.0])
def test_triangle_weight_is_demucs_weight_bit_for_bit_and_shared(segment, power):
    # demucs.apply.apply_model: weight = th.cat([th.arange(1, segment // 2 + 1),
    #     th.arange(segment - segment // 2, 0, -1)]); weight = (weight / weight.max())**transition_power
    demucs = torch.cat([torch.arange(1, segment // 2 + 1), torch.arange(segment - segment // 2, 0, -1)])
    demucs = (demucs / demucs.max()) ** power
    ours = triangle_weight(segment, power)
    assert ours.dtype == torch.float32 and ours.shape == (segment,)
    assert torch.equal(ours, demucs)
    assert triangle_weight(segment, power) is ours  # one per (segment, power): sessions share it


def test_tiny_pushes_are_merged_into_few_chunks_and_equal_offline():
    from engine.apply import MERGE_FRAMES, OverlapAdd
    model = FixedWindowSeparator(segment_frames=1000)
    segment, stride = grid_for(model, None, 0.25)
    runner = OverlapAdd(model, segment, stride)
    mix = torch.randn(2, 999 + MERGE_FRAMES, generator=torch.Generator().manual_seed(1))
    outs, segs = [], []
    for i in range(999):  # 1-frame pushes, less than a window: nothing runs yet
        segs += runner.take(mix[:, i:i + 1])
    assert not segs
    assert [c.shape[1] for c in runner.inp] == [512, 256, 128, 64, 32, 4, 2, 1]  # 999 in binary
    big = mix[:, 999:]
    runner.run(runner.take(big))
    # the big push is kept as it came (its tail, a view), not merged into a copy
    assert runner.inp[-1].untyped_storage().data_ptr() == mix.untyped_storage().data_ptr()
    outs.append(runner.ready())
    runner.run(runner.take(final=True))
    outs.append(runner.ready())
    expected = apply_model(model, mix, overlap=0.25)
    assert float((torch.cat(outs, dim=-1) - expected).abs().max()) <= 1e-6


def test_grid_validates_overrides():
    model = FixedWindowSeparator(1000)
    assert grid_for(model) == (1000, 750)
    assert grid_for(model, overlap=0.5) == (1000, 500)
    with pytest.raises(ValueError, match="longer than"):
        grid_for(model, segment_s=1000 / 8000 * 2)
    with pytest.raises(ValueError, match="overlap"):
        grid_for(model, overlap=1.0)


def test_queued_segments_hold_no_audio_and_input_is_kept_until_they_run():
    """take() returns segment positions only; the window is cut from the runner's input when the
    segment runs, and the input before the next segment to run is dropped only then."""
    from engine.apply import OverlapAdd
    model = FixedWindowSeparator(segment_frames=1000)
    segment, stride = grid_for(model, None, 0.25)
    runner = OverlapAdd(model, segment, stride)
    mix = torch.randn(2, 5000, generator=torch.Generator().manual_seed(0))
    segs = runner.take(mix[:, :4000])
    assert [s.k for s in segs] and not hasattr(segs[0], "window")
    assert runner.inp_start == 0 and sum(c.shape[1] for c in runner.inp) == 4000  # nothing dropped yet
    runner.run(segs)
    assert runner.inp_start == max(0, len(segs) * stride - runner.context) > 0
    assert sum(c.shape[1] for c in runner.inp) == runner.received - runner.inp_start == 4000 - runner.inp_start
    runner.run(runner.take(mix[:, 4000:]))
    runner.run(runner.take(final=True))
    out = torch.cat([runner.ready()], dim=-1)
    expected = apply_model(model, mix, overlap=0.25)
    assert out.shape == expected.shape and float((out - expected).abs().max()) <= 1e-6


def reference_past_context(model, mix, segment, overlap, context, lookahead):
    """Transcription of the past-context rule: each segment's window of W = valid_length(context +
    segment + lookahead) frames ends ``lookahead`` after the end of a whole segment; zeros outside."""
    c, length = mix.shape
    stride = int((1 - overlap) * segment)
    w = model.valid_length(context + segment + lookahead)
    out, sw = torch.zeros(len(model.sources), c, length), torch.zeros(length)
    weight = triangle_weight(segment)
    padded = torch.cat([torch.zeros(c, w), mix, torch.zeros(c, w)], dim=1)
    for offset in range(0, length, stride):
        n = min(segment, length - offset)
        start = offset + segment + lookahead - w
        with torch.no_grad():
            y = model(padded[None, :, w + start:w + start + w])[0]
        out[..., offset:offset + n] += weight[:n] * y[..., offset - start:offset - start + n]
        sw[offset:offset + n] += weight[:n]
    return out / sw


@pytest.mark.parametrize("length", [1, 300, 999, 1000, 2500, 6000])
def test_past_context_windows_reach_back_and_equal_the_rule(length):
    model = ConvSeparator(1000, pad=300)  # a receptive field of 601 frames: context changes the output
    mix = torch.randn(2, length, generator=torch.Generator().manual_seed(length))
    out = apply_model(model, mix, overlap=0.25, context_s=2000 / 8000, lookahead_s=100 / 8000)
    ref = reference_past_context(model, mix, 1000, 0.25, 2000, 100)
    assert torch.max(torch.abs(out - ref)).item() < 1e-6
    if length > 1000:  # the centred rule's windows see other frames
        assert torch.max(torch.abs(out - apply_model(model, mix, overlap=0.25))).item() > 1e-3


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 6000), cuts=st.lists(st.integers(1, 2500), min_size=1, max_size=12),
       context=st.integers(0, 5000), lookahead=st.integers(0, 400), reflect=st.booleans())
def test_past_context_stream_equals_offline_for_any_chunking(length, cuts, context, lookahead, reflect):
    """Windows that reach far back (longer than the input received so far, mirrored or zero past
    the track's start) still give streamed == offline, for tracks shorter than a segment too."""
    # every output frame depends on the whole window, the mirrored part far back included
    model = WindowMeanSeparator(800, "reflect" if reflect else "zeros")
    opts = {"context_s": context / 8000, "lookahead_s": lookahead / 8000}
    mix = torch.randn(2, length, generator=torch.Generator().manual_seed(length))
    offline = apply_model(model, mix, **opts)
    s = Streamer(model, **opts)
    assert torch.max(torch.abs(stream_in_cuts(s, mix, cuts) - offline)).item() < 1e-5


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 6000), context=st.integers(0, 5000), lookahead=st.integers(0, 400),
       reflect=st.booleans())
def test_past_context_closed_track_equals_a_stream_of_it_then_silence(length, context, lookahead, reflect):
    """What a plugin host does: the track, then latency frames of silence, never a close. Under the
    past-context rule a closed track gives exactly that (zeros past the end, even with "reflect")."""
    model = WindowMeanSeparator(800, "reflect" if reflect else "zeros")
    opts = {"context_s": context / 8000, "lookahead_s": lookahead / 8000}
    mix = torch.randn(2, length, generator=torch.Generator().manual_seed(length))
    offline = apply_model(model, mix, **opts)
    s = Streamer(model, **opts)
    latency = s.latency_frames
    live = torch.cat([s.push(mix), s.push(torch.zeros(2, latency))], dim=-1)
    assert live.shape[-1] >= length
    assert torch.max(torch.abs(live[..., :length] - offline)).item() < 1e-6


@pytest.mark.parametrize("length", [1, 2, 37, 700, 2500])
def test_past_context_reflect_windows_mirror_their_trailing_silence(length, monkeypatch):
    """A "reflect" model's past-context windows: the trailing run of exact zeros (past a closed end,
    or the silence a host sends after the track) holds numpy.pad(mode="reflect") of the window up to
    its last non-zero frame; "zeros" models keep the zeros."""
    from engine.apply import OverlapAdd
    mix = torch.randn(2, length, generator=torch.Generator().manual_seed(length))

    def last_window(pad_mode):
        runner = OverlapAdd(WindowMeanSeparator(800, pad_mode), 800, 600, context_frames=1000, lookahead_frames=100)
        last = runner.take(mix, final=True)[-1]
        window = torch.empty(2, last.w)
        runner.fill_window(last, window)
        return last, window

    last, zeros = last_window("zeros")
    assert float(zeros[:, length - last.start:].abs().max()) == 0.0  # past the end
    mirrored = last_window("reflect")[1]
    with monkeypatch.context() as m:
        m.setattr(OverlapAdd, "_mirror_trailing_silence", staticmethod(lambda out: None))
        raw = last_window("reflect")[1]
    z = length - last.start  # the window's frames [z, w) are past the track's end
    assert float(raw[:, z:].abs().max()) == 0.0 and float(raw[:, z - 1].abs().max()) > 0
    expected = np.pad(raw[:, :z].numpy(), ((0, 0), (0, last.w - z)), mode="reflect")
    assert np.array_equal(mirrored.numpy(), expected)


def test_centred_rule_still_mirrors_at_a_closed_end():
    """Offline (the centred rule) keeps mirroring past a closed end (issue 11's short clips)."""
    model = ReflectConvSeparator(1000, pad=300)
    mix = torch.randn(2, 2500, generator=torch.Generator().manual_seed(1))
    padded = apply_model(model, torch.cat([mix, torch.zeros(2, 3000)], dim=1))[..., :2500]
    assert torch.max(torch.abs(apply_model(model, mix) - padded)).item() > 1e-3


def test_past_context_latency_is_segment_plus_lookahead_exactly():
    from engine.apply import OverlapAdd
    model = ConvSeparator(800, pad=30)
    runner = OverlapAdd(model, 800, 600, context_frames=3000, lookahead_frames=160)
    assert runner.latency_frames == 800 + 160 - 1
    mix = torch.randn(2, 5000)
    assert runner.push(mix[:, :959]).shape[-1] == 0  # nothing final after latency frames
    assert runner.push(mix[:, 959:960]).shape[-1] == 600  # one more: the first stride


@pytest.mark.parametrize("opts, match", [
    ({"context_s": -1.0}, "context_s must be"), ({"lookahead_s": float("nan")}, "lookahead_s must be"),
    ({"context_s": 61.0}, r"\[0, 60\]"), ({"context_s": True}, "context_s must be")])
def test_past_context_values_are_checked(opts, match):
    with pytest.raises(ValueError, match=match):
        apply_model(ConvSeparator(800), torch.zeros(2, 10), **opts)


def test_past_context_window_the_network_cannot_take_is_refused():
    with pytest.raises(ValueError, match="a window of context 0.5 s"):
        apply_model(FixedWindowSeparator(1000), torch.zeros(2, 10), context_s=0.5)


def test_past_context_cost_per_second_of_audio_is_bounded():
    # 60 s of context every 0.75 s would put each second of audio through the network 80 times
    with pytest.raises(ValueError, match="the limit is 20"):
        apply_model(ConvSeparator(8000), torch.zeros(2, 10), context_s=60.0)
    apply_model(ConvSeparator(8000), torch.zeros(2, 10), context_s=4.0, lookahead_s=0.5)  # 7x: fine
