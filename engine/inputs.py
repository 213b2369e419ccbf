"""A user's audio file, read safely (no torch): open it, check it is what it claims, notice it change.

Used by ``engine.stemfiles.write_track`` (the file job, in process and through the daemon), by the
CLI's up-front check of its inputs, by ``unbake bounce`` and by the DAW scripts.

- **A regular file only.** ``input_stat``: a named pipe, a socket or a device is refused by name,
  never opened (opening a FIFO blocks until a writer comes); a folder or a missing file likewise.
- **Not cut short at rest.** ``open_input`` refuses a cut file: WAV/AIFF by the frames libsndfile
  finds against the header's, FLAC/Ogg by decoding their last frame (pedalboard trusts the header
  and pads both with silence). Also refused: not audio, no frames, more than two channels.
- **Still the file that was opened.** ``InputWatch`` stats the file again (``write_track`` does
  after every block and before the commit): a file that shrinks, grows, is rewritten or replaced
  (a download or a render still running) fails with ``changed while it was read``.

Errors are BadAudio naming the file. This module is imported by the torch-free client: pedalboard
and soundfile only, imported when used; never torch.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import BadAudio

_NOT_REGULAR = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def input_stat(path: Path) -> os.stat_result:
    """``os.stat(path)`` of an input that must be a regular audio file (symlinks followed).

    Raises BadAudio naming the file: ``no such file``, ``is a folder``, ``is a named pipe (FIFO),
    not a regular file`` (likewise a socket or a device: never opened, as opening a FIFO blocks until
    a writer comes), ``cannot read (...)``.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise BadAudio(f"{path}: no such file") from None
    except OSError as e:
        raise BadAudio(f"{path}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadAudio(f"{path}: is a folder")
    if not stat.S_ISREG(st.st_mode):
        kind = next((what for test, what in _NOT_REGULAR if test(st.st_mode)), "a special file")
        raise BadAudio(f"{path}: is {kind}, not a regular file; unbake reads audio files (save the audio "
                       f"to a file first)")
    return st


def open_input(path: Path):
    """A pedalboard ``AudioFile`` for reading, checked: a regular file (``input_stat``), readable, not
    empty, not cut short, mono or stereo. Raises BadAudio naming the file.

    Cut short: pedalboard trusts the header and pads what is missing with silence. A WAV/AIFF
    holds fewer frames than its header says (libsndfile's count); a FLAC or Ogg file's last frame
    cannot be decoded (libsndfile seeks there; only when that fails is the file decoded from the
    start, in 1024-frame reads, to name the frame after which decoding fails and libsndfile's words,
    e.g. ``flac decoder lost sync``).
    """
    from pedalboard.io import AudioFile
    input_stat(path)
    try:
        f = AudioFile(str(path))
    except Exception as e:  # pedalboard raises ValueError/RuntimeError for unknown or broken files
        raise BadAudio(f"{path}: cannot read audio ({str(e).splitlines()[0]})") from None
    try:
        if f.frames < 1:
            raise BadAudio(f"{path}: contains no audio frames")
        _check_complete(path, f.frames)
        if f.num_channels > 2:
            raise BadAudio(f"{path}: {f.num_channels} channels; unbake separates mono or stereo audio "
                           f"(downmix it first)")
    except BaseException:
        f.close()
        raise
    return f


def _check_complete(path: Path, frames: int) -> None:
    """Raise BadAudio if the file at ``path`` holds less audio than the ``frames`` its header
    promises (see ``open_input``); formats libsndfile cannot read (e.g. m4a) pass unchecked."""
    import soundfile
    try:
        g = soundfile.SoundFile(str(path))
    except Exception:
        return
    with g:
        if g.frames < frames:  # WAV/AIFF: libsndfile counts the frames the data chunk really holds
            raise BadAudio(f"{path}: truncated: the header says {frames} frames, the file holds {g.frames}")
        if g.format not in ("FLAC", "OGG") or g.frames < 1:
            return
        try:  # FLAC/Ogg seek by bisection over the file: a cut file cannot reach its last frame
            g.seek(g.frames - 1)
            if g.read(1).shape[0] == 1:
                return
            problem = "its last frame is missing"
        except Exception as e:
            problem = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        header = g.frames
    decoded = 0
    try:  # the failure path only (a failed seek leaves the decoder unusable: open it again): where
        # decoding stops, and the decoder's own words
        with soundfile.SoundFile(str(path)) as g:
            while decoded < header:
                got = g.read(1024).shape[0]
                if got == 0:
                    break
                decoded += got
    except Exception as e:
        problem = str(e).splitlines()[0].removeprefix("Error : ").rstrip(".") or problem
    raise BadAudio(f"{path}: truncated: the header says {header} frames, decoding fails after frame {decoded} "
                   f"(libsndfile: {problem.rstrip('.')})")


class InputWatch:
    """Tells whether the input file is still the one that was opened: same inode, size, mtime."""

    def __init__(self, path: Path, st: os.stat_result):
        self.path, self.st = path, st

    def check(self, frame: int, total: int) -> None:
        """Raise BadAudio (``changed while it was read``) if the file is not as it was at open.
        frame, total: frames read so far and in all, for the message."""
        st0 = self.st
        at = f"after {frame} of {total} frames"
        try:
            st = os.stat(self.path)
        except OSError as e:
            problem = f"it is gone ({e.strerror or e})"
        else:
            if (st.st_ino, st.st_dev) != (st0.st_ino, st0.st_dev):
                problem = "another file took its name"
            elif st.st_size != st0.st_size:
                problem = f"{st0.st_size} -> {st.st_size} bytes"
            elif st.st_mtime_ns != st0.st_mtime_ns:
                problem = "rewritten in place"
            else:
                return
        raise BadAudio(f"{self.path}: changed while it was read ({problem}, {at}); nothing written for it")
