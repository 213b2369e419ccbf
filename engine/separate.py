"""The offline job in process: one audio file in, one file per stem out, in constant memory.

The file side (blocks in, temporary stem files, rename on success, discard on error) is
``engine.stemfiles``, shared with the daemon path (the input opened by ``engine.inputs``); here a
``TrackSeparator`` does the separating. The names moved to ``engine.stemfiles`` and
``engine.inputs`` are re-exported so existing imports keep working.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .errors import BadRequest
from .inputs import open_input
from .sessions import TrackSeparator, output_stems
from .stemfiles import (DEFAULT_TEMPLATE, FORMATS, READ_BLOCK_S, OutputFormat, StemReport, StemWriter,  # noqa: F401
                        TrackReport, stem_paths, write_track)

_open_input = open_input      # the names these had before they moved
_StemWriter = StemWriter


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

    def open_track(sample_rate: int, channels: int, where: str) -> TrackSeparator:
        return TrackSeparator(model, sample_rate, channels, two_stems=two_stems, where=where, **options)

    return write_track(path, dests, fmt, open_track, progress=progress)
