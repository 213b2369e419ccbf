"""Stem files on disk, without torch: read a track in blocks, write one file per stem, atomically.

Shared by the in-process job (``engine.separate.separate_file``, a ``TrackSeparator``) and the
daemon path (``plugin_bridge.files.separate_file_via``, a daemon session): both hand
``write_track`` a way to open a *track*, an object that turns input blocks into stem blocks.

The input is read in blocks of ``READ_BLOCK_S`` seconds (pedalboard.io), so memory does not grow
with the length of the file. Each stem is written as it is finalised, to a temporary
``.STEM.XXXX.partial.EXT`` next to its destination; only when the whole track is done are the stems
renamed into place. A failure at any point (including Ctrl-C) deletes what was written.

This module is imported by the torch-free client: numpy, pedalboard and soundfile only; never torch,
``engine.sessions`` or ``engine.apply``.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Union

import numpy as np

from .errors import BadAudio, BadRequest, OutputError, ProtocolError

READ_BLOCK_S = 2.0  # 10 s blocks cost a daemon client 2-3 MB more peak RSS (bench_sharing.py)
WRITE_BLOCK_FRAMES = 1 << 16  # stems are encoded in slices, so temporaries stay small
FORMATS = {"wav": "wav", "flac": "flac", "mp3": "mp3"}
DEFAULT_TEMPLATE = "{track}/{stem}.{ext}"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@dataclass
class OutputFormat:
    ext: str = "wav"           # wav | flac | mp3
    bit_depth: int = 16        # 16 | 24 | 32 (float32, wav only)
    mp3_bitrate_kbps: int = 320

    def __post_init__(self):
        if self.ext not in FORMATS:
            raise BadRequest(f"unknown output format {self.ext!r}")
        if self.ext == "flac" and self.bit_depth == 32:
            raise BadRequest("FLAC cannot store float32 samples; use --int24 with --flac")

    @property
    def clips(self) -> bool:
        """Integer PCM and mp3 cannot hold samples beyond [-1, 1]."""
        return not (self.ext == "wav" and self.bit_depth == 32)


@dataclass
class StemReport:
    path: Path
    clipped_samples: int = 0
    peak: float = 0.0


@dataclass
class TrackReport:
    input: Path
    sample_rate: int
    channels: int
    frames: int
    stems: dict[str, StemReport] = field(default_factory=dict)


class Track(Protocol):
    """What ``write_track`` feeds: one track, separated as it is pushed in blocks."""
    stems: list[str]

    def push(self, block: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [channels, n] -> {stem: float32 [channels, m]}, the final output so far."""

    def close(self) -> Union[dict[str, np.ndarray], Iterable[dict[str, np.ndarray]]]:
        """The rest (one dict, or several written in order, as they arrive): all outputs
        together have exactly the pushed length."""


# open_track(sample_rate, channels, where) -> Track
OpenTrack = Callable[[int, int, str], Track]
# {stem: path}, or a function of the opened track that returns it (when the stems or the model
# name are only known once the track is open, as with a daemon session)
Dests = Union[Mapping[str, Path], Callable[[Track], Mapping[str, Path]]]


def stem_paths(out_dir: Path, model_name: str, track: Path, stems: list[str], fmt: OutputFormat,
               template: str = DEFAULT_TEMPLATE, *, track_name: str | None = None,
               variables: Mapping[str, str] | None = None) -> dict[str, Path]:
    """OUT/MODEL/<template> for each stem (demucs' --filename variables: track, trackext, stem, ext).

    track_name: the value of ``{track}`` (default: the file name without its extension).
    variables: more template variables (``unbake bounce`` adds ``parent``). Raises BadRequest.
    """
    paths = {}
    extra = dict(variables or {})
    for stem in stems:
        try:
            rel = template.format(**{**extra, "track": track.stem if track_name is None else track_name,
                                     "trackext": track.suffix.lstrip("."), "stem": stem, "ext": fmt.ext})
        except (KeyError, IndexError, ValueError) as e:
            raise BadRequest(f"--filename {template!r}: unknown variable {e}; use "
                             f"{', '.join(['track', 'trackext', 'stem', 'ext', *extra])}")
        paths[stem] = out_dir / model_name / rel
    if len(set(paths.values())) != len(paths):
        raise BadRequest(f"--filename {template!r} gives the same path to several stems; use {{stem}}")
    return paths


def open_input(path: Path):
    """A pedalboard ``AudioFile`` for reading, checked: exists, readable, not empty, not truncated,
    mono or stereo. Raises BadAudio naming the file."""
    from pedalboard.io import AudioFile
    if not path.is_file():
        raise BadAudio(f"{path}: no such file")
    try:
        f = AudioFile(str(path))
    except Exception as e:  # pedalboard raises ValueError/RuntimeError for unknown or broken files
        raise BadAudio(f"{path}: cannot read audio ({str(e).splitlines()[0]})") from None
    if f.frames < 1:
        f.close()
        raise BadAudio(f"{path}: contains no audio frames")
    try:  # pedalboard trusts the header of a cut WAV/AIFF and pads it with silence; libsndfile counts
        import soundfile
        held = soundfile.info(str(path)).frames
    except Exception:
        held = f.frames
    if held < f.frames:
        f.close()
        raise BadAudio(f"{path}: truncated: the header says {f.frames} frames, the file holds {held}")
    if f.num_channels > 2:
        f.close()
        raise BadAudio(f"{path}: {f.num_channels} channels; unbake separates mono or stereo audio "
                       f"(downmix it first)")
    return f


class StemWriter:
    """Writes one stem to a temp file next to its destination; ``commit`` renames it into place."""

    def __init__(self, dest: Path, sample_rate: int, channels: int, fmt: OutputFormat):
        from pedalboard.io import AudioFile
        self.dest, self.fmt = dest, fmt
        self.frames = 0
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".partial.{fmt.ext}", dir=dest.parent)
            os.close(fd)
        except OSError as e:
            raise OutputError(f"{dest.parent}: cannot write ({e.strerror or e})") from None
        self.tmp = Path(tmp)
        kwargs = {"quality": f"{fmt.mp3_bitrate_kbps} kbps"} if fmt.ext == "mp3" else {"bit_depth": fmt.bit_depth}
        try:
            self.file = AudioFile(str(self.tmp), "w", samplerate=sample_rate, num_channels=channels, **kwargs)
        except Exception as e:
            self.tmp.unlink(missing_ok=True)
            raise OutputError(f"{dest}: cannot write {fmt.ext} ({str(e).splitlines()[0]})") from None
        self.report = StemReport(dest)

    def write(self, block: np.ndarray) -> None:
        """block: float32 [channels, n], any n (written in slices of WRITE_BLOCK_FRAMES)."""
        for a in range(0, block.shape[-1], WRITE_BLOCK_FRAMES):
            self._write_slice(block[:, a:a + WRITE_BLOCK_FRAMES])

    def _write_slice(self, block: np.ndarray) -> None:
        self.frames += block.shape[-1]
        peak = float(np.max(np.abs(block)))
        self.report.peak = max(self.report.peak, peak)
        if self.fmt.clips and peak > 1.0:
            self.report.clipped_samples += int(np.count_nonzero(np.abs(block) > 1.0))
            block = np.clip(block, -1.0, 1.0)
        self.file.write(block)

    def commit(self) -> None:
        self.file.close()
        os.chmod(self.tmp, 0o666 & ~_UMASK)  # mkstemp made it 0600
        os.replace(self.tmp, self.dest)

    def discard(self) -> None:
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_track(path: Path, dests: Dests, fmt: OutputFormat, open_track: OpenTrack, *,
                progress: Callable[[int, int], None] | None = None) -> TrackReport:
    """Read ``path`` in blocks through ``open_track(sample_rate, channels, str(path))`` into one file
    per stem; returns what was written.

    dests: {stem: path} for exactly the track's stems, or a callable ``dests(track)`` returning it.
    progress(frames_done, frames_total) is called after each block.
    Raises BadAudio, BadRequest, OutputError, and whatever ``open_track`` and the track raise; on
    any error nothing is left at the destinations (nor beside them).
    """
    path = Path(path)
    with open_input(path) as f:
        sr, channels, total = int(f.samplerate), f.num_channels, f.frames
        track = open_track(sr, channels, str(path))
        stems = list(track.stems)
        writers: dict[str, StemWriter] = {}
        try:
            paths = dict(dests(track) if callable(dests) else dests)
            if set(paths) != set(stems):
                raise BadRequest(f"destinations {sorted(paths)} do not match stems {stems}")
            for stem in stems:
                writers[stem] = StemWriter(Path(paths[stem]), sr, channels, fmt)
            block_frames = max(1, int(READ_BLOCK_S * sr))
            done = 0
            while done < total:
                try:
                    block = f.read(min(block_frames, total - done))
                except Exception as e:
                    raise BadAudio(f"{path}: cannot read audio at frame {done} ({str(e).splitlines()[0]})") from None
                if block.shape[-1] == 0:
                    raise BadAudio(f"{path}: file ends at frame {done}, its header says {total} (truncated?)")
                _write(writers, track.push(block))
                done += block.shape[-1]
                if progress:
                    progress(done, total)
            rest = track.close()
            for blocks in ([rest] if isinstance(rest, Mapping) else rest):
                _write(writers, blocks)
            for stem, w in writers.items():
                if w.frames != total:
                    raise ProtocolError(f"{path}: stem {stem!r} came back with {w.frames} frames, "
                                        f"the input has {total}")
            for w in writers.values():
                w.commit()
        except BaseException:
            for w in writers.values():
                w.discard()
            raise
    report = TrackReport(path, sr, channels, total)
    report.stems = {s: w.report for s, w in writers.items()}
    return report


def _write(writers: dict[str, StemWriter], blocks: dict[str, np.ndarray]) -> None:
    for stem, out in blocks.items():
        if stem not in writers:
            raise ProtocolError(f"a block for stem {stem!r}, the track's stems are {list(writers)}")
        writers[stem].write(out)
