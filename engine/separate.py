"""The offline job: one audio file in, one file per stem out, in constant memory.

The input is read in blocks (pedalboard.io), fed to a ``TrackSeparator`` and each stem is written
as it is finalised, to a temporary name in the destination folder; only when the whole track is
done are the stems renamed into place. A failure at any point deletes what was written.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import BadAudio, BadRequest, OutputError
from .sessions import TrackSeparator, output_stems

READ_BLOCK_S = 10.0
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


def stem_paths(out_dir: Path, model_name: str, track: Path, stems: list[str], fmt: OutputFormat,
               template: str = DEFAULT_TEMPLATE) -> dict[str, Path]:
    """OUT/MODEL/<template> for each stem (demucs' --filename variables: track, trackext, stem, ext)."""
    paths = {}
    for stem in stems:
        try:
            rel = template.format(track=track.stem, trackext=track.suffix.lstrip("."), stem=stem, ext=fmt.ext)
        except (KeyError, IndexError, ValueError) as e:
            raise BadRequest(f"--filename {template!r}: unknown variable {e}; use track, trackext, stem, ext")
        paths[stem] = out_dir / model_name / rel
    if len(set(paths.values())) != len(paths):
        raise BadRequest(f"--filename {template!r} gives the same path to several stems; use {{stem}}")
    return paths


def _open_input(path: Path):
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


class _StemWriter:
    """Writes one stem to a temp file next to its destination; ``commit`` renames it into place."""

    def __init__(self, dest: Path, sample_rate: int, channels: int, fmt: OutputFormat):
        from pedalboard.io import AudioFile
        self.dest, self.fmt = dest, fmt
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
        if block.shape[-1] == 0:
            return
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


def separate_file(model, path: Path, dests: dict[str, Path], fmt: OutputFormat, *,
                  two_stems: str | None = None, progress: Callable[[int, int], None] | None = None,
                  **options) -> TrackReport:
    """Separate ``path`` into ``dests`` ({stem: path}); returns what was written.

    options: segment_s, overlap, shifts, seed, batch_segments, dtype (engine.apply.Streamer).
    progress(frames_done, frames_total) is called after each block.
    Raises BadAudio, BadRequest, OutputError; on any error nothing is left at ``dests``.
    """
    path = Path(path)
    stems = output_stems(list(model.sources), two_stems)
    if set(dests) != set(stems):
        raise BadRequest(f"destinations {sorted(dests)} do not match stems {stems}")
    with _open_input(path) as f:
        sr, channels, total = int(f.samplerate), f.num_channels, f.frames
        track = TrackSeparator(model, sr, channels, two_stems=two_stems, where=str(path), **options)
        writers: dict[str, _StemWriter] = {}
        try:
            for stem in stems:
                writers[stem] = _StemWriter(dests[stem], sr, channels, fmt)
            block_frames = max(1, int(READ_BLOCK_S * sr))
            done = 0
            while done < total:
                try:
                    block = f.read(min(block_frames, total - done))
                except Exception as e:
                    raise BadAudio(f"{path}: cannot read audio at frame {done} ({str(e).splitlines()[0]})") from None
                if block.shape[-1] == 0:
                    raise BadAudio(f"{path}: file ends at frame {done}, its header says {total} (truncated?)")
                for stem, out in track.push(block).items():
                    writers[stem].write(out)
                done += block.shape[-1]
                if progress:
                    progress(done, total)
            for stem, out in track.close().items():
                writers[stem].write(out)
            for w in writers.values():
                w.commit()
        except BaseException:
            for w in writers.values():
                w.discard()
            raise
    report = TrackReport(path, sr, channels, total)
    report.stems = {s: w.report for s, w in writers.items()}
    return report
