"""The REAPER script's logic (plugin_bridge.daw.reaper_separate_selected) against a fake REAPER, with the
real engine daemon: only the host is faked (its ReaScript Python API, with REAPER's return conventions:
pointers as '(Type*)0x...' strings, NULL as zeros, tuples for functions with output buffers)."""
import os
import runpy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from plugin_bridge.client import Client
from plugin_bridge.daw import read_region, reaper_separate_selected, separate_region
from tests.conftest import REPO, read

STEMS = ["vocals", "accompaniment"]  # spleeter-2stems, the test engine's default model


# -- a fake REAPER ---------------------------------------------------------------------------------

@dataclass
class Take:
    handle: str
    name: str
    source: str            # a PCM_source handle
    startoffs: float = 0.0
    playrate: float = 1.0
    pitch: float = 0.0
    midi: bool = False
    stretch_markers: int = 0


@dataclass
class Item:
    handle: str
    track: str
    position: float
    length: float
    take: Take | None
    loop: bool = False
    selected: bool = False


@dataclass
class Track:
    handle: str
    name: str
    items: list = field(default_factory=list)


class FakeReaper:
    """A small REAPER project: tracks, items (position, length, loop) with one take each (source file,
    start offset, playrate, pitch), selections, the edit cursor, the RENDER_* project settings.

    ``InsertMedia(file, 0)`` adds the file as a new item at the edit cursor on the first selected track
    (or, with ``insert_on_last_touched``, on the last touched track, which ``SetOnlyTrackSelected``
    does not change), selects only it and moves the edit cursor to its end, as REAPER does by default.
    Action 42230 "renders" the one selected item per the RENDER_* settings: its source read at
    ``startoffs + t * playrate`` (linear interpolation), at RENDER_SRATE, as a float WAV.
    """

    def __init__(self, project_dir: Path, *, insert_on_last_touched: bool = False):
        self.project_dir = project_dir
        self.insert_on_last_touched = insert_on_last_touched
        self.tracks: list[Track] = []
        self.items: dict[str, Item] = {}
        self.takes: dict[str, Take] = {}
        self.sources: dict[str, str] = {}
        self.selected_tracks: list[str] = []
        self.last_touched: str | None = None
        self.cursor = 0.0
        self.inserts: list[dict] = []
        self.console: list[str] = []
        self.undo: list[tuple] = []
        self.calls: list[str] = []
        self.renders: list[np.ndarray] = []
        self.numbers = {"RENDER_SETTINGS": 0.0, "RENDER_BOUNDSFLAG": 1.0, "RENDER_TAILFLAG": 18.0,
                        "RENDER_ADDTOPROJ": 0.0, "RENDER_SRATE": 48000.0, "RENDER_CHANNELS": 2.0,
                        "RENDER_NORMALIZE": 0.0, "RENDER_DITHER": 1.0}
        self.strings = {"RENDER_FILE": "/home/me/renders", "RENDER_PATTERN": "$project",
                        "RENDER_FORMAT": "bDNwbSABAAAAAAAAAAAAAP////8EAAAAAAAAAA==", "RENDER_FORMAT2": "l3pm"}
        self._next = 0x10000

    def _handle(self, kind: str) -> str:
        self._next += 0x40
        return f"({kind}*)0x{self._next:016X}"

    # project building, for the tests
    def add_track(self, name: str) -> str:
        track = Track(self._handle("MediaTrack"), name)
        self.tracks.append(track)
        return track.handle

    def add_item(self, track: str, position: float, length: float, *, file: str | None = "", name: str = "",
                 startoffs: float = 0.0, playrate: float = 1.0, pitch: float = 0.0, midi: bool = False,
                 loop: bool = False, selected: bool = True, take: bool = True) -> str:
        t = None
        if take:
            source = self._handle("PCM_source")
            self.sources[source] = file or ""
            t = Take(self._handle("MediaItem_Take"), name, source, startoffs, playrate, pitch, midi)
            self.takes[t.handle] = t
        item = Item(self._handle("MediaItem"), track, position, length, t, loop, selected)
        self.items[item.handle] = item
        self._track(track).items.append(item.handle)
        return item.handle

    def _track(self, handle: str) -> Track:
        return next(t for t in self.tracks if t.handle == handle)

    def track_named(self, name: str) -> Track:
        return next(t for t in self.tracks if t.name == name)

    def _selected_items(self) -> list[str]:
        return [h for t in self.tracks for h in sorted(t.items, key=lambda h: self.items[h].position)
                if self.items[h].selected]

    def __getattribute__(self, name):  # every RPR_ call is recorded
        if name.startswith("RPR_"):
            object.__getattribute__(self, "calls").append(name)
        return object.__getattribute__(self, name)

    # the ReaScript API used by plugin_bridge.daw
    def RPR_CountSelectedMediaItems(self, proj):
        return len(self._selected_items())

    def RPR_GetSelectedMediaItem(self, proj, i):
        return self._selected_items()[i]

    def RPR_GetActiveTake(self, item):
        take = self.items[item].take
        return take.handle if take else "(MediaItem_Take*)0x0000000000000000"

    def RPR_GetTakeName(self, take):
        return self.takes[take].name

    def RPR_GetTakeNumStretchMarkers(self, take):
        return self.takes[take].stretch_markers

    def RPR_TakeIsMIDI(self, take):
        return self.takes[take].midi

    def RPR_GetMediaItemTake_Source(self, take):
        return self.takes[take].source

    def RPR_GetMediaSourceFileName(self, source, buf, size):
        return (source, self.sources[source], size)

    def RPR_GetMediaItemInfo_Value(self, item, key):
        it = self.items[item]
        return {"D_POSITION": it.position, "D_LENGTH": it.length, "B_LOOPSRC": float(it.loop)}[key]

    def RPR_SetMediaItemInfo_Value(self, item, key, value):
        assert key == "D_POSITION"
        self.items[item].position = float(value)
        return True

    def RPR_GetMediaItemTakeInfo_Value(self, take, key):
        t = self.takes[take]
        return {"D_STARTOFFS": t.startoffs, "D_PLAYRATE": t.playrate, "D_PITCH": t.pitch}[key]

    def RPR_GetMediaItem_Track(self, item):
        return self.items[item].track

    def RPR_GetMediaTrackInfo_Value(self, track, key):
        assert key == "IP_TRACKNUMBER"
        return float([t.handle for t in self.tracks].index(track) + 1)

    def RPR_InsertTrackAtIndex(self, index, want_defaults):
        self.tracks.insert(max(0, min(int(index), len(self.tracks))), Track(self._handle("MediaTrack"), ""))

    def RPR_GetTrack(self, proj, index):
        return self.tracks[index].handle if 0 <= index < len(self.tracks) else "(MediaTrack*)0x0000000000000000"

    def RPR_GetSetMediaTrackInfo_String(self, track, key, value, set_new):
        assert key == "P_NAME"
        if set_new:
            self._track(track).name = value
        return (True, track, key, self._track(track).name, set_new)

    def RPR_SetOnlyTrackSelected(self, track):
        self.selected_tracks = [track]

    def RPR_CountSelectedTracks(self, proj):
        return len(self.selected_tracks)

    def RPR_GetSelectedTrack(self, proj, i):
        return self.selected_tracks[i]

    def RPR_SetTrackSelected(self, track, selected):
        if selected and track not in self.selected_tracks:
            self.selected_tracks.append(track)
        if not selected and track in self.selected_tracks:
            self.selected_tracks.remove(track)

    def RPR_GetCursorPosition(self):
        return self.cursor

    def RPR_SetEditCurPos(self, time, moveview, seekplay):
        self.cursor = float(time)

    def RPR_InsertMedia(self, path, mode):
        assert mode == 0, mode
        target = self.last_touched if self.insert_on_last_touched else self.selected_tracks[0]
        info = sf.info(path)
        length = info.frames / info.samplerate
        self.inserts.append({"path": path, "mode": mode, "cursor": self.cursor, "track": target,
                             "selected_tracks": list(self.selected_tracks)})
        for it in self.items.values():
            it.selected = False
        self.add_item(target, self.cursor, length, file=path, name=Path(path).stem, selected=True)
        self.cursor += length
        return 1

    def RPR_MoveMediaItemToTrack(self, item, track):
        it = self.items[item]
        self._track(it.track).items.remove(item)
        self._track(track).items.append(item)
        it.track = track
        return True

    def RPR_SelectAllMediaItems(self, proj, selected):
        for it in self.items.values():
            it.selected = bool(selected)

    def RPR_SetMediaItemSelected(self, item, selected):
        self.items[item].selected = bool(selected)

    def RPR_Undo_BeginBlock(self):
        self.undo.append(("begin",))

    def RPR_Undo_EndBlock(self, desc, flags):
        self.undo.append(("end", desc, flags))

    def RPR_UpdateArrange(self):
        pass

    def RPR_ShowConsoleMsg(self, msg):
        self.console.append(msg)

    def RPR_GetProjectPath(self, buf, size):
        return (str(self.project_dir), size)

    def RPR_GetSetProjectInfo(self, proj, key, value, is_set):
        if is_set:
            self.numbers[key] = float(value)
        return self.numbers[key]

    def RPR_GetSetProjectInfo_String(self, proj, key, value, is_set):
        if key == "RENDER_TARGETS":
            assert not is_set
            pattern = os.path.join(self.strings["RENDER_FILE"], self.strings["RENDER_PATTERN"])
            targets = [pattern + ".wav"] + ([pattern + ".mp3"] if self.strings["RENDER_FORMAT2"] else [])
            return (True, proj, key, ";".join(targets), is_set)
        if is_set:
            self.strings[key] = value
        return (True, proj, key, self.strings[key], is_set)

    def RPR_Main_OnCommand(self, command, flag):
        assert command == 42230, command
        n, s = self.numbers, self.strings
        assert (n["RENDER_SETTINGS"], n["RENDER_BOUNDSFLAG"], n["RENDER_TAILFLAG"], n["RENDER_NORMALIZE"]) == (32, 4, 0, 0)
        assert s["RENDER_FORMAT"] == "evaw" and s["RENDER_FORMAT2"] == ""
        (item,) = [self.items[h] for h in self._selected_items()]
        src, sr = sf.read(self.sources[item.take.source], dtype="float32", always_2d=True)
        src = src.T
        assert sr == n["RENDER_SRATE"] and src.shape[0] == n["RENDER_CHANNELS"]
        at = item.take.startoffs * sr + np.arange(round(item.length * sr)) * item.take.playrate
        out = np.stack([np.interp(at, np.arange(src.shape[1]), ch, left=0, right=0) for ch in src]).astype(np.float32)
        sf.write(os.path.join(s["RENDER_FILE"], s["RENDER_PATTERN"] + ".wav"), out.T, sr, subtype="FLOAT")
        self.renders.append(out)


def items_on(fake: FakeReaper, track_name: str) -> list[Item]:
    return [fake.items[h] for h in fake.track_named(track_name).items]


# -- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(engine_endpoint):
    with Client(engine_endpoint, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def source(eval_dir, tmp_path_factory):
    """6.8 s of a real song (the whole dev excerpt), float32 WAV in a temp folder (never the repo)."""
    mix, sr = read(eval_dir / "music-delta-80s-rock" / "mixture.wav")
    path = tmp_path_factory.mktemp("reaper-media") / "song.wav"
    sf.write(str(path), mix.T, sr, subtype="FLOAT")
    return path


def region(source: Path, start_s: float, length_s: float) -> np.ndarray:
    """The samples an item plays, computed here from the whole file (zero past its end)."""
    mix, sr = read(source)
    a, n = round(start_s * sr), round(length_s * sr)
    out = np.zeros((mix.shape[0], n), np.float32)
    got = mix[:, max(a, 0):a + n]
    out[:, max(-a, 0):max(-a, 0) + got.shape[1]] = got
    return out


def check_stems(files: dict, expected, frames: int, mix: np.ndarray | None = None) -> None:
    assert list(files) == STEMS
    total = 0
    for stem, path in files.items():
        got, sr = read(path)
        assert sf.info(str(path)).subtype == "FLOAT"
        assert got.shape == expected[stem].shape and got.shape[1] == frames
        np.testing.assert_allclose(got, expected[stem], atol=1e-5, rtol=0)
        total = total + got
    if mix is not None:  # the stems add up to (nearly) what the item plays
        err = np.sum((total - mix) ** 2) / np.sum(mix ** 2)
        assert err < 1e-2, err


# -- tests ---------------------------------------------------------------------------------------------

def test_items_become_aligned_stem_tracks_below_their_tracks(client, source, tmp_path):
    fake = FakeReaper(tmp_path / "project")
    guitar, keys = fake.add_track("Guitar"), fake.add_track("Keys")
    fake.add_item(guitar, 10.0, 3.0, file=str(source), name="riff", startoffs=1.5)
    fake.add_item(guitar, 20.0, 1.0, take=False)                                      # empty item
    fake.add_item(keys, 2.25, 2.0, file=str(source), name="keys", startoffs=0.0)
    fake.add_item(keys, 8.0, 4.0, file="", name="MIDI 1", midi=True)                   # MIDI take
    fake.add_item(keys, 30.0, 1.0, file=str(source), name="not selected", selected=False)
    fake.cursor = 33.3
    fake.selected_tracks = [keys]
    before = {h: (it.position, it.selected) for h, it in fake.items.items()}
    out_dir = tmp_path / "stems"

    results = reaper_separate_selected(fake, client, out_dir)

    sr = sf.info(str(source)).samplerate
    assert [t.name for t in fake.tracks] == ["Guitar", "riff - vocals", "riff - accompaniment",
                                             "Keys", "keys - vocals", "keys - accompaniment"]
    assert [(r.name, r.skipped is None) for r in results] == [
        ("riff", True), ("item 2", False), ("keys", True), ("MIDI 1", False)]
    assert "empty item" in results[1].skipped and "MIDI" in results[3].skipped
    console = "".join(fake.console)
    assert "item 2: skipped" in console and "MIDI 1: skipped" in console and "2 of 4 item(s) separated" in console

    for result, pos, start, length in ((results[0], 10.0, 1.5, 3.0), (results[2], 2.25, 0.0, 2.0)):
        x = region(source, start, length)
        reference = client.separate(x, sr)
        check_stems(result.stems, reference, round(length * sr), x)
        for stem, path in result.stems.items():
            assert path == out_dir / f"{result.name}-{stem}.wav"
            (placed,) = items_on(fake, f"{result.name} - {stem}")
            assert placed.position == pos and fake.sources[placed.take.source] == str(path)
            (insert,) = [i for i in fake.inserts if i["path"] == str(path)]
            assert insert["cursor"] == pos and insert["mode"] == 0
            assert insert["selected_tracks"] == [placed.track]  # the stem's own new track, only
        assert result.tracks == [f"{result.name} - {s}" for s in STEMS]

    # the originals are untouched, the selections and the edit cursor are restored, one undo point
    assert {h: (fake.items[h].position, fake.items[h].selected) for h in before} == before
    assert not any(it.selected for h, it in fake.items.items() if h not in before)
    assert fake.cursor == 33.3 and fake.selected_tracks == [keys]
    assert fake.undo == [("begin",), ("end", "unbake: separate into stems", -1)]
    assert len(fake.inserts) == 4


def test_item_longer_than_its_source_is_zero_padded_to_its_exact_length(client, source, tmp_path):
    fake = FakeReaper(tmp_path)
    track = fake.add_track("Bass")
    fake.add_item(track, 4.0, 3.0, file=str(source), name="tail", startoffs=5.0)   # 1.2 s past the end
    (result,) = reaper_separate_selected(fake, client, tmp_path / "stems")
    sr = sf.info(str(source)).samplerate
    x = region(source, 5.0, 3.0)
    assert not x[:, round(1.8 * sr):].any() and x[:, :round(1.8 * sr)].any()
    check_stems(result.stems, client.separate(x, sr), round(3.0 * sr))
    assert [it.position for it in items_on(fake, "tail - vocals")] == [4.0]


def test_loop_source_repeats_and_regions_match_the_file(source):
    mix, sr = read(source)
    n = mix.shape[1]
    looped, _ = read_region(source, 5.0, 3.0, loop=True)
    np.testing.assert_array_equal(looped, np.concatenate([mix, mix], axis=1)[:, round(5.0 * sr):round(5.0 * sr) + round(3.0 * sr)])
    before, _ = read_region(source, -0.5, 1.0)
    np.testing.assert_array_equal(before, region(source, -0.5, 1.0))
    exact, _ = read_region(source, 1.5, 3.0)
    np.testing.assert_array_equal(exact, mix[:, round(1.5 * sr):round(1.5 * sr) + round(3.0 * sr)])
    far, _ = read_region(source, 10.0, 1.0, loop=True)
    start = round(10.0 * sr) % n
    np.testing.assert_array_equal(far, np.concatenate([mix, mix], axis=1)[:, start:start + sr])


def test_playrate_item_is_rendered_first_and_render_settings_restored(client, source, tmp_path):
    fake = FakeReaper(tmp_path)
    track = fake.add_track("Drums")
    fake.add_item(track, 1.0, 1.5, file=str(source), name="fast", startoffs=0.5, playrate=2.0)
    fake.add_item(track, 5.0, 1.0, file=str(source), name="plain", startoffs=2.0)
    numbers, strings = dict(fake.numbers), dict(fake.strings)
    fast, plain = reaper_separate_selected(fake, client, tmp_path / "stems")
    sr = sf.info(str(source)).samplerate
    assert fast.rendered and not fast.skipped and not plain.rendered
    (rendered,) = fake.renders
    assert rendered.shape[1] == round(1.5 * sr)
    check_stems(fast.stems, client.separate(rendered, sr), round(1.5 * sr), rendered)
    check_stems(plain.stems, client.separate(region(source, 2.0, 1.0), sr), sr)
    assert fake.numbers == numbers and fake.strings == strings
    assert [it.position for it in items_on(fake, "fast - accompaniment")] == [1.0]
    assert "playrate 2: rendering the item first" in "".join(fake.console)


def test_playrate_item_without_rendering_is_refused_and_others_proceed(client, source, tmp_path):
    fake = FakeReaper(tmp_path)
    track = fake.add_track("Drums")
    fake.add_item(track, 1.0, 1.5, file=str(source), name="fast", playrate=2.0)
    fake.add_item(track, 3.0, 1.0, file=str(source), name="pitched", pitch=-3.0)
    warped = fake.add_item(track, 4.0, 1.0, file=str(source), name="warped")
    fake.items[warped].take.stretch_markers = 2
    fake.add_item(track, 5.0, 1.0, file=str(source), name="plain", startoffs=2.0)
    fast, pitched, warped, plain = reaper_separate_selected(fake, client, tmp_path / "stems", render=False)
    assert "playrate 2" in fast.skipped and "pitch -3" in pitched.skipped and not plain.skipped
    assert "2 stretch marker(s)" in warped.skipped
    assert "fast: skipped, its take plays at playrate 2" in "".join(fake.console)
    assert [t.name for t in fake.tracks] == ["Drums", "plain - vocals", "plain - accompaniment"]
    assert not fake.renders and "RPR_Main_OnCommand" not in fake.calls


def test_media_inserted_on_another_track_is_moved_to_its_stem_track(client, source, tmp_path):
    fake = FakeReaper(tmp_path, insert_on_last_touched=True)
    track = fake.add_track("Vox")
    fake.last_touched = track  # a REAPER whose InsertMedia(…, 0) uses the last touched track
    original = fake.add_item(track, 7.5, 1.0, file=str(source), name="take", startoffs=0.25)
    (result,) = reaper_separate_selected(fake, client, tmp_path / "stems")
    assert fake.track_named("Vox").items == [original]
    for stem, path in result.stems.items():
        (placed,) = items_on(fake, f"take - {stem}")
        assert placed.position == 7.5 and fake.sources[placed.take.source] == str(path)


def test_same_source_twice_gets_distinct_files(client, source, tmp_path):
    fake = FakeReaper(tmp_path)
    track = fake.add_track("Gtr")
    fake.add_item(track, 0.0, 0.5, file=str(source), name="riff", startoffs=1.0)
    fake.add_item(track, 4.0, 0.5, file=str(source), name="riff", startoffs=3.0)
    first, second = reaper_separate_selected(fake, client, tmp_path / "stems")
    assert first.stems["vocals"].name == "riff-vocals.wav" and second.stems["vocals"].name == "riff (2)-vocals.wav"
    sr = sf.info(str(source)).samplerate
    check_stems(second.stems, client.separate(region(source, 3.0, 0.5), sr), round(0.5 * sr))


def test_no_engine_skips_every_item_with_one_message_each(source, tmp_path):
    fake = FakeReaper(tmp_path)
    track = fake.add_track("T")
    fake.add_item(track, 1.0, 1.0, file=str(source), name="a")
    fake.add_item(track, 3.0, 1.0, file=str(source), name="b")
    fake.cursor = 12.0
    with Client(f"ipc://{tmp_path}/nobody.sock", autostart=False, timeout_s=1, retries=0) as dead:
        a, b = reaper_separate_selected(fake, dead, tmp_path / "stems")
    assert "not available" in a.skipped and "not available" in b.skipped
    assert [t.name for t in fake.tracks] == ["T"] and fake.cursor == 12.0 and not fake.inserts
    assert not (tmp_path / "stems").exists() or not any((tmp_path / "stems").iterdir())


def test_nothing_selected_says_so(client, tmp_path):
    fake = FakeReaper(tmp_path)
    fake.add_track("T")
    assert reaper_separate_selected(fake, client, tmp_path) == []
    assert "no media item is selected" in "".join(fake.console) and not fake.undo


def run_reascript(fake: FakeReaper, monkeypatch, **env) -> None:
    """Run install/daw/reaper_unbake.py as REAPER does: the RPR_ functions are the script's globals."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    api = {name: getattr(fake, name) for name in dir(FakeReaper) if name.startswith("RPR_")}
    runpy.run_path(str(REPO / "install" / "daw" / "reaper_unbake.py"), init_globals=api, run_name="__main__")


def test_reascript_separates_into_the_project_folder(engine_endpoint, source, tmp_path, monkeypatch):
    fake = FakeReaper(tmp_path / "project")
    track = fake.add_track("Piano")
    fake.add_item(track, 3.0, 1.0, file=str(source), name="chords", startoffs=4.0)
    monkeypatch.delenv("UNBAKE_PYTHONPATH", raising=False)
    run_reascript(fake, monkeypatch, UNBAKE_ENDPOINT=engine_endpoint, UNBAKE_AUTOSTART="0")
    assert [t.name for t in fake.tracks] == ["Piano", "chords - vocals", "chords - accompaniment"]
    assert sorted(p.name for p in (tmp_path / "project" / "unbake").iterdir()) == [
        "chords-accompaniment.wav", "chords-vocals.wav"]
    assert "1 of 1 item(s) separated" in "".join(fake.console)


def test_reascript_reports_errors_in_the_console(source, tmp_path, monkeypatch):
    fake = FakeReaper(tmp_path / "project")
    track = fake.add_track("Piano")
    fake.add_item(track, 3.0, 1.0, file=str(source), name="chords")
    run_reascript(fake, monkeypatch, UNBAKE_ENDPOINT=f"ipc://{tmp_path}/nobody.sock", UNBAKE_AUTOSTART="0")
    console = "".join(fake.console)
    assert console.startswith("unbake: ") and "Traceback" not in console
    assert [t.name for t in fake.tracks] == ["Piano"]


def test_daw_module_never_imports_torch():
    import subprocess
    import sys
    code = "import sys, plugin_bridge.daw; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_separate_region_writes_float_wavs_atomically(client, source, tmp_path):
    out = tmp_path / "out"
    files = separate_region(client, source, 0.5, 1.0, out, name="x/y: z")
    assert sorted(p.name for p in out.iterdir()) == ["x_y_ z-accompaniment.wav", "x_y_ z-vocals.wav"]
    sr = sf.info(str(source)).samplerate
    check_stems(files, client.separate(region(source, 0.5, 1.0), sr), sr)
