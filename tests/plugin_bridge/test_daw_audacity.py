"""The Audacity script's logic (plugin_bridge.daw.audacity_separate_selection) against a fake Audacity
behind mod-script-pipe, with the real engine daemon: only the host is faked (its scripting commands and
replies: a body, then "BatchCommand finished: OK" or "Failed!")."""
import json
import os
import re
import runpy
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine.errors import BadRequest
from plugin_bridge.client import Client
from plugin_bridge.daw import AudacityError, PipeTransport, audacity_command, audacity_separate_selection
from tests.conftest import REPO, read

STEMS = ["vocals", "accompaniment"]  # spleeter-2stems, the test engine's default model


class FakeAudacity:
    """A small Audacity project (wave tracks made of clips, track and time selection, the project rate)
    answering the scripting commands plugin_bridge.daw sends, as mod-script-pipe does.

    Export2 mixes the selected tracks over the time selection (frames round(t0 * rate) to
    round(t1 * rate)) to NumChannels (stereo to mono: the mean) and writes a float WAV; Import2 adds the
    file as a new track named after it with one clip at 0 s, selects only it and collapses the time
    selection to its start (Audacity's SelectNone); SetTrack and SetClip apply to the selected tracks.
    ``selection_info=False`` is an older Audacity without ``GetInfo: Type=Selection``.
    """

    def __init__(self, rate: int, *, selection_info: bool = True):
        self.rate = rate
        self.selection_info = selection_info
        self.tracks: list[dict] = []
        self.t0 = self.t1 = 0.0
        self.commands: list[str] = []
        self.exports: list[np.ndarray] = []

    def add_track(self, name: str, audio: np.ndarray, start_s: float = 0.0, selected: bool = True) -> None:
        self.tracks.append({"name": name, "channels": audio.shape[0], "clips": [[start_s, audio]],
                            "selected": selected})

    def send(self, command: str) -> str:
        self.commands.append(command)
        name, _, rest = command.partition(":")
        params = {m[0]: m[3] if m[2] else m[4] for m in re.findall(r'(\w+)=(("([^"]*)")|(\S+))', rest)}
        handler = getattr(self, f"do_{name.strip()}", None)
        if handler is None:
            return f"Your batch command of {name.strip()} was not recognized.\nBatchCommand finished: Failed!\n"
        try:
            body = handler(**params)
        except ValueError as e:
            return f"{e}\nBatchCommand finished: Failed!\n"
        return (f"{body}\n" if body else "") + "BatchCommand finished: OK\n"

    # the commands
    def do_Message(self, Text=""):
        return Text

    def do_GetInfo(self, Type="Commands", Format="JSON"):
        assert Format == "JSON"
        if Type == "Selection" and self.selection_info:
            return json.dumps({"Start": self.t0, "End": self.t1})
        if Type == "Tracks":
            return json.dumps([{"name": t["name"], "focused": 0, "selected": int(t["selected"]), "kind": "wave",
                                "start": min(c[0] for c in t["clips"]),
                                "end": max(c[0] + c[1].shape[1] / self.rate for c in t["clips"]),
                                "pan": 0, "gain": 1, "channels": t["channels"], "solo": 0, "mute": 0}
                               for t in self.tracks], indent=1)
        raise ValueError(f"Invalid value for Type: {Type}")

    def do_SelectTime(self, Start, End, RelativeTo="ProjectStart"):
        assert RelativeTo == "ProjectStart"
        self.t0, self.t1 = float(Start), float(End)

    def do_SelectTracks(self, Track, TrackCount=1, Mode="Set"):
        assert Mode == "Set"
        first = int(float(Track))
        for i, t in enumerate(self.tracks):
            t["selected"] = first <= i < first + int(float(TrackCount))

    def timeline(self, track: dict, a: int, b: int) -> np.ndarray:
        out = np.zeros((track["channels"], b - a), np.float32)
        for start_s, audio in track["clips"]:
            c = round(start_s * self.rate)
            lo, hi = max(a, c), min(b, c + audio.shape[1])
            if hi > lo:
                out[:, lo - a:hi - a] += audio[:, lo - c:hi - c]
        return out

    def do_Export2(self, Filename, NumChannels="1"):
        channels = int(NumChannels)
        a, b = round(self.t0 * self.rate), round(self.t1 * self.rate)
        mix = np.zeros((channels, b - a), np.float32)
        for t in self.tracks:
            if t["selected"]:
                x = self.timeline(t, a, b)
                mix += x.mean(axis=0, keepdims=True) if channels == 1 else np.broadcast_to(x, (2, b - a))
        sf.write(Filename, mix.T, self.rate, subtype="FLOAT")
        self.exports.append(mix)
        return f"Exported to WAV format: {Filename}"

    def do_Import2(self, Filename):
        audio, rate = sf.read(Filename, dtype="float32", always_2d=True)
        assert rate == self.rate
        for t in self.tracks:
            t["selected"] = False
        self.t1 = self.t0
        self.add_track(Path(Filename).stem, np.ascontiguousarray(audio.T), 0.0, selected=True)

    def do_SetTrack(self, Name):
        for t in self.tracks:
            if t["selected"]:
                t["name"] = Name

    def do_SetClip(self, At, Start):
        for t in self.tracks:
            if t["selected"]:
                for clip in t["clips"]:
                    if clip[0] <= float(At) <= clip[0] + clip[1].shape[1] / self.rate:
                        clip[0] = float(Start)


@pytest.fixture(scope="module")
def client(engine_endpoint):
    with Client(engine_endpoint, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def song(eval_dir):
    """6.8 s of a real song (the whole dev excerpt), float32 [2, frames], 44.1 kHz."""
    return read(eval_dir / "music-delta-80s-rock" / "mixture.wav")


def new_tracks(fake: FakeAudacity, n: int) -> list[dict]:
    return fake.tracks[-n:]


def check_imported(fake: FakeAudacity, result, reference, t0: float, frames: int, channels: int) -> None:
    stems = new_tracks(fake, len(STEMS))
    assert [t["name"] for t in stems] == result.tracks
    total = 0
    for stem, track in zip(STEMS, stems):
        ((start, audio),) = track["clips"]
        assert start == t0
        assert audio.shape == (channels, frames) == reference[stem].shape
        np.testing.assert_allclose(audio, reference[stem], atol=1e-5, rtol=0)
        total = total + audio
    exported = fake.exports[-1]
    assert np.sum((total - exported) ** 2) / np.sum(exported ** 2) < 1e-2  # the stems add up to the mix


def test_stereo_selection_becomes_aligned_stem_tracks(client, song, tmp_path):
    mix, sr = song
    fake = FakeAudacity(sr)
    fake.add_track("Band", mix)
    fake.add_track("Click", 0.1 * mix[:1], selected=False)
    fake.t0, fake.t1 = 1.5, 4.5

    result = audacity_separate_selection(fake, client, tmp_path / "work")

    exports = [c for c in fake.commands if c.startswith("Export2:")]
    assert exports == [f'Export2: Filename="{exports[0].split(chr(34))[1]}" NumChannels=2']
    imports = [c for c in fake.commands if c.startswith("Import2:")]
    assert imports == [f'Import2: Filename="{result.stems[s]}"' for s in STEMS]
    assert [c.split(":")[0] for c in fake.commands] == [
        "GetInfo", "GetInfo", "Export2", *["Import2", "SetTrack", "SetClip"] * 2, "SelectTracks", "SelectTime"]
    assert fake.commands[0] == "GetInfo: Type=Selection Format=JSON"
    assert all(c.endswith(" Start=1.5") for c in fake.commands if c.startswith("SetClip:"))

    exported = fake.exports[0]
    np.testing.assert_array_equal(exported, mix[:, round(1.5 * sr):round(4.5 * sr)])
    check_imported(fake, result, client.separate(exported, sr), 1.5, round(3.0 * sr), 2)
    assert result.tracks == ["Band - vocals", "Band - accompaniment"]
    assert [p.name for p in result.stems.values()] == ["Band-vocals.wav", "Band-accompaniment.wav"]
    # the new tracks are selected, over the original time range
    assert [t["selected"] for t in fake.tracks] == [False, False, True, True]
    assert (fake.t0, fake.t1) == (1.5, 4.5)


def test_mono_selection_is_exported_mono(client, song, tmp_path):
    mix, sr = song
    fake = FakeAudacity(sr)
    fake.add_track("Voice", mix[1:], start_s=0.5)
    fake.t0, fake.t1 = 2.0, 3.25
    result = audacity_separate_selection(fake, client, tmp_path / "work", name="take 3")
    assert result.channels == 1 and any(c.endswith("NumChannels=1") for c in fake.commands)
    exported = fake.exports[0]
    np.testing.assert_array_equal(exported, mix[1:, round(1.5 * sr):round(2.75 * sr)])
    check_imported(fake, result, client.separate(exported, sr), 2.0, round(1.25 * sr), 1)
    assert result.tracks == ["take 3 - vocals", "take 3 - accompaniment"]


def test_older_audacity_needs_the_selection_given(client, song, tmp_path):
    mix, sr = song
    fake = FakeAudacity(sr, selection_info=False)
    fake.add_track("Band", mix)
    with pytest.raises(AudacityError, match="give the selection's start and end"):
        audacity_separate_selection(fake, client, tmp_path / "work")
    result = audacity_separate_selection(fake, client, tmp_path / "work", start_s=0.75, end_s=1.75)
    assert fake.commands[1] == "SelectTime: Start=0.75 End=1.75 RelativeTo=ProjectStart"
    assert not any(c.startswith("GetInfo: Type=Selection") for c in fake.commands[1:])
    check_imported(fake, result, client.separate(fake.exports[0], sr), 0.75, sr, 2)


def test_nothing_to_separate_is_one_clear_error(client, song, tmp_path):
    mix, sr = song
    fake = FakeAudacity(sr)
    fake.add_track("Band", mix, selected=False)
    fake.t0, fake.t1 = 1.0, 2.0
    with pytest.raises(BadRequest, match="no audio track is selected"):
        audacity_separate_selection(fake, client, tmp_path)
    fake.tracks[0]["selected"] = True
    fake.t1 = 1.0
    with pytest.raises(BadRequest, match="nothing is selected in time"):
        audacity_separate_selection(fake, client, tmp_path)
    assert not any(c.startswith(("Export2", "Import2")) for c in fake.commands)


def test_failed_command_raises_with_audacity_message():
    fake = FakeAudacity(44100)
    with pytest.raises(AudacityError, match="Frobnicate: Your batch command of Frobnicate was not recognized"):
        audacity_command(fake, "Frobnicate: X=1")
    assert audacity_command(fake, "Message: Text=hi") == "hi"


# -- the real named pipes, served by a thread as mod-script-pipe serves them -------------------------

class PipeServer(threading.Thread):
    """mod-script-pipe's side on POSIX: opens the command FIFO for reading, then the reply FIFO for
    writing, answers each command line with the reply and an empty line; ends when the client closes."""

    def __init__(self, host, to_path: Path, from_path: Path):
        super().__init__(daemon=True)
        self.host, self.to_path, self.from_path = host, to_path, from_path
        self.error = None

    def run(self):
        try:
            with open(self.to_path, "r") as commands, open(self.from_path, "w") as replies:
                for line in commands:
                    replies.write(self.host.send(line.rstrip("\n")) + "\n")
                    replies.flush()
        except Exception as e:  # reported by the test
            self.error = e


@pytest.fixture
def pipes(tmp_path):
    to_path, from_path = tmp_path / "to", tmp_path / "from"
    os.mkfifo(to_path)
    os.mkfifo(from_path)
    return to_path, from_path


def serve(host, pipes) -> PipeServer:
    server = PipeServer(host, *pipes)
    server.start()
    time.sleep(0.2)  # let it block in open(), as Audacity waits for a client
    return server


def test_pipe_transport_talks_to_mod_script_pipe(pipes):
    fake = FakeAudacity(44100)
    fake.t0, fake.t1 = 0.25, 0.5
    server = serve(fake, pipes)
    with PipeTransport(*map(str, pipes), timeout_s=10) as pipe:
        assert pipe.send("Message: Text=hello") == "hello\nBatchCommand finished: OK\n"
        assert json.loads(audacity_command(pipe, "GetInfo: Type=Selection Format=JSON")) == {"Start": 0.25, "End": 0.5}
        with pytest.raises(AudacityError, match="not recognized"):
            audacity_command(pipe, "Nope:")
        assert audacity_command(pipe, "GetInfo: Type=Tracks Format=JSON") == "[]"
    server.join(5)
    assert not server.is_alive() and server.error is None


def test_pipe_transport_without_audacity_is_one_clear_error(tmp_path, pipes):
    with pytest.raises(AudacityError, match="mod-script-pipe"):
        PipeTransport(str(tmp_path / "none.to"), str(tmp_path / "none.from")).send("Message:")
    with pytest.raises(AudacityError, match="is Audacity running"):  # FIFOs left behind, nobody reading
        PipeTransport(*map(str, pipes)).send("Message:")


def test_script_end_to_end_through_the_pipes(engine_endpoint, song, pipes, tmp_path, capsys):
    mix, sr = song
    fake = FakeAudacity(sr)
    fake.add_track("Band", mix)
    fake.t0, fake.t1 = 3.0, 4.0
    server = serve(fake, pipes)
    main = runpy.run_path(str(REPO / "install" / "daw" / "audacity_unbake.py"), run_name="audacity_unbake")["main"]
    code = main(["--endpoint", engine_endpoint, "--work-dir", str(tmp_path / "work"),
                 "--pipe-to", str(pipes[0]), "--pipe-from", str(pipes[1])])
    out = capsys.readouterr()
    assert code == 0, out.err
    server.join(5)
    assert server.error is None
    assert "-> 2 stem tracks" in out.out and "Band - vocals" in out.out
    with Client(engine_endpoint, timeout_s=60) as client:
        check_imported(fake, type("R", (), {"tracks": ["Band - vocals", "Band - accompaniment"]}),
                       client.separate(fake.exports[0], sr), 3.0, sr, 2)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["Band-accompaniment.wav", "Band-vocals.wav"]


def test_script_without_audacity_exits_1_with_one_line(tmp_path, capsys):
    main = runpy.run_path(str(REPO / "install" / "daw" / "audacity_unbake.py"), run_name="audacity_unbake")["main"]
    code = main(["--pipe-to", str(tmp_path / "to"), "--pipe-from", str(tmp_path / "from"),
                 "--endpoint", f"ipc://{tmp_path}/nobody.sock"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("unbake: ") and err.count("\n") == 1
