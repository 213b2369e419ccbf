"""Stem files on disk, without torch: read a track in blocks, write one file per stem, atomically.

Shared by the in-process job (``engine.separate.separate_file``, a ``TrackSeparator``) and the
daemon path (``plugin_bridge.files.separate_file_via``, a daemon session): both hand
``write_track`` a way to open a *track*, an object that turns input blocks into stem blocks.

The input is read in blocks of ``READ_BLOCK_S`` seconds (pedalboard.io), so memory does not grow
with the length of the file. Each stem is written as it is finalised, to a temporary
``.STEM.XXXX.partial.EXT`` next to its destination; only when the whole track is done are the stems
renamed into place. A failure at any point (including Ctrl-C) deletes what was written.

What "nothing partial" takes, failure by failure:

- **The input must stay what was opened.** Opened and watched by ``engine.inputs``: a regular file
  only, not cut short at rest (``open_input``), stat'ed after every block and before the commit
  (``InputWatch``): a file that changes while it is read fails with ``changed while it was read``.
- **The disk must hold every frame.** A failed write is one line (``cannot write``, and "the disk is
  full" when the folder's filesystem has no space left), not pedalboard's RuntimeError. pedalboard's
  ``close()`` does not report a failed final flush, so before any rename each temporary is fsynced
  and read back: the frames on disk (libsndfile's count for WAV, a full decode for FLAC and MP3)
  must be the frames handed over.
- **A track's stems are committed all or none.** Every destination is checked before anything is
  written (an existing folder there is an error); at the end each temporary is renamed over its
  destination, an existing older stem being first hard-linked aside (``.STEM.XXXXXXXX.old.EXT``;
  renamed aside where links are not supported); if a rename fails, the stems already renamed are
  put back as they were (older stems restored, new ones removed), then the asides are deleted.
- **Nothing non-finite is written.** A stem block with NaN/Inf samples (a model overflowing on a
  huge input) fails the track with one line that names the stem, the frame and the input's peak.
- **Folders this job made are removed again on failure** (``OUT/MODEL/TRACK`` left empty by a full
  disk or an engine killed mid-separation), from the deepest up, only while empty.

This module is imported by the torch-free client: numpy, pedalboard and soundfile only; never torch,
``engine.sessions`` or ``engine.apply``.
"""
from __future__ import annotations

import errno
import math
import os
import secrets
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Union

import numpy as np

from .errors import BadAudio, BadRequest, OutputError, ProtocolError
from .inputs import InputWatch, input_stat, open_input

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


FULL_DISK_BYTES = 1 << 20  # a failed write with less free space than this is reported as a full disk


def _write_problem(folder: Path, e: BaseException | None = None) -> str:
    """Why a write into ``folder`` failed, in words: "the disk is full, N bytes free" when its
    filesystem has less than FULL_DISK_BYTES left (pedalboard's writers say only "Unable to write
    data"; a short file says nothing), else the error's own words (an OSError's strerror)."""
    if isinstance(e, OSError) and e.strerror and e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return e.strerror
    try:
        vfs = os.statvfs(folder)
        free = vfs.f_bavail * vfs.f_frsize
    except OSError:
        free = None
    if free is not None and free < FULL_DISK_BYTES:
        return f"the disk is full, {free} bytes free"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()[0] if e is not None and str(e).strip() else ""
    return text or (type(e).__name__ if e is not None else "unknown error")


def frames_on_disk(path: Path, ext: str) -> tuple[int, str | None]:
    """(frames, problem or None) of a written audio file, read back from disk with libsndfile: for
    WAV the frames its data chunk really holds (libsndfile clamps the header's count to the file's
    length), for FLAC and MP3 a full decode (their headers are rewritten in place at close and may
    promise frames that never reached the disk), stopped by the first decoder error."""
    import soundfile
    try:
        with soundfile.SoundFile(str(path)) as f:
            if ext == "wav":
                return f.frames, None
            n = 0
            while True:
                got = f.read(WRITE_BLOCK_FRAMES, dtype="float32").shape[0]
                if got == 0:
                    return n, None
                n += got
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (n if "n" in locals() else 0), text.removeprefix("Error : ")


class StemWriter:
    """Writes one stem to a temp file beside its destination (whose folder must exist).

    ``write`` blocks, then ``finish`` (close, fsync, read the frames back from disk) and rename
    ``tmp`` over ``dest`` (``commit`` does both for a lone stem; ``write_track`` commits a track's
    stems together, ``commit_all``). ``discard`` deletes the temp file and never raises.
    Errors: OutputError (cannot write, frames missing on disk), BadAudio (NaN/Inf samples).
    """

    def __init__(self, dest: Path, sample_rate: int, channels: int, fmt: OutputFormat):
        from pedalboard.io import AudioFile
        self.dest, self.fmt = dest, fmt
        self.frames = 0
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".partial.{fmt.ext}", dir=dest.parent)
            os.close(fd)
        except OSError as e:
            raise OutputError(f"{dest.parent}: cannot write ({_write_problem(dest.parent, e)})") from None
        self.tmp = Path(tmp)
        kwargs = {"quality": f"{fmt.mp3_bitrate_kbps} kbps"} if fmt.ext == "mp3" else {"bit_depth": fmt.bit_depth}
        try:
            self.file = AudioFile(str(self.tmp), "w", samplerate=sample_rate, num_channels=channels, **kwargs)
        except Exception as e:
            self.tmp.unlink(missing_ok=True)
            raise OutputError(f"{dest}: cannot write {fmt.ext} ({_write_problem(dest.parent, e)})") from None
        self.closed = False
        self.report = StemReport(dest)

    def write(self, block: np.ndarray) -> None:
        """block: float32 [channels, n], any n (written in slices of WRITE_BLOCK_FRAMES), finite.
        Raises BadAudio (NaN/Inf samples: nothing of the block written), OutputError."""
        for a in range(0, block.shape[-1], WRITE_BLOCK_FRAMES):
            self._write_slice(block[:, a:a + WRITE_BLOCK_FRAMES])

    def _write_slice(self, block: np.ndarray) -> None:
        if block.shape[-1] == 0:
            return
        peak = float(np.max(np.abs(block)))  # NaN or inf if any sample is
        if not math.isfinite(peak):
            bad = int(np.argwhere(~np.isfinite(block))[:, 1].min())
            raise BadAudio(f"{self.dest}: NaN or Inf sample at frame {self.frames + bad}; not written")
        self.report.peak = max(self.report.peak, peak)
        if self.fmt.clips and peak > 1.0:
            self.report.clipped_samples += int(np.count_nonzero(np.abs(block) > 1.0))
            block = np.clip(block, -1.0, 1.0)
        try:
            self.file.write(block)
        except Exception as e:  # pedalboard: RuntimeError "Unable to write data to audio file."
            raise OutputError(f"{self.dest}: cannot write ({_write_problem(self.dest.parent, e)})") from None
        self.frames += block.shape[-1]

    def finish(self) -> None:
        """Close the temp file, fsync it, and check that all ``frames`` are on disk; then give it the
        umask's mode. Raises OutputError naming ``dest`` (the temp file is left for ``discard``)."""
        self.closed = True
        try:
            self.file.close()
        except Exception as e:
            raise OutputError(f"{self.dest}: cannot write ({_write_problem(self.dest.parent, e)})") from None
        try:
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot write ({_write_problem(self.dest.parent, e)})") from None
        held, problem = frames_on_disk(self.tmp, self.fmt.ext)
        if held != self.frames or problem:
            why = _write_problem(self.dest.parent, RuntimeError(problem or "the file on disk is short"))
            raise OutputError(f"{self.dest}: cannot write: {held} of {self.frames} frames reached the disk ({why})")
        os.chmod(self.tmp, 0o666 & ~_UMASK)  # mkstemp made it 0600

    def commit(self) -> None:
        """``finish``, then rename over ``dest``. Raises OutputError."""
        self.finish()
        try:
            os.replace(self.tmp, self.dest)
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot write ({e.strerror or e})") from None

    def discard(self) -> None:
        """Close (errors ignored: a full disk may fail the final flush) and delete the temp file."""
        if not self.closed:
            self.closed = True
            try:
                self.file.close()
            except Exception:
                pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _aside(dest: Path) -> Path | None:
    """Keep an existing ``dest`` restorable before a new file is renamed over it: a hard link
    ``.NAME.XXXXXXXX.old.EXT`` beside it (``dest`` itself stays in place), or, where links are not
    supported, ``dest`` renamed to that name. None when there is nothing at ``dest``. Raises
    IsADirectoryError for a folder (never moved), OSError."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(21, "Is a directory", str(dest))
    for _ in range(100):
        keep = dest.parent / f".{dest.stem}.{secrets.token_hex(4)}.old{dest.suffix}"
        try:
            os.link(dest, keep, follow_symlinks=False)
            return keep
        except FileExistsError:
            continue
        except OSError:  # no hard links here (FAT, some network filesystems): move it aside
            if os.path.lexists(keep):
                continue
            os.rename(dest, keep)
            return keep
    raise FileExistsError(17, "File exists", str(keep))


def commit_all(writers: list[StemWriter]) -> None:
    """Rename each finished writer's temp file over its destination: all of them, or none.

    Each existing destination is first kept aside (``_aside``); if any step fails (or Ctrl-C comes),
    the destinations already renamed are put back as they were, in reverse order (the older file
    restored, a new one removed), and OutputError names the destination that failed (and any that
    could not be put back). On success the asides are deleted. The temp files of writers not
    renamed are left to ``discard``.
    """
    done: list[tuple[StemWriter, Path | None]] = []
    current = None
    try:
        for w in writers:
            current = w
            keep = _aside(w.dest)
            try:
                os.replace(w.tmp, w.dest)
            except BaseException:
                if keep is not None:
                    _put_back(keep, w.dest)
                raise
            done.append((w, keep))
    except BaseException as e:
        lost = []
        for w, keep in reversed(done):
            try:
                if keep is not None:
                    _put_back(keep, w.dest)
                else:
                    os.unlink(w.dest)
            except OSError as e2:
                lost.append(f"{w.dest}: could not be put back ({e2.strerror or e2}; the older file is {keep})")
        if not isinstance(e, OSError):
            raise
        why = "is a folder" if isinstance(e, IsADirectoryError) else f"cannot write ({_write_problem(current.dest.parent, e)})"
        raise OutputError(f"{current.dest}: {why}; no stem of this track was written"
                          + "".join(f"; {x}" for x in lost)) from None
    for _, keep in done:
        if keep is not None:
            try:
                keep.unlink()
            except OSError:
                pass
    for folder in {w.dest.parent for w in writers}:  # the renames themselves, durable (best effort)
        try:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


def _put_back(keep: Path, dest: Path) -> None:
    """Restore the file kept aside at ``keep`` to ``dest`` (over what is there now)."""
    os.replace(keep, dest)


def _check_dests(paths: Iterable[Path]) -> None:
    """Before anything is written: no destination may be a folder (a stem cannot replace one).
    Raises OutputError naming the first that is."""
    for dest in paths:
        if os.path.isdir(dest):
            raise OutputError(f"{dest}: is a folder; a stem cannot replace it (nothing written for this track)")


def _make_folders(folders: Iterable[Path]) -> list[Path]:
    """Create the missing ``folders`` (and parents); returns those created, parents first, for
    ``_remove_folders``. Raises OutputError (and removes what it made)."""
    made: list[Path] = []
    try:
        for folder in dict.fromkeys(folders):
            missing = []
            p = folder
            while not os.path.isdir(p) and p != p.parent:
                missing.append(p)
                p = p.parent
            for d in reversed(missing):
                try:
                    os.mkdir(d)
                except FileExistsError:
                    if not os.path.isdir(d):
                        raise NotADirectoryError(errno.ENOTDIR, "a file is where a folder should be", str(d))
                    continue
                made.append(d)
    except OSError as e:
        _remove_folders(made)
        raise OutputError(f"{e.filename or folder}: cannot write ({_write_problem(folder.parent, e)})") from None
    return made


def _remove_folders(made: list[Path]) -> None:
    """Remove the folders ``_make_folders`` made, deepest first, each only if empty; never raises."""
    for d in reversed(made):
        try:
            os.rmdir(d)
        except OSError:
            pass


def write_track(path: Path, dests: Dests, fmt: OutputFormat, open_track: OpenTrack, *,
                progress: Callable[[int, int], None] | None = None) -> TrackReport:
    """Read ``path`` in blocks through ``open_track(sample_rate, channels, str(path))`` into one file
    per stem; returns what was written.

    dests: {stem: path} for exactly the track's stems, or a callable ``dests(track)`` returning it.
    progress(frames_done, frames_total) is called after each block.
    Raises BadAudio (the input: unreadable, cut, changed while it was read; a stem with NaN/Inf
    samples), BadRequest, OutputError (a destination that is a folder, a failed or short write, a
    rename), and whatever ``open_track`` and the track raise. On any error nothing is left at the
    destinations nor beside them: the stems of a track are committed all or none (older files at
    the destinations kept as they were), and folders made for them are removed again.
    """
    path = Path(path)
    watch = InputWatch(path, input_stat(path))
    with open_input(path) as f:
        sr, channels, total = int(f.samplerate), f.num_channels, f.frames
        track = open_track(sr, channels, str(path))
        stems = list(track.stems)
        writers: dict[str, StemWriter] = {}
        made: list[Path] = []
        try:
            paths = {s: Path(p) for s, p in dict(dests(track) if callable(dests) else dests).items()}
            if set(paths) != set(stems):
                raise BadRequest(f"destinations {sorted(paths)} do not match stems {stems}")
            _check_dests(paths[s] for s in stems)
            made = _make_folders(paths[s].parent for s in stems)
            for stem in stems:
                writers[stem] = StemWriter(paths[stem], sr, channels, fmt)
            block_frames = max(1, int(READ_BLOCK_S * sr))
            done = 0
            peak = 0.0
            while done < total:
                try:
                    block = f.read(min(block_frames, total - done))
                except Exception as e:
                    watch.check(done, total)
                    raise BadAudio(f"{path}: cannot read audio at frame {done} ({str(e).splitlines()[0]})") from None
                watch.check(done + block.shape[-1], total)  # pedalboard pads a file that shrank with zeros
                if block.shape[-1] == 0:
                    raise BadAudio(f"{path}: file ends at frame {done}, its header says {total} (truncated?)")
                if block.size:
                    peak = max(peak, float(np.max(np.abs(block))))
                _write(writers, track.push(block), path, peak)
                done += block.shape[-1]
                if progress:
                    progress(done, total)
            rest = track.close()
            for blocks in ([rest] if isinstance(rest, Mapping) else rest):
                _write(writers, blocks, path, peak)
            for stem, w in writers.items():
                if w.frames != total:
                    raise ProtocolError(f"{path}: stem {stem!r} came back with {w.frames} frames, "
                                        f"the input has {total}")
            watch.check(total, total)  # the stems are of the file as it still is
            for w in writers.values():
                w.finish()
            commit_all([writers[s] for s in stems])
        except BaseException:
            for w in writers.values():
                w.discard()
            _remove_folders(made)
            raise
    report = TrackReport(path, sr, channels, total)
    report.stems = {s: w.report for s, w in writers.items()}
    return report


def _write(writers: dict[str, StemWriter], blocks: dict[str, np.ndarray], path: Path, peak: float) -> None:
    """Hand each stem block to its writer. Raises ProtocolError (a stem the track does not have),
    BadAudio (NaN/Inf samples in a stem: named with the input's peak so far, ``peak``)."""
    for stem, out in blocks.items():
        if stem not in writers:
            raise ProtocolError(f"a block for stem {stem!r}, the track's stems are {list(writers)}")
        out = np.asarray(out)
        if out.size and not np.isfinite(out).all():
            w = writers[stem]
            frame = w.frames + int(np.argwhere(~np.isfinite(out))[:, -1].min())
            raise BadAudio(f"{path}: the separation gave NaN or Inf samples in stem {stem!r} at frame {frame} "
                           f"(input peak {peak:.3g}); nothing written for it")
        writers[stem].write(out)
