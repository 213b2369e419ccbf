"""Per-track state: a track at the client's rate and channel count, fed in pieces, separated on
the model's grid, returned at the client's rate and channel count.

``TrackSeparator`` is what both the offline CLI and (later) daemon sessions use, so streamed
output is the offline output by construction.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import audio
from .apply import Job, Streamer
from .errors import BadAudio, BadRequest


def output_stems(sources: list[str], two_stems: str | None) -> list[str]:
    """Stem names a track will get: the model's, or ``[STEM, no_STEM]`` (demucs' --two-stems)."""
    if two_stems is None:
        return list(sources)
    if two_stems not in sources:
        raise BadRequest(f"--two-stems {two_stems}: the model's stems are {', '.join(sources)}")
    return [two_stems, f"no_{two_stems}"]


# Session options that go to the model (``with_options``), not to the Streamer.
MODEL_OPTIONS = ("full_band", "mask_exponent", "wiener_iterations", "tta")


class TrackSeparator:
    """Separate one track fed in blocks.

    model: a Separator or Bag. sample_rate, channels: the track's (channels 1 or 2).
    options: segment_s, overlap, shifts, seed, batch_segments, dtype (see engine.apply.Streamer),
    and the model's own options (``MODEL_OPTIONS``: spleeter's full_band, mask_exponent,
    wiener_iterations, tta; see ``Spleeter.with_options``).
    two_stems: a source name, to return it and ``no_<name>`` (the sum of the others).

    ``push(block)`` takes float32 [channels, n] and returns {stem: float32 [channels, m]} of the
    final output so far; ``close()`` returns the rest. All outputs together have exactly the
    pushed length, aligned with the input.

    Errors: ``feed``/``push`` raise BadAudio for NaN/Inf samples and for samples beyond the model's
    ``max_input_peak`` (when it states one: spleeter-2stems, 1e3), and the track goes on (nothing of
    that block was taken); ``collect``/``close`` raise BadAudio if the separation gave NaN/Inf samples
    (a model overflowing), so that non-finite stems are never handed out.
    """

    def __init__(self, model, sample_rate: int, channels: int, *, two_stems: str | None = None,
                 where: str = "input", **options):
        self.model = model
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self.where = where
        self.stems = output_stems(list(model.sources), two_stems)
        self.two_stems = two_stems
        model_options = {k: options.pop(k) for k in MODEL_OPTIONS if options.get(k) is not None}
        for k in MODEL_OPTIONS:
            options.pop(k, None)
        self.streamer = Streamer(model, model_options=model_options or None, **options)
        self.to_model = audio.Resampler(self.sample_rate, model.sample_rate, model.audio_channels)
        self.from_model = audio.Resampler(model.sample_rate, self.sample_rate,
                                          len(model.sources) * model.audio_channels)
        self.frames_in = 0
        self.frames_out = 0
        self.held = np.zeros((len(self.stems), self.channels, 0), np.float32)

    def _stems_from(self, out: torch.Tensor) -> np.ndarray:
        """[sources, model_channels, m] at the model rate -> [stems, channels, m'] at the track rate."""
        out = out.numpy()
        s, c, m = out.shape
        return self._track_stems(self.from_model.process(out.reshape(s * c, m)))

    def _track_stems(self, back: np.ndarray) -> np.ndarray:
        """[sources * model_channels, m] at the track rate -> [stems, channels, m] (two-stems, channels)."""
        back = back.reshape(len(self.model.sources), self.model.audio_channels, -1)
        if self.two_stems is not None:
            i = self.model.sources.index(self.two_stems)
            back = np.stack([back[i], back.sum(0) - back[i]])
        return audio.from_channels(back, self.channels)

    def _emit(self, stems: np.ndarray, final: bool) -> dict[str, np.ndarray]:
        stems = np.concatenate([self.held, stems], axis=-1) if self.held.shape[-1] else stems
        if final:  # exact input length: cut the resampling tail or pad its last few frames
            need = self.frames_in - self.frames_out
            if stems.shape[-1] < need:
                stems = np.concatenate([stems, np.zeros(stems.shape[:2] + (need - stems.shape[-1],),
                                                        np.float32)], axis=-1)
        n = min(stems.shape[-1], self.frames_in - self.frames_out)
        out, self.held = stems[..., :n], stems[..., n:]
        if out.size and not np.isfinite(out).all():
            bad = np.argwhere(~np.isfinite(out))
            i = int(bad[np.argmin(bad[:, -1])][0])
            frame = self.frames_out + int(bad[:, -1].min())
            raise BadAudio(f"{self.where}: the separation gave NaN or Inf samples in stem {self.stems[i]!r} at "
                           f"frame {frame} ({frame / self.sample_rate:.3f} s); the model overflowed on this input")
        self.frames_out += n
        return {name: np.ascontiguousarray(out[i], dtype=np.float32) for i, name in enumerate(self.stems)}

    @property
    def latency_samples(self) -> int:
        """Stem output lags the input pushed by at most this many frames (at the track's rate):
        once N frames are pushed, at least N - latency_samples frames of every stem are out."""
        lag = self.streamer.latency_frames
        if self.to_model.identity:
            return lag
        up, down = self.to_model, self.from_model
        # to the model: output block b needs input up to b * old + width; back: the same with the
        # ratio inverted. Worst case at each stage, in track frames, rounded up.
        frames = up.width + up.old - 1 + (lag + down.width + up.new - 1) * up.old / up.new
        return int(math.ceil(frames))

    def feed(self, block: np.ndarray) -> list[Job]:
        """Take float32 [channels, n]; return the network jobs it completes (see engine.apply)."""
        block = audio.validate(block, self.where, self.frames_in, self.sample_rate)
        if block.shape[0] != self.channels:
            raise BadRequest(f"{self.where}: block has {block.shape[0]} channels, the track {self.channels}")
        self._check_peak(block)
        self.frames_in += block.shape[1]
        x = self.to_model.process(audio.to_channels(block, self.model.audio_channels))
        return self.streamer.feed(torch.from_numpy(np.ascontiguousarray(x)))

    def _check_peak(self, block: np.ndarray) -> None:
        """BadAudio if a sample of ``block`` (finite float32 [channels, n]) is beyond the model's
        ``max_input_peak`` (None or absent: no bound), naming the first such frame and the peak."""
        bound = getattr(self.model, "max_input_peak", None)
        if bound is None or not block.size:
            return
        loud = np.abs(block) > bound
        if not loud.any():
            return
        frame = self.frames_in + int(np.argwhere(loud)[:, 1].min())
        peak = float(np.abs(block).max())
        raise BadAudio(f"{self.where}: input peak {peak:.3g} (from frame {frame}, {frame / self.sample_rate:.3f} s) "
                       f"is beyond what {getattr(self.model, 'name', 'the model')} can separate (peaks up to "
                       f"{bound:g}, {20 * math.log10(bound):+.0f} dBFS); scale the audio down")

    def feed_close(self) -> list[Job]:
        """End of the track: the remaining jobs.

        Under the past-context rule (``Streamer.live``) the end is never used: the track goes on
        with ``latency_samples`` frames of silence at its own rate, through the resamplers as a
        stream's would (which makes every input frame's output final), so a closed track equals
        a stream of it followed by silence at any rate, which is what a plugin host sends."""
        if self.streamer.live:
            silence = np.zeros((self.model.audio_channels, self.latency_samples), np.float32)
            return self.streamer.feed(torch.from_numpy(np.ascontiguousarray(self.to_model.process(silence))))
        rest = self.to_model.flush()
        jobs = self.streamer.feed(torch.from_numpy(np.ascontiguousarray(rest))) if rest.shape[-1] else []
        return jobs + self.streamer.feed_close()

    def collect(self, final: bool = False) -> dict[str, np.ndarray]:
        """Stem frames that became final: {stem: float32 [channels, m]}. ``final=True`` once every
        job of ``feed_close`` has run: the rest, so that all outputs have the input's length."""
        stems = self._stems_from(self.streamer.collect())
        if final and not self.from_model.identity:
            stems = np.concatenate([stems, self._track_stems(self.from_model.flush())], axis=-1)
        return self._emit(stems, final=final)

    def push(self, block: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [channels, n] -> {stem: float32 [channels, m]}, run here."""
        self._run(self.feed(block))
        return self.collect()

    def close(self) -> dict[str, np.ndarray]:
        """The rest of every stem."""
        self._run(self.feed_close())
        return self.collect(final=True)

    @staticmethod
    def _run(jobs: list[Job]) -> None:
        # Jobs of one runner in order, batch_segments at a time (as OverlapAdd.run).
        by_runner: dict[int, list] = {}
        for job in jobs:
            by_runner.setdefault(id(job.runner), [job.runner, []])[1].append(job.seg)
        for runner, segs in by_runner.values():
            runner.run(segs)


def separate_array(model, mix: np.ndarray, sample_rate: int, **options) -> dict[str, np.ndarray]:
    """One-shot: float32 [channels, frames] -> {stem: float32 [channels, frames]}."""
    track = TrackSeparator(model, sample_rate, mix.shape[0], **options)
    parts = [track.push(mix), track.close()]
    return {s: np.concatenate([p[s] for p in parts], axis=-1) for s in track.stems}
