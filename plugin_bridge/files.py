"""Stem files through the engine daemon: the file job of ``unbake separate``, torch-free.

``separate_file_via`` is ``engine.separate.separate_file`` with a daemon session in place of the
in-process ``TrackSeparator``: the same block reading, temporary files, rename on success, discard
on error (``engine.stemfiles.write_track``). Each track is one session, fed block by block, so the
client's memory does not grow with the length of the file either.
"""
from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np

from engine import audio
from engine.errors import BadAudio, EngineUnavailable
from engine.stemfiles import OutputFormat, TrackReport, write_track

# {stem: path} for the stems the session will have, or dests(model_name, stems) -> {stem: path}
# (the model name and the stems are the daemon's answer to ``open``).
DestsVia = Union[Mapping[str, Path], Callable[[str, list[str]], Mapping[str, Path]]]


class SessionTrack:
    """A daemon session as an ``engine.stemfiles.Track``.

    Each block is checked here (NaN/Inf, named by file and frame, as in process) before it leaves this
    process, and up to ``in_flight`` pushes are kept in flight, so that the engine has the next blocks
    (to batch, or to start on) while this process writes the stems of the previous ones.
    """

    def __init__(self, session, where: str, sample_rate: int, in_flight: int = 3):
        self.session = session
        session._views = True  # stem blocks are written out and dropped: read-only views will do
        self.model: str = session.model
        self.stems: list[str] = list(session.stems)
        self.where, self.sample_rate = where, sample_rate
        self.in_flight = max(1, int(in_flight))
        self.frames_in = 0
        self._tickets: deque[int] = deque()
        self.finished = False  # closed (the daemon forgot it) or cancelled

    def push(self, block: np.ndarray) -> dict[str, np.ndarray]:
        block = audio.validate(block, self.where, self.frames_in, self.sample_rate)
        self._tickets.append(self.session.send_push(block))
        self.frames_in += block.shape[-1]
        if len(self._tickets) < self.in_flight:
            return {}
        with self._named():
            return self.session.receive(self._tickets.popleft())

    def close(self) -> Iterator[dict[str, np.ndarray]]:
        """The rest, as the blocks arrive (``{stem: float32 [channels, m]}`` read-only views), so
        that no more than a few replies of stems (2**16 frames each) are held here at a time."""
        with self._named():
            while self._tickets:
                yield self.session.receive(self._tickets.popleft())
            yield from self.session.close_blocks()
        self.finished = True

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        """The engine names the audio of its errors ``session N`` (e.g. BadAudio: ``session 7: input
        peak 8.8e+17 ... is beyond what spleeter-2stems can separate``); say ``where`` (the file)
        instead, so that a line reads the same as in process."""
        try:
            yield
        except BadAudio as e:
            prefix = f"session {getattr(self.session, 'id', None)}: "
            if not str(e).startswith(prefix):
                raise
            raise type(e)(f"{self.where}: {str(e)[len(prefix):]}") from None

    def cancel(self) -> None:
        """Free the session in the daemon; never raises (the error being handled matters more)."""
        if self.finished:
            return
        self.finished = True
        try:
            self.session.cancel()
        except Exception:
            pass


def separate_file_via(client, path: Path, dests: DestsVia, fmt: OutputFormat, *, model: str | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      **options) -> tuple[TrackReport, str]:
    """Separate ``path`` through the daemon ``client`` talks to; returns (what was written, the model
    name the daemon used).

    model: a model name, or None for the daemon's default.
    dests: {stem: path}, or ``dests(model_name, stems)`` returning it once the session is open.
    options: session options (engine.protocol.OPTION_TYPES: segment_s, overlap, shifts, seed,
    two_stems, transition_power) and ``repo`` (a weights folder, as ``Client.open``; default: the
    client's); None values are left out (the model's defaults).
    progress(frames_done, frames_total) is called after each block read and sent (up to 3 blocks,
    engine.stemfiles.READ_BLOCK_S each, are in flight ahead of the stems written).
    Raises what ``engine.separate.separate_file`` raises, plus the client's errors (EngineUnavailable,
    QueueFull, ModelError, ...). On any error the session is cancelled and nothing is left at the
    destinations.
    """
    options = {k: v for k, v in options.items() if v is not None}
    opened: list[SessionTrack] = []

    def open_track(sample_rate: int, channels: int, where: str) -> SessionTrack:
        track = SessionTrack(client.open(model, sample_rate, channels, **options), where, sample_rate)
        opened.append(track)
        return track

    def track_dests(track: SessionTrack) -> Mapping[str, Path]:
        return dests(track.model, track.stems) if callable(dests) else dests

    try:
        report = write_track(Path(path), track_dests, fmt, open_track, progress=progress)
    except EngineUnavailable:
        raise  # nobody to tell
    except BaseException:
        for track in opened:
            track.cancel()
        raise
    return report, opened[0].model
