"""How a separator is applied to a track: a segment grid, overlap-add, shifts, bags.

The model is apart from how it is applied (as in demucs' ``apply.py``). Everything here works on
the model's sample rate and channel count; ``engine.audio`` converts before and after.

The grid (one per model, anchored at the track's first sample)::

    segment k covers input frames [k * stride, k * stride + segment)   for every k * stride < length
    stride = int((1 - overlap) * segment)

A segment of n frames (n < segment only near the end) is fed to the network as a window of
``model.valid_length(n)`` frames centred on it, with real track context where it exists. Outside
[0, length) the window holds what the model's ``pad_mode`` says: "zeros" (the default; demucs'
``TensorChunk.padded``) or "reflect" (the track mirrored at its ends, ``numpy.pad(mode="reflect")``,
repeated for windows longer than the track; for networks that go wrong on digital silence, see
``engine.models.spleeter``). Past the end, reflection is only used once the track is closed, when
the end is known, so streaming still equals offline. Under the past-context rule (``context_s`` /
``lookahead_s``, a live stream's rule) neither end is used: a window holds zeros outside the track,
and a "reflect" model's window fills its leading and trailing runs of exact zeros with its audio
mirrored (a rule on the window's own frames). So a closed track gives exactly what a stream of it
followed by silence gives, which is all a plugin ever sees. The output is centre-trimmed back to n frames,
weighted by a triangle window (peak in the middle, ``** transition_power``) and overlap-added; the sum
is divided by the summed weights.

Nothing depends on a statistic of the whole track, so ``Streamer`` (fed in pieces of any size) gives
exactly the output of ``apply_model`` (fed everything at once): offline is a stream of one piece.
Frames [0, k * stride) are final as soon as segments 0..k-1 have run.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import random
from typing import Callable, Iterable

import torch

from .models.base import Bag
from .protocol import MAX_CONTEXT_S, MAX_OVERLAP, MAX_SEGMENTS_PER_S

__all__ = ["apply_model", "Streamer", "OverlapAdd", "Job", "run_jobs", "grid_for", "past_context_for"]

MERGE_FRAMES = 1 << 16  # input chunks up to this long are merged (OverlapAdd._append)
MAX_SHIFT_S = 0.5  # demucs' random time shift range for test-time augmentation
PAD_MODES = ("zeros", "reflect")  # what a window holds outside the track (Separator.pad_mode)


def reflect_index(index: torch.Tensor, length: int) -> torch.Tensor:
    """Track frames that ``numpy.pad(mode="reflect")`` puts at positions ``index`` (int64, any
    values) of a track of ``length`` frames: mirrored at frames 0 and length - 1 without repeating
    them, periodically (period 2 * length - 2) for positions more than a track away."""
    if length == 1:
        return torch.zeros_like(index)
    period = 2 * length - 2
    j = torch.remainder(index, period)
    return torch.where(j >= length, period - j, j)


@functools.lru_cache(maxsize=8)
def triangle_weight(segment_frames: int, transition_power: float = 1.0) -> torch.Tensor:
    """float32 [segment_frames]: demucs' triangle, 1 at the centre, ``** transition_power``.

    One tensor per (segment, power), shared by every runner (read only): a daemon's sessions of one
    model would otherwise hold one each (6 MB for Spleeter's 34 s segment). Built in float32 in
    place: bit-identical to demucs' ``(cat([arange(1, half + 1), arange(n - half, 0, -1)]) / max)
    ** power``, whose int64 temporaries cost 5x the result."""
    half = segment_frames // 2
    weight = torch.empty(segment_frames)
    torch.arange(1, half + 1, out=weight[:half])
    torch.arange(segment_frames - half, 0, -1, out=weight[half:])
    weight /= segment_frames - half  # the maximum
    return weight if transition_power == 1 else weight.pow_(transition_power)


def grid_for(model, segment_s: float | None = None, overlap: float | None = None) -> tuple[int, int]:
    """(segment_frames, stride_frames) for ``model`` with the user's overrides.

    Raises ValueError for an overlap outside [0, 1) or a segment the network cannot take, and for
    a grid that costs too much: overlap above ``protocol.MAX_OVERLAP`` (0.95: each frame through
    the network at most 20 times) or a stride shorter than 1 / ``protocol.MAX_SEGMENTS_PER_S``
    seconds (50 segments per second of audio) and than the model's own default stride; the
    message names the bound.
    """
    if segment_s is None:
        segment = model.segment_frames
    else:
        if not segment_s > 0:
            raise ValueError(f"segment must be > 0 seconds, got {segment_s}")
        segment = int(model.sample_rate * segment_s)
    limit = getattr(model, "max_segment_frames", None)
    if limit is not None and segment > limit:
        raise ValueError(f"{model.name}: segment {segment / model.sample_rate:.2f} s is longer than the "
                         f"{limit / model.sample_rate:.2f} s the network was trained on")
    overlap = model.default_overlap if overlap is None else overlap
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if overlap > MAX_OVERLAP:
        raise ValueError(f"overlap {overlap:g} is above {MAX_OVERLAP:g}, the limit (each frame would go "
                         f"through the network {1 / (1 - overlap):.0f} times)")
    stride = max(1, int((1 - overlap) * segment))
    # The model's own grid is what its authors chose (a tiny test model may have 86 segments/s):
    # only overrides that cost more than both it and the bound are refused.
    own_stride = max(1, int((1 - model.default_overlap) * model.segment_frames))
    if stride * MAX_SEGMENTS_PER_S < model.sample_rate and stride < own_stride:
        raise ValueError(f"a segment of {segment / model.sample_rate:g} s with overlap {overlap:g} makes "
                         f"{model.sample_rate / stride:.0f} segments per second of audio, the limit is "
                         f"{MAX_SEGMENTS_PER_S}; use a longer segment or less overlap")
    return segment, stride


MAX_WINDOW_PER_STRIDE = 20  # network input per second of audio, at most (as overlap 0.95 costs)


def past_context_for(model, segment_frames: int, context_s: float | None,
                     lookahead_s: float | None, stride_frames: int | None = None) -> dict:
    """OverlapAdd's keyword arguments for the past-context rule: {} (the centred rule) when both
    are None, else {"context_frames", "lookahead_frames"} at the model's rate.

    Raises ValueError for a negative, non-finite or too long (> MAX_CONTEXT_S) value, a window
    (context + segment + lookahead) the network cannot take, or one more than
    MAX_WINDOW_PER_STRIDE times the grid's stride (each second of audio through the network more
    than 20 times)."""
    if context_s is None and lookahead_s is None:
        return {}
    frames = {}
    for name, value in (("context_s", context_s), ("lookahead_s", lookahead_s)):
        value = 0.0 if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_CONTEXT_S:
            raise ValueError(f"{name} must be a number of seconds in [0, {MAX_CONTEXT_S:g}], got {value!r}")
        frames[name.replace("_s", "_frames")] = int(round(value * model.sample_rate))
    try:
        window = model.valid_length(frames["context_frames"] + segment_frames + frames["lookahead_frames"])
    except ValueError as e:
        raise ValueError(f"{model.name}: a window of context {context_s or 0:g} s + segment "
                         f"{segment_frames / model.sample_rate:g} s + lookahead {lookahead_s or 0:g} s: {e}") from None
    if stride_frames is not None and window > MAX_WINDOW_PER_STRIDE * stride_frames:
        raise ValueError(f"a window of {window / model.sample_rate:g} s every {stride_frames / model.sample_rate:g} s "
                         f"puts each second of audio through the network {window / stride_frames:.0f} times, "
                         f"the limit is {MAX_WINDOW_PER_STRIDE}; use less context or a longer segment")
    return frames


class Segment:
    """One segment of the grid waiting for (or back from) the network.

    k: index on the grid; offset: first track frame it covers; n: frames it covers;
    start: first track frame of its network window; w: the window's length (w >= n).
    The window's samples are copied out of the runner's input only when the segment runs
    (``OverlapAdd.fill_window``), so queued segments hold no audio of their own.
    """
    __slots__ = ("k", "offset", "n", "start", "w")

    def __init__(self, k: int, offset: int, n: int, start: int, w: int):
        self.k, self.offset, self.n, self.start, self.w = k, offset, n, start, w


class OverlapAdd:
    """One separator on one grid, fed in pieces: ``push`` returns the frames that are final.

    model: a Separator (engine.models.base).
    prefix_frames: zeros put before the first sample (a time shift); they are trimmed from the output.
    batch_segments: how many segments go through the network in one forward pass.
    autocast: a context-manager factory for the forward pass (fp16 on CUDA), or None.
    batch_key: segments of runners with equal keys (and equal window lengths) may share a forward
    pass; None means this runner only.

    ``push(chunk)`` takes float32 [channels, n] and returns float32 [sources, channels, m];
    ``close()`` returns the rest, so that all outputs together have exactly the input's length.
    The same in two phases, for a scheduler that batches segments of many tracks: ``take(chunk)``
    (or ``take(final=True)``) returns the segments whose input is complete, ``forward`` runs
    windows through the network, ``put`` hands each result back in grid order, ``ready()``
    returns the frames that became final.
    """

    def __init__(self, model, segment_frames: int, stride_frames: int, *, transition_power: float = 1.0,
                 batch_segments: int = 1, prefix_frames: int = 0,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                 batch_key: tuple | None = None, context_frames: int | None = None,
                 lookahead_frames: int | None = None):
        self.model = model
        self.segment = segment_frames
        self.stride = stride_frames
        self.weight = triangle_weight(segment_frames, transition_power)
        self.batch_segments = max(1, int(batch_segments))
        self.autocast = autocast or contextlib.nullcontext
        self.batch_key = batch_key if batch_key is not None else (id(self),)
        self.device = next(iter(model.parameters()), torch.empty(0)).device
        self.channels = model.audio_channels
        self.n_sources = len(model.sources)
        self.pad_mode = getattr(model, "pad_mode", "zeros")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"{model.name}: pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")
        # The past-context rule (context_frames / lookahead_frames given): every segment's window
        # has one length and ends lookahead frames after the end of a whole segment.
        self.past_context = context_frames is not None or lookahead_frames is not None
        if self.past_context:
            self.lookahead = int(lookahead_frames or 0)
            self.window = model.valid_length(int(context_frames or 0) + segment_frames + self.lookahead)
            window = self.window
        else:
            window = model.valid_length(segment_frames)
        # How far before a segment its network window may reach (centred context, or past context);
        # with "reflect", also how far back from the track's end a final window's mirrored part may
        # reach (at most a segment and the lookahead).
        self.context = max(0, window - segment_frames, model.valid_length(1) - 1)
        if self.past_context:
            self.context = max(self.context, segment_frames + self.lookahead + 1)
            # A segment's window ends this far after its first frame.
            self.reach = segment_frames + self.lookahead
        else:
            # A segment's window ends this far after its first frame: frames [0, k * stride) are
            # final once input frame k * stride - stride + reach - 1 has arrived, so output lags
            # input by at most reach - 1 frames (the runner's latency).
            self.reach = segment_frames + (window - segment_frames) - (window - segment_frames) // 2
        self.prefix_left = prefix_frames  # output frames still to drop
        # Input frames [inp_start, received) as the chunks pushed (float32 [channels, n] each), not
        # concatenated: a window copies from them; no growing buffer copied on every push.
        self.inp: list[torch.Tensor] = []
        self.inp_start = 0
        self.received = 0
        self.next_k = 0  # next segment index to take
        self.done_k = 0  # segments [0, done_k) are accumulated
        self.acc = torch.zeros(self.n_sources, self.channels, 0)  # accumulated output from out_start
        self.acc_w = torch.zeros(0)
        self.out_start = 0  # first frame not yet returned
        self.closed = False
        if prefix_frames:
            self._append(torch.zeros(self.channels, prefix_frames))

    @property
    def latency_frames(self) -> int:
        """Output lags the input fed by at most this many frames (before close)."""
        return self.reach - 1

    # -- input --------------------------------------------------------------------------------
    def _append(self, chunk: torch.Tensor) -> None:
        if chunk.shape[1]:
            self.inp.append(chunk)
            # Small pushes are merged as a binary counter does (a run of 1-frame pushes leaves
            # O(log) chunks, each frame copied O(log) times); chunks over MERGE_FRAMES never are.
            while (len(self.inp) > 1 and self.inp[-2].shape[1] <= self.inp[-1].shape[1]
                   and self.inp[-2].shape[1] + self.inp[-1].shape[1] <= MERGE_FRAMES):
                last = self.inp.pop()
                self.inp[-1] = torch.cat([self.inp[-1], last], dim=1)
        self.received += chunk.shape[1]

    def fill_window(self, seg: Segment, out: torch.Tensor) -> None:
        """Write the network window of ``seg`` into ``out`` (float32 [channels, seg.w]): input frames
        [seg.start, seg.start + seg.w) of the track; outside [0, received) zeros, or with
        ``pad_mode`` "reflect" the track mirrored at frame 0, and at its last frame once closed
        (the past-context rule: the window's silent ends mirrored, ``_mirror_silence``)."""
        assert out.shape == (self.channels, seg.w), out.shape  # [channels, window]
        start, length = seg.start, seg.w
        lo, hi = max(start, 0), min(start + length, self.received)
        self._copy(lo, hi, out[:, lo - start:hi - start])
        if self.past_context:  # a live stream's rule: only the window's own frames
            out[:, :max(0, min(lo, start + length) - start)].zero_()
            out[:, max(0, hi - start):].zero_()
            if self.pad_mode == "reflect":
                self._mirror_silence(out)
            return
        if self.pad_mode == "reflect" and self.received and (start < 0 or self.closed):
            pads = [(start, min(0, start + length))]  # before the track: mirrored at frame 0
            if self.closed:  # past its end, now known: mirrored at the last frame
                pads.append((max(self.received, start), start + length))
            for i, (a, b) in enumerate(pads):
                if a < b:
                    # Before the track, the mirror spans only what this window holds (a window
                    # reaching far back may be longer than the input received so far): the same
                    # frames whenever the window is filled, so streaming equals offline.
                    span = min(self.received, start + length) if i == 0 else self.received
                    src = reflect_index(torch.arange(a, b), span)
                    first, last = int(src.min()), int(src.max()) + 1
                    part = torch.empty(self.channels, last - first)
                    self._copy(first, last, part)
                    out[:, a - start:b - start] = part[:, src - first]
                    lo, hi = min(lo, a), max(hi, b)
        if hi <= lo:
            out.zero_()
            return
        out[:, :lo - start].zero_()
        out[:, hi - start:].zero_()

    @staticmethod
    def _mirror_silence(out: torch.Tensor) -> None:
        """A live stream's window (the past-context rule) never learns where the track starts or
        ends: before and after it, it sees the silence a host plays. A "reflect" model's window
        fills its leading and trailing runs of exact zeros (every channel) with its audio mirrored:
        ``numpy.pad(mode="reflect")`` of the window's frames from its first to its last non-zero
        frame (at a track's first frame, as ``numpy.pad`` of the track). A rule on the window's own
        frames: a closed track, a stream of it between silences, any chunking: the same windows."""
        # out: [channels, window]
        nonzero = torch.nonzero(out.abs().amax(dim=0)).flatten()
        if nonzero.numel() == 0:
            return
        first, end = int(nonzero[0]), int(nonzero[-1]) + 1
        if first > 0 or end < out.shape[1]:
            src = first + reflect_index(torch.arange(-first, out.shape[1] - first), end - first)
            out.copy_(out[:, src])

    def _copy(self, lo: int, hi: int, out: torch.Tensor) -> None:
        """Copy track frames [lo, hi) (within the input received) into ``out`` [channels, hi - lo]."""
        if hi <= lo:
            return
        if lo < self.inp_start:
            raise RuntimeError(f"internal: window at {lo} reaches before retained input {self.inp_start}")
        pos = self.inp_start  # track frame of the chunk's first frame
        for chunk in self.inp:
            a, b = max(lo, pos), min(hi, pos + chunk.shape[1])
            if a < b:
                out[:, a - lo:b - lo] = chunk[:, a - pos:b - pos]
            pos += chunk.shape[1]
            if pos >= hi:
                break

    # -- the grid -----------------------------------------------------------------------------
    def take(self, chunk: torch.Tensor | None = None, final: bool = False) -> list[Segment]:
        """Feed ``chunk`` (float32 [channels, n]); return the segments now complete, with their
        windows. ``final=True`` closes the track and returns every remaining segment."""
        if self.closed:
            raise RuntimeError("push after close")
        if chunk is not None:
            assert chunk.dim() == 2 and chunk.shape[0] == self.channels, chunk.shape  # [channels, n]
            self._append(chunk.detach().to("cpu", torch.float32))
        self.closed = final
        ready = []
        k = self.next_k
        while True:
            offset = k * self.stride
            if final:
                if offset >= self.received:
                    break
                n = min(self.segment, self.received - offset)
            else:
                n = self.segment
            if self.past_context:
                w = self.window
                start = offset + self.reach - w
            else:
                w = self.model.valid_length(n)
                start = offset - (w - n) // 2
            if not final and start + w > self.received:
                break
            ready.append(Segment(k, offset, n, start, w))
            k += 1
        self.next_k = k
        return ready

    def windows(self, segments: list[Segment]) -> torch.Tensor:
        """float32 [batch, channels, w]: the network input of segments of one window length."""
        out = torch.empty(len(segments), self.channels, segments[0].w)
        for seg, row in zip(segments, out):
            self.fill_window(seg, row)
        return out

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """float32 [batch, channels, w] -> float32 [batch, sources, channels, w] on the CPU."""
        b, _, w = windows.shape
        assert windows.shape == (b, self.channels, w), windows.shape  # [batch, channels, window]
        with torch.inference_mode(), self.autocast():
            out = self.model(windows.to(self.device))
        assert out.shape == (b, self.n_sources, self.channels, w), out.shape
        return out.float().cpu()

    def put(self, seg: Segment, out: torch.Tensor) -> None:
        """The network's output for ``seg``: float32 [sources, channels, w]; segments in grid order."""
        if seg.k != self.done_k:
            raise RuntimeError(f"internal: segment {seg.k} came back before segment {self.done_k}")
        trim = seg.offset - seg.start
        self._accumulate(seg.offset, out[..., trim:trim + seg.n])
        self.done_k += 1
        # Input before the next segment's window is no longer needed.
        keep_from = max(0, self.done_k * self.stride - self.context)
        while self.inp and self.inp_start + self.inp[0].shape[1] <= keep_from:
            self.inp_start += self.inp.pop(0).shape[1]
        if self.inp and keep_from > self.inp_start:
            self.inp[0] = self.inp[0][:, keep_from - self.inp_start:]
        self.inp_start = max(self.inp_start, keep_from)

    def run(self, segments: list[Segment]) -> None:
        """Run segments through the network here, ``batch_segments`` at a time."""
        i = 0
        while i < len(segments):
            group = [segments[i]]
            while (i + len(group) < len(segments) and len(group) < self.batch_segments
                   and segments[i + len(group)].w == group[0].w):
                group.append(segments[i + len(group)])
            out = self.forward(self.windows(group))
            for seg, seg_out in zip(group, out):
                self.put(seg, seg_out)
            i += len(group)

    def _accumulate(self, offset: int, seg_out: torch.Tensor) -> None:
        n = seg_out.shape[-1]
        end = offset + n
        have = self.out_start + self.acc.shape[-1]
        if end > have:  # grow: one new buffer, the frames kept copied in (no zeros temporary)
            kept = self.acc.shape[-1]
            acc = torch.zeros(self.n_sources, self.channels, kept + end - have)
            acc_w = torch.zeros(kept + end - have)
            acc[..., :kept] = self.acc
            acc_w[:kept] = self.acc_w
            self.acc, self.acc_w = acc, acc_w
        a, b = offset - self.out_start, end - self.out_start
        self.acc[..., a:b].addcmul_(seg_out, self.weight[:n])
        self.acc_w[a:b] += self.weight[:n]

    def ready(self) -> torch.Tensor:
        """The frames that became final since the last call, float32 [sources, channels, m],
        with the shift prefix dropped."""
        if self.closed and self.done_k == self.next_k:
            upto = self.received
        else:
            upto = self.done_k * self.stride
        n = max(0, upto - self.out_start)
        out = self.acc[..., :n].div_(self.acc_w[:n])  # in place: those frames leave acc
        self.acc, self.acc_w = self.acc[..., n:], self.acc_w[n:]
        self.out_start += n
        drop = min(self.prefix_left, out.shape[-1])
        self.prefix_left -= drop
        return out[..., drop:]

    # -- public -------------------------------------------------------------------------------
    def push(self, chunk: torch.Tensor) -> torch.Tensor:
        """chunk: float32 [channels, n] -> final output float32 [sources, channels, m]."""
        self.run(self.take(chunk))
        return self.ready()

    def close(self) -> torch.Tensor:
        """Run the remaining segments; returns the rest of the output [sources, channels, m]."""
        self.run(self.take(final=True))
        return self.ready()


class Job:
    """A segment of one runner of a Streamer, as a scheduler sees it: ``key`` says which jobs
    may share a forward pass (same network, same window length)."""
    __slots__ = ("runner", "seg", "key")

    def __init__(self, runner: OverlapAdd, seg: Segment):
        self.runner, self.seg = runner, seg
        self.key = runner.batch_key + (seg.w,)


def run_jobs(jobs: list[Job], forward: Callable[[OverlapAdd, torch.Tensor], torch.Tensor] | None = None) -> None:
    """One forward pass for jobs that share a key; results go back to their runners.

    forward: where the pass runs, ``forward(runner, windows)`` (float32 [batch, channels, w] ->
    float32 [batch, sources, channels, w]); None: here, ``runner.forward`` (engine.replicas: a Ray
    replica that holds the same network, ``runner.recipe``)."""
    assert jobs and all(j.key == jobs[0].key for j in jobs)
    w = jobs[0].seg.w
    windows = torch.empty(len(jobs), jobs[0].runner.channels, w)
    for job, row in zip(jobs, windows):
        job.runner.fill_window(job.seg, row)
    out = jobs[0].runner.forward(windows) if forward is None else forward(jobs[0].runner, windows)
    for job, job_out in zip(jobs, out):
        job.runner.put(job.seg, job_out)


def _autocast_factory(model, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return None
    device_type = next(iter(model.parameters())).device.type
    return lambda: torch.autocast(device_type=device_type, dtype=dtype)


class Streamer:
    """A model or bag, with shifts, fed in pieces: the engine's one way to separate.

    ``push(chunk)`` / ``close()`` take float32 [channels, n] at the model's sample rate and return
    float32 [sources, channels, m]; concatenated, the outputs have exactly the input's length and
    equal ``apply_model`` on the whole track.

    shifts: number of randomly time-shifted passes averaged (0 or 1 shift offsets drawn from
    ``random.Random(seed)``, each in [0, 0.5 s], as demucs' ``--shifts``); deterministic for a seed.
    model_options: options of the model itself (e.g. spleeter's ``wiener_iterations``), set on a
    shallow copy of each member that shares its weights (``member.with_options``); ValueError
    for a model that takes none, or bad values. They act within each segment's window, so
    streaming still equals offline.
    context_s, lookahead_s: the past-context rule (either given): each segment's network window
    reaches ``context_s`` seconds back over input already received (no latency) and
    ``lookahead_s`` past the segment's end (latency: segment + lookahead); None for both: the
    centred rule. Short segments (a plugin's ~1 s) then see the context a long one would.
    ValueError beyond ``MAX_CONTEXT_S`` or a window the network cannot take.
    """

    def __init__(self, model, *, segment_s: float | None = None, overlap: float | None = None,
                 shifts: int = 0, seed: int = 0, batch_segments: int = 1,
                 transition_power: float = 1.0, dtype: torch.dtype | None = None,
                 model_options: dict | None = None, context_s: float | None = None,
                 lookahead_s: float | None = None):
        if transition_power < 1:
            raise ValueError("transition_power must be >= 1")
        if shifts < 0:
            raise ValueError(f"shifts must be >= 0, got {shifts}")
        self.model = model
        self.sources = list(model.sources)
        self.sample_rate = model.sample_rate
        self.audio_channels = model.audio_channels
        members = list(model.members) if isinstance(model, Bag) else [model]
        weights = model.weights if isinstance(model, Bag) else [[1.0] * len(self.sources)]
        if isinstance(model, Bag) and segment_s is None:
            segment_s = model.segment_s
        rng = random.Random(seed)
        self.parts: list[tuple[OverlapAdd, torch.Tensor]] = []  # (runner, per-source scale)
        totals = torch.tensor(weights, dtype=torch.float32).sum(0)
        for index, (member, w) in enumerate(zip(members, weights)):
            original = member
            member_segment = None if segment_s is None else min(segment_s, _max_segment_s(member))
            if member_segment is not None and hasattr(member, "set_segment"):
                # demucs models also change the window fed to the network with the segment; a
                # shallow copy shares the weights and leaves the (shared, warm) model untouched.
                member = copy.copy(member)
                member.set_segment(member_segment)
            model_key = ()
            if model_options:
                if not hasattr(member, "with_options"):
                    raise ValueError(f"{member.name} takes no options ({', '.join(sorted(model_options))})")
                member = member.with_options(**model_options)
                model_key = tuple((k, getattr(member, k)) for k in sorted(model_options))
            seg, stride = grid_for(member, member_segment, overlap)
            reach = past_context_for(member, seg, context_s, lookahead_s, stride)
            # Sessions that use the same network on the same grid (and options) may share forward passes.
            key = (id(original), seg, str(dtype)) + model_key
            prefixes = [0] if shifts == 0 else [
                int(MAX_SHIFT_S * member.sample_rate) - rng.randint(0, int(MAX_SHIFT_S * member.sample_rate))
                for _ in range(shifts)]
            scale = torch.tensor(w, dtype=torch.float32) / totals / len(prefixes)
            # How another process builds this network (engine.replicas): the name and weights folder
            # the model was loaded by (engine.cache), the member of a bag, the segment override, the
            # model options and the dtype.
            recipe = (*getattr(model, "loaded_as", (getattr(model, "name", None), None)),
                      index if isinstance(model, Bag) else None, member_segment,
                      tuple(sorted((model_options or {}).items())), None if dtype is None else str(dtype))
            for prefix in prefixes:
                runner = OverlapAdd(member, seg, stride, transition_power=transition_power,
                                    batch_segments=batch_segments, prefix_frames=prefix,
                                    autocast=_autocast_factory(member, dtype), batch_key=key,
                                    **reach)
                runner.recipe = recipe
                self.parts.append((runner, scale))
        # Output of each part not yet combined (parts finalize at different points).
        self.pending = [torch.zeros(len(self.sources), self.audio_channels, 0) for _ in self.parts]

    def _combine(self, outs: Iterable[torch.Tensor]) -> torch.Tensor:
        outs = list(outs)
        if len(outs) == 1 and not self.pending[0].shape[-1]:  # one runner: no copies
            scale = self.parts[0][1]
            return outs[0] if bool((scale == 1).all()) else outs[0].mul_(scale[:, None, None])
        for i, out in enumerate(outs):
            if out.shape[-1]:
                self.pending[i] = torch.cat([self.pending[i], out], dim=-1)
        n = min(p.shape[-1] for p in self.pending)
        total = torch.zeros(len(self.sources), self.audio_channels, n)
        for i, (_, scale) in enumerate(self.parts):
            total += scale[:, None, None] * self.pending[i][..., :n]
            self.pending[i] = self.pending[i][..., n:]
        return total

    @property
    def latency_frames(self) -> int:
        """Output lags the input pushed by at most this many frames (at the model's rate)."""
        return max(runner.latency_frames for runner, _ in self.parts)

    @property
    def live(self) -> bool:
        """The past-context rule (a live stream's): the track's end is never used."""
        return any(runner.past_context for runner, _ in self.parts)

    def feed(self, chunk: torch.Tensor) -> list[Job]:
        """chunk: float32 [channels, n]. Returns the jobs (segments) now ready for the network;
        run them in order (``run_jobs``), then ``collect()`` the final output."""
        return [Job(runner, seg) for runner, _ in self.parts for seg in runner.take(chunk)]

    def feed_close(self) -> list[Job]:
        """End of the track: every remaining job."""
        return [Job(runner, seg) for runner, _ in self.parts for seg in runner.take(final=True)]

    def collect(self) -> torch.Tensor:
        """The output that became final, float32 [sources, channels, m]."""
        return self._combine(runner.ready() for runner, _ in self.parts)

    def push(self, chunk: torch.Tensor) -> torch.Tensor:
        """chunk: float32 [channels, n] -> final output float32 [sources, channels, m]."""
        for runner, _ in self.parts:
            runner.run(runner.take(chunk))
        return self.collect()

    def close(self) -> torch.Tensor:
        """The remaining output [sources, channels, m]."""
        for runner, _ in self.parts:
            runner.run(runner.take(final=True))
        return self.collect()


def _max_segment_s(model) -> float:
    limit = getattr(model, "max_segment_frames", None)
    return math.inf if limit is None else limit / model.sample_rate


def apply_model(model, mix: torch.Tensor, *, segment_s: float | None = None, overlap: float | None = None,
                shifts: int = 0, seed: int = 0, batch_segments: int = 1, transition_power: float = 1.0,
                dtype: torch.dtype | None = None, chunk_frames: int | None = None,
                progress: Callable[[int], None] | None = None, context_s: float | None = None,
                lookahead_s: float | None = None) -> torch.Tensor:
    """Separate a whole track held in memory.

    mix: float32 [channels, frames] at ``model.sample_rate`` with ``model.audio_channels`` channels.
    Returns float32 [sources, channels, frames].
    chunk_frames: feed the streamer in pieces of this size (None: all at once); the result is the same.
    progress: called with the number of input frames consumed so far.
    """
    assert mix.dim() == 2 and mix.shape[0] == model.audio_channels, mix.shape
    streamer = Streamer(model, segment_s=segment_s, overlap=overlap, shifts=shifts, seed=seed,
                        batch_segments=batch_segments, transition_power=transition_power, dtype=dtype,
                        context_s=context_s, lookahead_s=lookahead_s)
    step = chunk_frames or max(1, mix.shape[1])
    outs = []
    for start in range(0, mix.shape[1], step):
        outs.append(streamer.push(mix[:, start:start + step]))
        if progress:
            progress(min(start + step, mix.shape[1]))
    outs.append(streamer.close())
    out = torch.cat(outs, dim=-1)
    assert out.shape == (len(model.sources), mix.shape[0], mix.shape[1]), out.shape
    return out
