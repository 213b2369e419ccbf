"""Audacity glue, torch-free: separate Audacity's selection into stems, one new track per stem, aligned.

``install/daw/audacity_unbake.py`` is the thin script; the logic is here and is tested against the
real Audacity (Debian 12's 3.2.4) under Xvfb, with the real engine daemon. Audacity is driven through
mod-script-pipe (``plugin_bridge.audacity_pipe.PipeTransport``; any object with
``send(command, timeout_s=None) -> reply`` will do) and never with a command that opens a dialog:

- ``audacity_selection_plan(pipe)``: what would be separated, read and checked before the engine is
  involved (the time selection, the selected wave tracks, where the exported audio ends). The time
  selection comes from ``GetInfo: Type=Selection`` where this Audacity lists it (``GetInfo:
  Type=Commands``), else (3.2.x, whose GetInfo opens a modal dialog for an unknown type) from a label
  added at the selection (``AddLabel``) on a label track of its own, read back (``GetInfo:
  Type=Labels``), the track then removed (never ``Undo``: it would also revert what other scripts
  changed without an undo point).
  GetInfo prints times with 6 significant digits, so a second read of the selection moved next to
  zero (``SelectTime: RelativeTo=Selection``) gives it to a small fraction of a sample.
- ``audacity_separate_selection(pipe, client, work_dir)``: export the selection as float WAV,
  separate it through the daemon, import each stem as a track whose clip starts at the selection start.
"""
from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from engine.errors import BadAudio, BadRequest
from engine.inputs import open_input

from .audacity_pipe import COMMAND_TIMEOUT_S, FINISHED, AudacityError, PipeTransport
from .daw import safe_name, separate_region

__all__ = ["AudacityError", "AudacityResult", "AudacitySelection", "PipeTransport", "audacity_command",
           "audacity_info", "audacity_selection", "audacity_selection_plan", "audacity_separate_selection",
           "WAV_FORMAT_PREF", "WAV_FLOAT"]

FILE_TIMEOUT_S = 600.0   # Export2 and Import2 of a long selection may take a while
WAV_FORMAT_PREF = "/FileFormats/ExportFormat_SF1_Type/WAV_10000"  # the WAV sample format Export2 uses
WAV_FLOAT = "6"          # libsndfile's SF_FORMAT_FLOAT (2 is 16-bit PCM, Audacity's default)
LABEL_DIALOG_PREF = "/GUI/DialogForNameNewLabel"  # "1": AddLabel opens a dialog for the label's name
# Audacity's value for a preference the user never set ("" = leave it unset; see _preferences)
_PREF_DEFAULTS = {WAV_FORMAT_PREF: "0", LABEL_DIALOG_PREF: "0"}
_NEEDED = ("Export2", "Import2", "SelectTime", "SelectTracks", "SetClip", "SetTrack", "GetPreference",
           "SetPreference")


@dataclass
class AudacitySelection:
    """What ``audacity_separate_selection`` exports: the selected audible wave tracks over
    [start_s, end_s) (seconds from the project start); ``audio_end_s``: where the last of them ends
    (the export stops there); ``channels``: 1 when they are all mono, else 2; ``tracks``: the project's
    tracks as ``GetInfo: Type=Tracks`` lists them (JSON objects), ``names``: the selected wave tracks'."""
    start_s: float
    end_s: float
    audio_end_s: float
    channels: int
    tracks: list[dict]
    names: list[str]


@dataclass
class AudacityResult:
    """A separated selection: exported from ``start_s`` to ``end_s`` seconds (the end of the audio when
    the selection runs past it), ``frames`` frames at ``sample_rate`` Hz; ``stems``: {stem: file};
    ``tracks``: the new tracks' names, in order."""
    start_s: float
    end_s: float
    channels: int
    frames: int = 0
    sample_rate: int = 0
    stems: dict[str, Path] = field(default_factory=dict)
    tracks: list[str] = field(default_factory=list)


def _quote(value) -> str:
    text = str(value)
    if '"' in text or "\n" in text:
        raise BadRequest(f"{text!r}: Audacity's scripting commands cannot carry a double quote or a newline")
    return f'"{text}"'


def _num(value: float) -> str:
    return repr(float(value))


def _send(pipe, command: str, timeout_s: float | None) -> str:
    return pipe.send(command) if timeout_s is None else pipe.send(command, timeout_s=timeout_s)


def audacity_command(pipe, command: str, *, timeout_s: float | None = None) -> str:
    """Send one scripting command; returns the reply without its status line nor surrounding empty
    lines. ``timeout_s``: seconds to wait (None: the transport's default). Raises AudacityError when
    the status is not "OK" (the message names the command and Audacity's words)."""
    lines = _send(pipe, command, timeout_s).replace("\r", "").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    status = lines.pop() if lines and lines[-1].startswith(FINISHED) else None
    body = "\n".join(lines).strip()
    if status is None or status[len(FINISHED):].strip() != "OK":
        raise AudacityError(f"Audacity: {command.split(':')[0]}: "
                            f"{body or status or 'no reply'}{'' if status else ' (no status line)'}")
    return body


def _json(pipe, command: str):
    body = audacity_command(pipe, command)
    try:
        return json.loads(body)
    except ValueError:
        raise AudacityError(f"Audacity: {command}: not JSON: {body[:200]!r}") from None


def audacity_info(pipe) -> dict[str, list]:
    """The scripting commands this Audacity has: {command id: its parameters as ``GetInfo:
    Type=Commands`` lists them}. Menu items (AddLabel, Undo) are not in it."""
    commands = _json(pipe, "GetInfo: Type=Commands Format=JSON")
    if not isinstance(commands, list):
        raise AudacityError(f"Audacity: GetInfo: Type=Commands: unexpected reply {str(commands)[:200]!r}")
    return {c["id"]: c.get("params", []) for c in commands if isinstance(c, dict) and "id" in c}


def _info_types(info: dict[str, list]) -> set[str]:
    for param in info.get("GetInfo", []):
        if param.get("key") == "Type":
            return set(param.get("enum", []))
    return set()


def _get_preference(pipe, name: str) -> str | None:
    """A preference's value, None where it is not set (GetPreference fails for an unset one)."""
    try:
        return audacity_command(pipe, f"GetPreference: Name={_quote(name)}")
    except AudacityError:
        return None


@contextlib.contextmanager
def _preferences(pipe, wanted: dict[str, str]) -> Iterator[None]:
    """Set Audacity preferences {name: value} for the block and put the user's values back afterwards,
    also on errors. One the user never set is put back as Audacity's default value for it (a
    preference cannot be unset through scripting); one already at the wanted value is not touched."""
    saved: dict[str, str] = {}
    try:
        for name, value in wanted.items():
            current = _get_preference(pipe, name)
            if (current if current is not None else _PREF_DEFAULTS.get(name)) == value:
                continue
            saved[name] = current if current is not None else _PREF_DEFAULTS.get(name, "")
            audacity_command(pipe, f"SetPreference: Name={_quote(name)} Value={_quote(value)}")
        yield
    finally:
        for name, value in saved.items():
            audacity_command(pipe, f"SetPreference: Name={_quote(name)} Value={_quote(value)}")


# -- the time selection ---------------------------------------------------------------------------

class _LabelReader:
    """Reads the time selection as a label added at it (``AddLabel``, Edit > Labels > Add Label at
    Selection) on a label track of its own (``NewLabelTrack``, appended after the project's tracks) and
    listed by ``GetInfo: Type=Labels``; ``remove()`` takes that track out again (``RemoveTracks``).
    Nothing is undone: Undo would also revert changes that other scripts made without an undo point."""

    def __init__(self, pipe, tracks: list[dict]):
        self.pipe, self.index, self.seen = pipe, len(tracks), Counter()
        audacity_command(pipe, "NewLabelTrack:")
        self.created = True
        now = _json(pipe, "GetInfo: Type=Tracks Format=JSON")
        if len(now) != self.index + 1 or now[self.index].get("kind") != "label":
            raise AudacityError("Audacity: NewLabelTrack did not add a label track at the end: cannot read the "
                                "selection; give it as --start/--end")

    def __call__(self) -> tuple[float, float]:
        audacity_command(self.pipe, f"SelectTracks: Track={self.index} TrackCount=1 Mode=Set")
        audacity_command(self.pipe, "AddLabel:")
        mine = Counter(tuple(label) for track, labels in _json(self.pipe, "GetInfo: Type=Labels Format=JSON") or []
                       if int(track) == self.index for label in labels)
        new = list((mine - self.seen).elements())
        if len(new) != 1:
            raise AudacityError("Audacity: AddLabel added no label: cannot read the selection; give it as --start/--end")
        self.seen = mine
        return float(new[0][0]), float(new[0][1])

    def remove(self) -> None:
        if self.created:
            audacity_command(self.pipe, f"SelectTracks: Track={self.index} TrackCount=1 Mode=Set")
            audacity_command(self.pipe, "RemoveTracks:")
            self.created = False


def _restore_tracks(pipe, tracks: list[dict]) -> None:
    """Select exactly the tracks that ``tracks`` (``GetInfo: Type=Tracks``) has selected."""
    selected = [i for i, t in enumerate(tracks) if t.get("selected")]
    runs: list[list[int]] = []
    for i in selected:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    if not runs:
        audacity_command(pipe, "SelectTracks: Track=0 TrackCount=0 Mode=Set")
    for k, (a, b) in enumerate(runs):
        audacity_command(pipe, f"SelectTracks: Track={a} TrackCount={b - a} Mode={'Set' if k == 0 else 'Add'}")


SELECT_STEP_S = 100.0  # SelectTime takes offsets down to -100 s (below, it opens its dialog)


def _move_selection(pipe, start_by: float, end_by: float) -> None:
    """Move the start of the time selection by ``-start_by`` seconds, then its end by ``-end_by``, in
    steps SelectTime accepts (``RelativeTo=Selection``, each offset >= -SELECT_STEP_S). The start moves
    first and alone, then the end: while the end comes down to its place above the start, the
    selection stays ordered (Audacity would swap its ends otherwise)."""
    for which, left in (("Start", start_by), ("End", end_by)):
        while left != 0.0:
            step = min(left, SELECT_STEP_S)
            other = "End" if which == "Start" else "Start"
            audacity_command(pipe, f"SelectTime: {which}={_num(-step)} {other}=0.0 RelativeTo=Selection")
            left -= step


def audacity_selection(pipe, info: dict[str, list] | None = None,
                       tracks: list[dict] | None = None) -> tuple[float, float]:
    """The time selection (start, end), seconds from the project start, to a small fraction of a sample.

    With ``GetInfo: Type=Selection`` where this Audacity has it (``info``: ``audacity_info``), else with
    labels added at the selection on a label track of its own, removed afterwards (3.2.x; ``tracks``:
    ``GetInfo: Type=Tracks`` as it was, whose track selection is put back; default: read here). GetInfo prints 6 significant digits: the first read gives
    (a0, a1) to within e = 1e-5 * max(|a0|, |a1|, 1) s; the selection is then moved (``_move_selection``)
    by a0 + 2e and a1 - 2e, to [t0 - a0 - 2e, t1 - a1 + 2e], both ends next to zero and still in order,
    and read again, exact to ~1e-10 of the times. The user's selection is then set back exactly.
    """
    info = audacity_info(pipe) if info is None else info
    if "Selection" in _info_types(info):
        def read() -> tuple[float, float]:
            got = _json(pipe, "GetInfo: Type=Selection Format=JSON")
            return float(got["Start"]), float(got["End"])
        reader = None
    else:
        tracks = _json(pipe, "GetInfo: Type=Tracks Format=JSON") if tracks is None else tracks
        reader = read = _LabelReader(pipe, tracks)
    try:
        with _preferences(pipe, {LABEL_DIALOG_PREF: "0"} if reader else {}):
            a0, a1 = read()
            e = 1e-5 * max(abs(a0), abs(a1), 1.0)
            _move_selection(pipe, a0 + 2 * e, a1 - 2 * e)
            b0, b1 = read()
    except (KeyError, TypeError, ValueError) as err:
        raise AudacityError(f"Audacity: cannot read the selection ({err!r}): give it as --start/--end") from None
    finally:
        if reader is not None:
            reader.remove()
            _restore_tracks(pipe, tracks)
    t0, t1 = a0 + 2 * e + b0, a1 - 2 * e + b1
    if t1 - t0 < 1e-9 * max(1.0, abs(t0)):
        t1 = t0
    audacity_command(pipe, f"SelectTime: Start={_num(t0)} End={_num(t1)} RelativeTo=ProjectStart")
    return t0, t1


# -- the selection plan ---------------------------------------------------------------------------

def _span(t0: float, t1: float) -> str:
    return f"{t0:.3f}-{t1:.3f} s"


def audacity_selection_plan(pipe, start_s: float | None = None, end_s: float | None = None) -> AudacitySelection:
    """Read and check what would be separated, before anything is exported; nothing opens a dialog.

    start_s, end_s (seconds from the project start): set the time selection (``SelectTime``) instead of
    reading it. Raises BadRequest with one line naming what the user did: no wave track selected, the
    selected ones all muted (or not soloed while others are), nothing selected in time, a selection
    that lies entirely past the end of the selected audio. AudacityError: Audacity lacks a scripting
    command this needs (Audacity 3.x), or does not answer.
    """
    if (start_s is None) != (end_s is None):
        raise BadRequest("give both the start and the end of the selection, or neither")
    if start_s is not None and not (math.isfinite(start_s) and math.isfinite(end_s) and end_s > start_s >= 0):
        raise BadRequest(f"selection {start_s!r}..{end_s!r} s: need 0 <= start < end")
    info = audacity_info(pipe)
    missing = [c for c in _NEEDED if c not in info]
    if missing:
        raise AudacityError(f"this Audacity has no scripting command {', '.join(missing)}: Audacity 3.x is needed")
    tracks = _json(pipe, "GetInfo: Type=Tracks Format=JSON")
    if not isinstance(tracks, list):
        raise AudacityError(f"Audacity: GetInfo: Type=Tracks: unexpected reply {str(tracks)[:200]!r}")
    waves = [t for t in tracks if isinstance(t, dict) and t.get("kind") == "wave" and t.get("selected")]
    if not waves:
        raise BadRequest("no audio track is selected in Audacity: click a track (or drag over its audio) "
                         "to select what to separate")
    # Audacity's export leaves out muted tracks, or the tracks that are not soloed when one is
    solo = any(t.get("solo") for t in tracks if isinstance(t, dict) and t.get("kind") == "wave")
    audible = [t for t in waves if (t.get("solo") if solo else not t.get("mute"))]
    if not audible:
        raise BadRequest(f"the selected track(s) {', '.join(repr(t.get('name')) for t in waves)} are "
                         f"{'not soloed' if solo else 'muted'}: Audacity would export silence")
    if start_s is not None:
        audacity_command(pipe, f"SelectTime: Start={_num(start_s)} End={_num(end_s)} RelativeTo=ProjectStart")
        t0, t1 = float(start_s), float(end_s)
    else:
        t0, t1 = audacity_selection(pipe, info, tracks)
    if not t1 > t0:
        raise BadRequest(f"nothing is selected in time (the cursor is at {t0:.3f} s): drag over the audio "
                         f"to separate, or give --start/--end")
    audio_end = max(float(t.get("end", 0.0)) for t in audible)
    if t0 >= audio_end:
        raise BadRequest(f"the selection {_span(t0, t1)} lies past the end of the audio ({audio_end:.3f} s): "
                         f"select a range that holds audio")
    channels = 2 if any(int(t.get("channels", 2)) >= 2 for t in audible) else 1
    return AudacitySelection(t0, t1, min(t1, audio_end), channels, tracks, [str(t.get("name", "")) for t in audible])


# -- export, separate, import ---------------------------------------------------------------------

def _remove_new_tracks(pipe, first: int, count: int) -> None:
    """Take tracks [first, first + count) out again (an import that failed half way), best effort."""
    if count <= 0:
        return
    with contextlib.suppress(AudacityError):
        audacity_command(pipe, f"SelectTracks: Track={first} TrackCount={count} Mode=Set")
        audacity_command(pipe, "RemoveTracks:")


def audacity_separate_selection(pipe, client, work_dir, model: str | None = None, *,
                                start_s: float | None = None, end_s: float | None = None,
                                name: str | None = None, plan: AudacitySelection | None = None,
                                **options) -> AudacityResult:
    """Separate Audacity's selection into stems: one new track per stem, its clip at the selection start.

    pipe: see the module. client: a ``plugin_bridge.client.Client``. work_dir: where the stem files are
    kept (float32 WAV ``<name>-<stem>.wav``; Audacity 3 copies imported audio into its project).
    start_s, end_s: set the time selection first (seconds). plan: ``audacity_selection_plan``'s answer
    when the caller read it already (the script does, before the engine starts). name: names the stems
    and tracks (default: the selected track's name, or "selection"). options: session options.

    The selection of the selected tracks is exported (``Export2``, mixed as Audacity mixes it, at the
    project rate) as float WAV: the WAV sample-format preference (``WAV_FORMAT_PREF``) is set to float
    for the export and the user's value put back afterwards, also on errors. A selection running past
    the end of the audio is exported, separated and reported up to the end of the audio (Audacity
    exports no more). Each stem is then imported (``Import2``: a new track, the only one selected),
    named (``SetTrack``) and moved to the selection start (``SetClip``); the new tracks are left
    selected over the original time range. If an import fails, the stem tracks already imported are
    removed again and the stem files deleted. Raises BadRequest, BadAudio, AudacityError and the client's errors.
    """
    plan = plan or audacity_selection_plan(pipe, start_s, end_s)
    t0 = plan.start_s
    base = safe_name(name or (plan.names[0] if len(plan.names) == 1 else "") or "selection", "selection")
    result = AudacityResult(t0, plan.audio_end_s, plan.channels)
    with tempfile.TemporaryDirectory(prefix="unbake-audacity-") as tmp:
        exported = Path(tmp) / "selection.wav"
        with _preferences(pipe, {WAV_FORMAT_PREF: WAV_FLOAT}):
            audacity_command(pipe, f"Export2: Filename={_quote(exported)} NumChannels={plan.channels}",
                             timeout_s=FILE_TIMEOUT_S)
        if not exported.is_file():
            raise AudacityError(f"Audacity reported the selection {_span(t0, plan.end_s)} exported but wrote no file")
        try:
            with open_input(exported) as f:
                frames, sr = int(f.frames), int(f.samplerate)
        except BadAudio:
            frames, sr = 0, 0
        if frames < 1:
            raise BadRequest(f"Audacity exported no audio for the selection {_span(t0, plan.end_s)} "
                             f"(the selected audio ends at {plan.audio_end_s:.3f} s)")
        result.frames, result.sample_rate, result.end_s = frames, sr, t0 + frames / sr
        result.stems = separate_region(client, exported, 0.0, frames / sr, work_dir, model, name=base, **options)
    first_new = len(plan.tracks)
    try:
        for stem, path in result.stems.items():
            track_name = f"{base} - {stem}"
            audacity_command(pipe, f"Import2: Filename={_quote(path)}", timeout_s=FILE_TIMEOUT_S)
            result.tracks.append(track_name)
            audacity_command(pipe, f"SetTrack: Name={_quote(track_name)}")
            audacity_command(pipe, f"SetClip: At={_num(frames / sr / 2)} Start={_num(t0)}")
    except BaseException:
        _remove_new_tracks(pipe, first_new, len(result.tracks))
        for path in result.stems.values():
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    audacity_command(pipe, f"SelectTracks: Track={first_new} TrackCount={len(result.stems)} Mode=Set")
    audacity_command(pipe, f"SelectTime: Start={_num(t0)} End={_num(plan.end_s)} RelativeTo=ProjectStart")
    return result
