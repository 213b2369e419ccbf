"""DAW glue, torch-free: separate what is selected in REAPER and put the stems back, aligned; the
region and engine helpers that the Audacity glue (``plugin_bridge.audacity``) shares.

The scripts in ``install/daw/`` are thin: they hand the host's API to the functions here, which hold
all the logic and are tested with the real engine daemon (REAPER through a fake of its API).

- ``read_region`` / ``write_region`` / ``separate_region``: the exact region of a source file that a
  host item plays (``round(start_s * sr)``, ``round(length_s * sr)`` frames), separated offline through
  the daemon (``plugin_bridge.files.separate_file_via``) into one float32 WAV per stem, written
  atomically (temporary name, then ``os.replace``) as ``<name>-<stem>.wav``.
- ``reaper_separate_selected(rpr, client, out_dir)``: REAPER, through an object exposing the
  ReaScript Python API (``RPR_*`` functions, as REAPER injects them into a ReaScript's globals).
- Audacity: ``plugin_bridge.audacity`` (mod-script-pipe; tested against the real Audacity).

Host versions assumed (see the functions): REAPER 6 or 7 with Python ReaScript enabled (the render
of items whose take has a playrate or pitch change uses ``GetSetProjectInfo*`` RENDER_* keys and
``RENDER_TARGETS``, REAPER 6.x+).
"""
from __future__ import annotations

import contextlib
import math
import re
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from engine.errors import BadAudio, BadRequest, EngineUnavailable, UnbakeError
from engine.inputs import open_input
from engine.stemfiles import OutputFormat

from .files import separate_file_via

__all__ = ["ItemResult", "read_region", "write_region", "separate_region", "reaper_separate_selected",
           "reaper_stems_dir", "safe_name", "connect"]

STEM_FORMAT = OutputFormat("wav", 32)   # float32 WAV: exact, keeps peaks above 0 dBFS; both hosts read it
HELLO_TIMEOUT_S = 5.0                   # connect(): how long the first hello may take (after any autostart)
REGION_BLOCK_FRAMES = 1 << 18           # regions are copied in blocks: memory does not grow with length
_NAME_BAD = re.compile(r'[\x00-\x1f<>:"/\\|?*]+')


# -- regions of source files ----------------------------------------------------------------------

def _frames(seconds: float, sample_rate: int) -> int:
    return int(round(seconds * sample_rate))


def _check_span(start_s: float, length_s: float) -> None:
    if not (math.isfinite(start_s) and math.isfinite(length_s)):
        raise BadRequest(f"region start {start_s!r} s, length {length_s!r} s: not finite")
    if not length_s > 0:
        raise BadRequest(f"region length must be > 0 s, got {length_s!r}")


def _copy_region(f, start: int, n: int, loop: bool, total: int, sink: Callable[[np.ndarray], None]) -> None:
    """Feed ``sink`` the frames [start, start + n) of the open AudioFile ``f`` (``total`` frames), in
    blocks: zeros outside the file, or the file repeated when ``loop``."""
    channels = f.num_channels
    pos, end = start, start + n
    while pos < end:
        if loop:
            at = pos % total
            take = total - at
        elif pos < 0:
            at, take = -1, min(end, 0) - pos
        elif pos >= total:
            at, take = -1, end - pos
        else:
            at, take = pos, total - pos
        take = min(take, end - pos, REGION_BLOCK_FRAMES)
        if at < 0:
            sink(np.zeros((channels, take), np.float32))
        else:
            f.seek(at)
            block = np.asarray(f.read(take), dtype=np.float32)
            if block.shape[-1] < take:  # a compressed file may hold fewer frames than announced
                block = np.concatenate([block, np.zeros((channels, take - block.shape[-1]), np.float32)], axis=1)
            sink(block)
        pos += take


def _region(path, start_s: float, length_s: float, loop: bool, open_sink) -> tuple[int, int]:
    """Feed the region's blocks (float32 [channels, k], in order) to the sink that
    ``open_sink(sample_rate, channels, frames)`` (a context manager) gives. Returns (rate, frames)."""
    _check_span(start_s, length_s)
    path = Path(path)
    with open_input(path) as f:
        sr, total = int(f.samplerate), int(f.frames)
        n = _frames(length_s, sr)
        if n < 1:
            raise BadRequest(f"{path}: a region of {length_s:g} s is less than one frame at {sr} Hz")
        with open_sink(sr, f.num_channels, n) as sink:
            _copy_region(f, _frames(start_s, sr), n, loop, total, sink)
    return sr, n


def read_region(path, start_s: float, length_s: float, *, loop: bool = False) -> tuple[np.ndarray, int]:
    """The exact region of a source file a host item plays: float32 [channels, round(length_s * sr)]
    starting at frame ``round(start_s * sr)`` of the file, and the file's sample rate.

    Where the region extends before the start or past the end of the file, it is zero-padded (silence,
    as REAPER plays an item longer than its source with "loop source" off), or with ``loop`` the file
    repeats (REAPER's "loop source" on). Raises BadAudio (unreadable, empty, > 2 channels) and
    BadRequest (a length that is not > 0).
    """
    held = {}

    def open_sink(sr: int, channels: int, n: int):
        held["out"] = out = np.empty((channels, n), np.float32)
        filled = 0

        def sink(block: np.ndarray) -> None:
            nonlocal filled
            out[:, filled:filled + block.shape[1]] = block
            filled += block.shape[1]
        return contextlib.nullcontext(sink)

    sr, _ = _region(path, start_s, length_s, loop, open_sink)
    return held["out"], sr


def write_region(path, start_s: float, length_s: float, dest, *, loop: bool = False) -> tuple[int, int]:
    """``read_region`` written to ``dest`` as a float32 WAV, block by block (memory does not grow with
    the length of the region). Returns (sample rate, frames)."""
    import soundfile

    @contextlib.contextmanager
    def open_sink(sr: int, channels: int, n: int):
        with soundfile.SoundFile(str(dest), "w", samplerate=sr, channels=channels, subtype="FLOAT",
                                 format="WAV") as out:
            yield lambda block: out.write(block.T)

    return _region(path, start_s, length_s, loop, open_sink)


def safe_name(name: str, fallback: str = "item") -> str:
    """A file-name-safe form of a host's item/track name (no path separators nor control characters)."""
    name = _NAME_BAD.sub("_", str(name)).strip(" .")
    return name[:100] or fallback


def _free_paths(out_dir: Path, name: str, stems: list[str]) -> dict[str, Path]:
    """``out_dir/<name>-<stem>.wav``, or ``<name> (2)-<stem>.wav``, ... : never a file that exists (a
    stem of an earlier run may be playing in the host)."""
    for k in range(1, 10_000):
        base = name if k == 1 else f"{name} ({k})"
        paths = {s: out_dir / f"{base}-{safe_name(s, 'stem')}.wav" for s in stems}
        if not any(p.exists() for p in paths.values()):
            return paths
    raise BadRequest(f"{out_dir}: too many files named {name!r}-*.wav")


def separate_region(client, source_path, start_s: float, length_s: float, out_dir, model: str | None = None,
                    *, name: str | None = None, loop: bool = False, **options) -> dict[str, Path]:
    """Separate the exact region of ``source_path`` a host item plays; returns {stem: path}.

    The region is ``round(length_s * sr)`` frames from frame ``round(start_s * sr)`` of the file, at the
    file's sample rate and channel count; where it extends past the end of the file (or before its
    start) it is zero-padded, or, with ``loop``, the file repeats (see ``read_region``). It is copied
    to a temporary float32 WAV and separated offline through the daemon ``client`` talks to
    (``plugin_bridge.files.separate_file_via``): every stem has exactly the region's length and
    alignment (latency compensated), equal to ``client.separate(read_region(...))``.

    Stems are written as float32 WAVs ``out_dir/<name>-<stem>.wav`` (``name``: default the source's
    file name without extension; ``<name> (2)-<stem>.wav`` and so on when those exist), atomically:
    each goes to a temporary name and is renamed into place once all are done; on any error nothing is
    left. ``options``: session options (segment_s, overlap, shifts, seed, two_stems, ...).
    Raises BadAudio, BadRequest, OutputError and the client's errors (EngineUnavailable, ...).
    """
    source_path = Path(source_path)
    out_dir = Path(out_dir)
    base = safe_name(name if name else source_path.stem)
    with tempfile.TemporaryDirectory(prefix="unbake-region-") as tmp:
        region = Path(tmp) / "region.wav"
        write_region(source_path, start_s, length_s, region, loop=loop)
        report, _ = separate_file_via(client, region, lambda model_name, stems: _free_paths(out_dir, base, stems),
                                      STEM_FORMAT, model=model, **options)
    return {stem: r.path for stem, r in report.stems.items()}


def connect(endpoint: str | None = None, *, autostart: bool | None = None, python: str | None = None,
            timeout_s: float = 60.0):
    """A ``Client`` that has said hello to the engine. endpoint, autostart: as ``Client`` (None: the
    default endpoint, ``$UNBAKE_ENDPOINT`` or the per-user socket, where an engine is started in the
    background when none answers). ``python``: the interpreter that starts the engine
    (``python -m engine.daemon``), for hosts whose embedded Python has no usable ``sys.executable``
    (REAPER); default: this one. Raises EngineUnavailable."""
    from .client import Client
    client = Client(endpoint, timeout_s=min(timeout_s, HELLO_TIMEOUT_S), retries=0, autostart=autostart)
    try:
        with _interpreter(python):
            client.hello()  # a dead endpoint is reported in seconds, not after a separation's timeout
    except BaseException:
        client.close()
        raise
    client.timeout_s, client.retries = float(timeout_s), 2
    return client


@contextlib.contextmanager
def _interpreter(python: str | None) -> Iterator[None]:
    if not python:
        yield
        return
    saved = sys.executable
    sys.executable = str(python)
    try:
        yield
    finally:
        sys.executable = saved


# -- REAPER ---------------------------------------------------------------------------------------

RENDER_ACTION = 42230  # "File: Render project, using the most recent render settings, auto-close render dialog"
_RENDER_NUMBERS = ("RENDER_SETTINGS", "RENDER_BOUNDSFLAG", "RENDER_TAILFLAG", "RENDER_ADDTOPROJ",
                   "RENDER_SRATE", "RENDER_CHANNELS", "RENDER_NORMALIZE", "RENDER_DITHER")
_RENDER_STRINGS = ("RENDER_FILE", "RENDER_PATTERN", "RENDER_FORMAT", "RENDER_FORMAT2")


@dataclass
class ItemResult:
    """What became of one selected REAPER item: its stems and new tracks, or why it was skipped."""
    name: str
    position_s: float = 0.0
    stems: dict[str, Path] = field(default_factory=dict)
    tracks: list[str] = field(default_factory=list)
    rendered: bool = False
    skipped: str | None = None


def _null(ptr) -> bool:
    """ReaScript Python returns pointers as strings, NULL as '(Type*)0x0000000000000000'."""
    if ptr is None or ptr == 0 or ptr == "" or ptr is False:
        return True
    return isinstance(ptr, str) and bool(re.fullmatch(r"\(.*\)0x0+", ptr))


def _out_str(result, index: int) -> str:
    """The output buffer of a ReaScript Python call (functions with buffers return tuples)."""
    if isinstance(result, (tuple, list)):
        return str(result[index]) if len(result) > index and result[index] is not None else ""
    return str(result or "")


def reaper_stems_dir(rpr) -> Path:
    """Where the stems of the current REAPER project go: ``<project media path>/unbake``
    (``GetProjectPath``: the project's recording path, or REAPER's default path when unsaved)."""
    path = _out_str(rpr.RPR_GetProjectPath("", 4096), 0)
    return Path(path or Path.home()) / "unbake"


def reaper_separate_selected(rpr, client, out_dir, model: str | None = None, *, render: bool = True,
                             log: Callable[[str], Any] | None = None, **options) -> list[ItemResult]:
    """Separate each selected media item of the current REAPER project into stems, each on a new track
    right below the item's track, at the item's position (aligned to the sample).

    rpr: an object exposing the ReaScript Python API as attributes (``RPR_CountSelectedMediaItems``,
    ...; ``install/daw/reaper_unbake.py`` builds it from the globals REAPER gives a ReaScript).
    client: a ``plugin_bridge.client.Client``. out_dir: the folder for the stem files
    (``reaper_stems_dir(rpr)`` is the project's). model, options: as ``Client.open``.
    log(line): progress and per-item messages; default ``RPR_ShowConsoleMsg``.

    For each item: the active take's source file, the take's start offset ``D_STARTOFFS`` and the
    item's ``D_LENGTH`` give the region (``separate_region``; loop source ``B_LOOPSRC`` honoured, past
    the end of the source without it: silence); its stems become tracks named "<take name> - <stem>"
    (``InsertTrackAtIndex`` below the item's track, ``P_NAME``), each with the stem file inserted by
    ``SetOnlyTrackSelected`` + ``SetEditCurPos(D_POSITION)`` + ``InsertMedia(file, 0)`` (and moved
    there if this REAPER inserted it elsewhere).

    Items whose take plays at ``D_PLAYRATE`` != 1, with ``D_PITCH`` != 0 or with stretch markers
    (``GetTakeNumStretchMarkers``) are rendered first, when
    ``render`` (the item alone, "selected media items" at the source's rate and channel count, through
    the RENDER_* project settings, which are restored afterwards): what is separated then is what the
    item plays, including its take FX, volume and fades. With ``render=False`` they are skipped with a
    message. Items without a take or a source file (empty items, MIDI, sections/reversed takes) are
    skipped with a message. The other items proceed; if the engine cannot be reached at all, the
    remaining items are skipped.

    One undo point ("unbake: separate into stems"); the edit cursor, the item selection and the track
    selection are restored. Returns one ``ItemResult`` per selected item, in selection order.
    """
    say = log or (lambda line: rpr.RPR_ShowConsoleMsg(f"{line}\n"))
    out_dir = Path(out_dir)
    items = [rpr.RPR_GetSelectedMediaItem(0, i) for i in range(int(rpr.RPR_CountSelectedMediaItems(0)))]
    if not items:
        say("unbake: no media item is selected; select the items to separate and run the action again")
        return []
    cursor = float(rpr.RPR_GetCursorPosition())
    tracks_selected = [rpr.RPR_GetSelectedTrack(0, i) for i in range(int(rpr.RPR_CountSelectedTracks(0)))]
    results: list[ItemResult] = []
    touched_tracks: list[Any] = []
    rpr.RPR_Undo_BeginBlock()
    try:
        engine_down: str | None = None
        for k, item in enumerate(items, 1):
            result = ItemResult(name=f"item {k}")
            results.append(result)
            if engine_down:
                result.skipped = engine_down
                say(f"unbake: {result.name}: skipped ({engine_down})")
                continue
            try:
                _reaper_item(rpr, client, item, out_dir, model, render, options, result, touched_tracks, say)
            except EngineUnavailable as e:
                engine_down = f"the unbake engine is not available: {e}"
                result.skipped = engine_down
                say(f"unbake: {result.name}: {engine_down}")
            except (UnbakeError, OSError) as e:
                result.skipped = str(e)
                say(f"unbake: {result.name}: {e}")
    finally:
        try:
            rpr.RPR_SetEditCurPos(cursor, False, False)
            rpr.RPR_SelectAllMediaItems(0, False)
            for item in items:
                rpr.RPR_SetMediaItemSelected(item, True)
            for track in touched_tracks:
                rpr.RPR_SetTrackSelected(track, False)
            for track in tracks_selected:
                rpr.RPR_SetTrackSelected(track, True)
            rpr.RPR_UpdateArrange()
        finally:
            rpr.RPR_Undo_EndBlock("unbake: separate into stems", -1)
    done = sum(1 for r in results if not r.skipped)
    say(f"unbake: {done} of {len(results)} item(s) separated" + (f" into {out_dir}" if done else ""))
    return results


def _reaper_item(rpr, client, item, out_dir: Path, model, render: bool, options: dict,
                 result: ItemResult, touched_tracks: list, say) -> None:
    take = rpr.RPR_GetActiveTake(item)
    if _null(take):
        result.skipped = "an empty item (no take): nothing to separate"
        say(f"unbake: {result.name}: skipped, {result.skipped}")
        return
    take_name = str(rpr.RPR_GetTakeName(take) or "") if hasattr(rpr, "RPR_GetTakeName") else ""
    if take_name:
        result.name = take_name
    if hasattr(rpr, "RPR_TakeIsMIDI") and rpr.RPR_TakeIsMIDI(take):
        result.skipped = "a MIDI take: nothing to separate"
        say(f"unbake: {result.name}: skipped, {result.skipped}")
        return
    source = rpr.RPR_GetMediaItemTake_Source(take)
    filename = "" if _null(source) else _out_str(rpr.RPR_GetMediaSourceFileName(source, "", 4096), 1)
    if not filename:
        result.skipped = ("no source file (an empty or in-project MIDI take, or a section/reversed source): "
                          "glue the item (Item > Glue items) and run again")
        say(f"unbake: {result.name}: skipped, {result.skipped}")
        return
    if not take_name:
        result.name = Path(filename).stem
    position = float(rpr.RPR_GetMediaItemInfo_Value(item, "D_POSITION"))
    length = float(rpr.RPR_GetMediaItemInfo_Value(item, "D_LENGTH"))
    loop = bool(rpr.RPR_GetMediaItemInfo_Value(item, "B_LOOPSRC"))
    startoffs = float(rpr.RPR_GetMediaItemTakeInfo_Value(take, "D_STARTOFFS"))
    playrate = float(rpr.RPR_GetMediaItemTakeInfo_Value(take, "D_PLAYRATE"))
    pitch = float(rpr.RPR_GetMediaItemTakeInfo_Value(take, "D_PITCH"))
    markers = int(rpr.RPR_GetTakeNumStretchMarkers(take)) if hasattr(rpr, "RPR_GetTakeNumStretchMarkers") else 0
    result.position_s = position
    name = safe_name(result.name)
    if abs(playrate - 1.0) > 1e-9 or abs(pitch) > 1e-9 or markers > 0:
        change = ", ".join(c for c in (f"playrate {playrate:g}" if abs(playrate - 1.0) > 1e-9 else "",
                                       f"pitch {pitch:+g} semitones" if abs(pitch) > 1e-9 else "",
                                       f"{markers} stretch marker(s)" if markers > 0 else "") if c)
        if not render:
            result.skipped = (f"its take plays at {change}; rendering is off: apply it first "
                              f"(Item > Glue items) and run again")
            say(f"unbake: {result.name}: skipped, {result.skipped}")
            return
        say(f"unbake: {result.name}: {change}: rendering the item first")
        with tempfile.TemporaryDirectory(prefix="unbake-render-") as tmp:
            rendered = _reaper_render_item(rpr, item, filename, Path(tmp))
            stems = separate_region(client, rendered, 0.0, length, out_dir, model, name=name, **options)
        result.rendered = True
    else:
        say(f"unbake: {result.name}: separating {length:.3f} s of {Path(filename).name} from {startoffs:.3f} s")
        stems = separate_region(client, filename, startoffs, length, out_dir, model, name=name,
                                loop=loop, **options)
    result.stems = stems
    track = rpr.RPR_GetMediaItem_Track(item)
    below = int(rpr.RPR_GetMediaTrackInfo_Value(track, "IP_TRACKNUMBER"))  # 1-based = 0-based index below it
    for k, (stem, path) in enumerate(stems.items()):
        index = below + k
        rpr.RPR_InsertTrackAtIndex(index, False)
        new = rpr.RPR_GetTrack(0, index)
        track_name = f"{result.name} - {stem}"
        rpr.RPR_GetSetMediaTrackInfo_String(new, "P_NAME", track_name, True)
        touched_tracks.append(new)
        _reaper_insert_at(rpr, str(path), new, position)
        result.tracks.append(track_name)
    say(f"unbake: {result.name}: {len(stems)} stem track(s) at {position:.3f} s: "
        + ", ".join(p.name for p in stems.values()))


def _reaper_insert_at(rpr, path: str, track, position: float) -> None:
    """Insert ``path`` on ``track`` at ``position``: InsertMedia mode 0 puts media on the current track at
    the edit cursor. The new item is the selected one afterwards; should this REAPER have put it on
    another track (its "current track" is the last touched one) or elsewhere, it is moved."""
    rpr.RPR_SetOnlyTrackSelected(track)
    rpr.RPR_SetEditCurPos(position, False, False)
    rpr.RPR_InsertMedia(path, 0)
    if int(rpr.RPR_CountSelectedMediaItems(0)) != 1:
        return
    placed = rpr.RPR_GetSelectedMediaItem(0, 0)
    if _null(placed):
        return
    if rpr.RPR_GetMediaItem_Track(placed) != track:
        rpr.RPR_MoveMediaItemToTrack(placed, track)
    if abs(float(rpr.RPR_GetMediaItemInfo_Value(placed, "D_POSITION")) - position) > 1e-9:
        rpr.RPR_SetMediaItemInfo_Value(placed, "D_POSITION", position)


def _reaper_render_item(rpr, item, source_file: str, work_dir: Path) -> Path:
    """Render ``item`` alone to a WAV in ``work_dir`` (what it plays: playrate, pitch, take FX, volume,
    fades), at the source's sample rate and channel count; returns the file.

    Uses the project's RENDER_* settings (``GetSetProjectInfo``, ``GetSetProjectInfo_String``):
    RENDER_SETTINGS 32 (selected media items), RENDER_BOUNDSFLAG 4 (selected media items), no tail,
    no normalisation, no dither, not added to the project, RENDER_FORMAT "evaw" (WAV, REAPER's default
    options) and no RENDER_FORMAT2, RENDER_FILE/RENDER_PATTERN in ``work_dir``; reads RENDER_TARGETS
    (REAPER 6.x+) and runs action 42230. Everything it changed is restored, whatever happens.
    """
    for needed in ("RPR_GetSetProjectInfo", "RPR_GetSetProjectInfo_String", "RPR_Main_OnCommand"):
        if not hasattr(rpr, needed):
            raise BadRequest(f"this REAPER has no {needed[4:]}: apply the playrate first (Item > Glue items)")
    with open_input(Path(source_file)) as f:
        sr, channels = int(f.samplerate), int(f.num_channels)
    saved_numbers = {k: rpr.RPR_GetSetProjectInfo(0, k, 0, False) for k in _RENDER_NUMBERS}
    saved_strings = {k: _out_str(rpr.RPR_GetSetProjectInfo_String(0, k, "", False), 3) for k in _RENDER_STRINGS}
    pattern = f"unbake-render-{uuid.uuid4().hex[:12]}"
    try:
        rpr.RPR_SelectAllMediaItems(0, False)
        rpr.RPR_SetMediaItemSelected(item, True)
        for key, value in (("RENDER_SETTINGS", 32), ("RENDER_BOUNDSFLAG", 4), ("RENDER_TAILFLAG", 0),
                           ("RENDER_ADDTOPROJ", 0), ("RENDER_SRATE", sr), ("RENDER_CHANNELS", channels),
                           ("RENDER_NORMALIZE", 0), ("RENDER_DITHER", 0)):
            rpr.RPR_GetSetProjectInfo(0, key, value, True)
        for key, value in (("RENDER_FILE", str(work_dir)), ("RENDER_PATTERN", pattern), ("RENDER_FORMAT", "evaw"),
                           ("RENDER_FORMAT2", "")):  # "": no secondary render
            rpr.RPR_GetSetProjectInfo_String(0, key, value, True)
        targets = [t for t in _out_str(rpr.RPR_GetSetProjectInfo_String(0, "RENDER_TARGETS", "", False), 3).split(";")
                   if t.lower().endswith(".wav")]
        if len(targets) != 1:
            raise BadRequest(f"REAPER would render {len(targets)} files for this item (RENDER_TARGETS "
                             f"{targets!r}); apply the playrate first (Item > Glue items)")
        target = Path(targets[0])
        rpr.RPR_Main_OnCommand(RENDER_ACTION, 0)
        if not target.is_file():
            raise BadAudio(f"REAPER did not render {target}; apply the playrate first (Item > Glue items)")
        return target
    finally:
        for key, value in saved_numbers.items():
            rpr.RPR_GetSetProjectInfo(0, key, value, True)
        for key, value in saved_strings.items():
            rpr.RPR_GetSetProjectInfo_String(0, key, value, True)
