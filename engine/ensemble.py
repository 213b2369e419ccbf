"""Ensembles of models, and ``residual``: tracks with ``TrackSeparator``'s interface.

``EnsembleTrack`` runs one ``TrackSeparator`` per member (each resamples to its own model's rate,
segments on its own grid, returns at the client's rate, aligned with the input) and combines their
outputs frame by frame at the client's rate. It has TrackSeparator's interface (stems, sample_rate,
channels, frames_in, latency_samples, feed -> jobs, feed_close -> jobs, collect(final), push,
close), so the daemon's scheduler, one-shot separation, StemStream and StemChain use it unchanged;
its jobs are its members' own (they batch with other sessions of the same network).

Alignment: member outputs are aligned with the input but become final at different times (their
latencies differ); each member's final frames wait in a buffer (a delay line at the client's rate)
until every member has them. So the ensemble's latency is the largest member latency, plus
``n_fft - 1`` for max_spec/min_spec (below).

Stems: the **union** of the member stems (after each member's ``rename``), in order of first
appearance. A stem is made from the members that have it with a weight > 0 (weights renormalised
over those members); a stem only one member has is that member's.

Algorithms, per stem:

- ``avg``: sum(w_i * x_i) / sum(w_i) of the waveforms.
- ``median``: the per-sample median of the member waveforms (weights only select: 0 leaves out).
- ``max_spec`` / ``min_spec`` (as UVR): per STFT bin and channel, the member estimate with the
  largest / smallest magnitude, its complex value kept, then the inverse STFT (weights only
  select). STFT at the client's rate: periodic Hann window of ``n_fft`` (default 2048) for analysis
  and synthesis, hop ``hop`` (default 512), weighted overlap-add divided by the summed squared
  window. The framing is anchored at the track's start: frame j covers track frames
  [j*hop - (n_fft - hop), j*hop + hop), zeros outside the track, so every track frame is covered
  by exactly n_fft/hop frames and a frame's content never depends on how the track was chunked:
  streaming == offline. A frame is computed once all its samples are final in every member; track
  frames before j*hop - (n_fft - hop) + hop are final after frame j, so this stage adds at most
  ``n_fft - 1`` frames of latency. With identical members, the output is the input estimate (to
  float rounding).

``ResidualTrack`` wraps any track: one stem (``residual_target``) is replaced by the input minus
the sum of the other stems, so the stems sum to the input exactly (float32 rounding).
"""
from __future__ import annotations

import numpy as np

from .errors import BadRequest

__all__ = ["EnsembleTrack", "ResidualTrack", "SpecPicker", "residual_target", "open_track", "COMPLEMENTS"]

# Where the residual goes, in order of preference: the stem that means "everything but the rest".
COMPLEMENTS = ("accompaniment", "instrumental", "no_vocals", "other")


def residual_target(stems: list[str], residual: bool | str = True) -> str:
    """The stem that takes the residual: ``residual`` itself when it is a stem name; else the first
    of accompaniment, instrumental, no_vocals, other that the track has; else the one ``no_*``
    stem (``--two-stems X`` gives ``no_X``); else the last stem."""
    if isinstance(residual, str):
        if residual not in stems:
            raise BadRequest(f"residual {residual!r}: the stems are {', '.join(stems)}")
        return residual
    for name in COMPLEMENTS:
        if name in stems:
            return name
    nos = [s for s in stems if s.startswith("no_")]
    return nos[0] if nos else stems[-1]


class _TrackBase:
    def push(self, block: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [channels, n] -> {stem: float32 [channels, m]}, run here."""
        _run(self.feed(block))
        return self.collect()

    def close(self) -> dict[str, np.ndarray]:
        _run(self.feed_close())
        return self.collect(final=True)


def _run(jobs) -> None:
    from .sessions import TrackSeparator
    TrackSeparator._run(jobs)


class ResidualTrack(_TrackBase):
    """``track`` with its stem ``target`` replaced by input - sum(other stems)."""

    def __init__(self, track, target: str | bool = True):
        self.track = track
        self.target = residual_target(list(track.stems), target)
        self.stems = list(track.stems)
        self.sample_rate, self.channels = track.sample_rate, track.channels
        self.inp: list[np.ndarray] = []   # input frames not yet matched by output
        self.held = 0

    @property
    def frames_in(self) -> int:
        return self.track.frames_in

    @property
    def latency_samples(self) -> int:
        return self.track.latency_samples

    def feed(self, block):
        jobs = self.track.feed(block)          # validates the block
        self.inp.append(np.asarray(block, np.float32))
        self.held += block.shape[1]
        return jobs

    def feed_close(self):
        return self.track.feed_close()

    def collect(self, final: bool = False):
        out = self.track.collect(final)
        n = out[self.stems[0]].shape[-1]
        if not n:
            return out
        x = np.concatenate(self.inp, axis=-1) if len(self.inp) > 1 else self.inp[0]
        mix, rest = x[:, :n], x[:, n:]
        self.inp, self.held = ([rest] if rest.shape[1] else []), rest.shape[1]
        others = sum((out[s].astype(np.float64) for s in self.stems if s != self.target),
                     np.zeros(mix.shape, np.float64))
        out[self.target] = (mix.astype(np.float64) - others).astype(np.float32)
        return out


class SpecPicker:
    """Streaming max/min-magnitude spectrogram pick of k signals (see the module's docstring).

    ``push(x, final)``: x float [k, channels, n] (the next n frames of every member) -> float64
    [channels, m] final output frames; with ``final=True`` the rest (all outputs together have the
    pushed length)."""

    CHUNK = 256  # frames per FFT batch (bounds memory)

    def __init__(self, k: int, channels: int, n_fft: int, hop: int, mode: str):
        assert n_fft % hop == 0 and n_fft // hop >= 2 and mode in ("max_spec", "min_spec")
        self.k, self.channels, self.n_fft, self.hop, self.mode = k, channels, n_fft, hop, mode
        self.pad = n_fft - hop
        self.window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
        self.norm = (self.window ** 2).reshape(n_fft // hop, hop).sum(0)       # per (u mod hop)
        self.buf = np.zeros((k, channels, self.pad))   # padded signal from padded index buf_start
        self.buf_start = 0
        self.total = 0                                  # track frames pushed
        self.next_j = 0
        self.acc = np.zeros((channels, 0))              # overlap-add from padded index acc_start
        self.acc_start = 0
        self.out_pos = self.pad                         # next padded index to return
        self.closed = False

    @property
    def latency_frames(self) -> int:
        return self.n_fft - 1

    def push(self, x: np.ndarray, final: bool = False) -> np.ndarray:
        if self.closed:
            raise RuntimeError("push after close")
        x = np.asarray(x, np.float64)
        assert x.shape[:2] == (self.k, self.channels), x.shape
        self.buf = np.concatenate([self.buf, x], axis=-1)
        self.total += x.shape[-1]
        end = self.pad + self.total                     # padded length known
        if final:
            self.closed = True
            last_j = (end - 1) // self.hop if self.total else -1
            need = last_j * self.hop + self.n_fft - (self.buf_start + self.buf.shape[-1])
            if need > 0:
                self.buf = np.concatenate([self.buf, np.zeros(self.buf.shape[:2] + (need,))], axis=-1)
            stop_j = last_j + 1
        else:
            stop_j = max(self.next_j, (end - self.n_fft) // self.hop + 1)
        while self.next_j < stop_j:
            j0, j1 = self.next_j, min(stop_j, self.next_j + self.CHUNK)
            self._frames(j0, j1)
            self.next_j = j1
        upto = end if final else self.next_j * self.hop
        out = self._take(upto)
        keep = self.next_j * self.hop - self.buf_start
        if keep > 0:
            self.buf = self.buf[..., keep:]
            self.buf_start += keep
        return out

    def _frames(self, j0: int, j1: int) -> None:
        n_fft, hop = self.n_fft, self.hop
        a = j0 * hop - self.buf_start
        span = self.buf[..., a:a + (j1 - j0 - 1) * hop + n_fft]
        frames = np.lib.stride_tricks.sliding_window_view(span, n_fft, axis=-1)[..., ::hop, :]
        spec = np.fft.rfft(frames * self.window, axis=-1)        # [k, C, F, bins]
        mag = np.abs(spec)
        pick = (mag.argmax if self.mode == "max_spec" else mag.argmin)(axis=0)[None]
        y = np.fft.irfft(np.take_along_axis(spec, pick, axis=0)[0], n=n_fft, axis=-1) * self.window
        # overlap-add frames j0..j1-1 at padded index j * hop
        lo, hi = j0 * hop, (j1 - 1) * hop + n_fft
        have = self.acc_start + self.acc.shape[-1]
        if hi > have:
            self.acc = np.concatenate([self.acc, np.zeros((self.channels, hi - have))], axis=-1)
        for f in range(j1 - j0):
            s = lo + f * hop - self.acc_start
            self.acc[:, s:s + n_fft] += y[:, f]

    def _take(self, upto: int) -> np.ndarray:
        n = max(0, upto - self.out_pos)
        if not n:
            return np.zeros((self.channels, 0))
        a = self.out_pos - self.acc_start
        idx = np.arange(self.out_pos, upto) % self.hop
        out = self.acc[:, a:a + n] / self.norm[idx]
        self.out_pos = upto
        drop = self.out_pos - self.acc_start
        self.acc, self.acc_start = self.acc[:, drop:], self.out_pos
        return out


class EnsembleTrack(_TrackBase):
    """Several member tracks (TrackSeparator-like, same client rate and channels) combined.

    members: [(track, Member)] with ``engine.presets.Member`` (weights, rename); algorithm one of
    engine.presets.ALGORITHMS; two_stems: a stem of the union, to return it and ``no_<stem>``
    (the sum of the other combined stems)."""

    def __init__(self, members: list, algorithm: str, *, n_fft: int = 2048, hop: int = 512,
                 two_stems: str | None = None, where: str = "input"):
        if algorithm not in ("avg", "median", "max_spec", "min_spec"):
            raise BadRequest(f"{where}: unknown ensemble algorithm {algorithm!r}")
        if not members:
            raise BadRequest(f"{where}: an ensemble needs members")
        self.tracks = [t for t, _ in members]
        self.algorithm = algorithm
        self.where = where
        first = self.tracks[0]
        self.sample_rate, self.channels = first.sample_rate, first.channels
        if any((t.sample_rate, t.channels) != (self.sample_rate, self.channels) for t in self.tracks):
            raise BadRequest(f"{where}: ensemble members must share the client's rate and channels")
        union: list[str] = []
        self.member_stems = []       # per member: ensemble stem names, in the track's order
        for track, spec in members:
            names = [spec.rename.get(s, s) for s in track.stems]
            if len(set(names)) != len(names):
                raise BadRequest(f"{where}: member {getattr(spec, 'model', '?')}: rename makes two stems one")
            self.member_stems.append(names)
            union += [s for s in names if s not in union]
        # per stem: [(member index, index in the member's stems, weight)] with weight > 0
        self.sources: dict[str, list[tuple[int, int, float]]] = {}
        for stem in union:
            got = [(i, names.index(stem), spec.weight_of(stem))
                   for i, ((_, spec), names) in enumerate(zip(members, self.member_stems)) if stem in names]
            got = [g for g in got if g[2] > 0]
            if got:
                self.sources[stem] = got
        combined = list(self.sources)
        if not combined:
            raise BadRequest(f"{where}: every member weight is 0")
        if two_stems is not None and two_stems not in combined:
            raise BadRequest(f"--two-stems {two_stems}: the ensemble's stems are {', '.join(combined)}")
        self.combined = combined
        self.two_stems = two_stems
        self.stems = combined if two_stems is None else [two_stems, f"no_{two_stems}"]
        self.pending = [np.zeros((len(t.stems), self.channels, 0), np.float32) for t in self.tracks]
        self.pickers = ({s: SpecPicker(len(g), self.channels, n_fft, hop, algorithm)
                         for s, g in self.sources.items()} if algorithm.endswith("_spec") else None)
        self.n_fft = n_fft

    @property
    def frames_in(self) -> int:
        return self.tracks[0].frames_in

    @property
    def latency_samples(self) -> int:
        extra = self.n_fft - 1 if self.pickers is not None else 0
        return max(t.latency_samples for t in self.tracks) + extra

    def feed(self, block):
        return [job for t in self.tracks for job in t.feed(block)]

    def feed_close(self):
        return [job for t in self.tracks for job in t.feed_close()]

    def collect(self, final: bool = False) -> dict[str, np.ndarray]:
        for i, t in enumerate(self.tracks):
            got = t.collect(final)
            if got[t.stems[0]].shape[-1]:
                new = np.stack([got[s] for s in t.stems])
                self.pending[i] = np.concatenate([self.pending[i], new], axis=-1) if self.pending[i].shape[-1] else new
        n = min(p.shape[-1] for p in self.pending)
        parts = [p[..., :n] for p in self.pending]
        self.pending = [p[..., n:] for p in self.pending]
        out = {}
        for stem, got in self.sources.items():
            xs = np.stack([parts[i][j] for i, j, _ in got]).astype(np.float64)   # [k, C, n]
            if self.pickers is not None:
                y = self.pickers[stem].push(xs, final=final)
            elif self.algorithm == "avg":
                w = np.array([g[2] for g in got])
                y = np.tensordot(w / w.sum(), xs, axes=1)
            else:
                y = np.median(xs, axis=0)
            out[stem] = y.astype(np.float32)
        if self.two_stems is not None:
            keep = out[self.two_stems]
            rest = sum((out[s].astype(np.float64) for s in self.combined if s != self.two_stems),
                       np.zeros(keep.shape))
            out = {self.two_stems: keep, f"no_{self.two_stems}": rest.astype(np.float32)}
        return {s: np.ascontiguousarray(out[s]) for s in self.stems}


def open_track(plan, models: dict, sample_rate: int, channels: int, *, where: str = "input", **engine_options):
    """The track for an ``engine.presets.Plan``: models {name: loaded model} for its members;
    engine_options (dtype, batch_segments) go to every member's TrackSeparator.
    Raises BadRequest (bad option, stem or segment)."""
    from .sessions import TrackSeparator
    top = plan.session_options
    two_stems, residual = top.get("two_stems"), top.get("residual", False)

    def member_track(member, opts):
        opts = dict(opts)
        ts = opts.pop("two_stems", None)
        opts.pop("residual", None)
        try:
            return TrackSeparator(models[member.model], sample_rate, channels, two_stems=ts, where=where,
                                  **engine_options, **opts)
        except ValueError as e:
            raise BadRequest(f"{where}: {e}") from None

    if not plan.ensemble:
        track = member_track(plan.members[0], top)
    else:
        shared = {k: v for k, v in top.items() if k not in ("two_stems", "residual")}
        members = [(member_track(m, {**shared, **m.options, **{k: v for k, v in plan.caller.items()
                                                               if k not in ("two_stems", "residual")}}), m)
                   for m in plan.members]
        track = EnsembleTrack(members, plan.algorithm, n_fft=plan.n_fft, hop=plan.hop, two_stems=two_stems,
                              where=where)
    if residual:
        track = ResidualTrack(track, residual)
    return track
