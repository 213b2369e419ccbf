"""The Audacity script (install/daw/audacity_unbake.py, run as a user runs it) against the real Audacity
(Debian's package under Xvfb, see audacity_host.py) and the real engine daemon.

What proves a result is in Audacity: the new stem tracks are exported back out of Audacity (float WAV)
over a range that starts half a second before the selection: that half second is digital silence and
the stem follows sample for sample, equal to ``Client.separate`` of the float selection within 1e-5.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from plugin_bridge.audacity import WAV_FORMAT_PREF, AudacityError, PipeTransport, audacity_command, audacity_selection
from plugin_bridge.audacity_pipe import read_reply_lines, take_reply
from plugin_bridge.client import Client
from tests.conftest import EVAL, REPO, read
from tests.plugin_bridge import audacity_host

SCRIPT = REPO / "install" / "daw" / "audacity_unbake.py"
STEMS = ["vocals", "accompaniment"]  # spleeter-2stems, the test engine's default model
SR = 44100
USER_WAV_FORMAT = "4"                # the "user's" WAV export format: 24-bit PCM
QUICK_S = 5.0                        # a problem must be reported within this many seconds


@pytest.fixture(scope="session")
def audacity(tmp_path_factory):
    why = audacity_host.missing()
    if why:
        pytest.skip(f"the real Audacity {why}")
    audacity_host.kill_stale()
    host = audacity_host.AudacityHost(tmp_path_factory.mktemp("audacity"))
    try:
        host.start()
    except RuntimeError as e:
        host.stop()
        pytest.fail(str(e))
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture
def aud(audacity):
    """The session's Audacity with an empty project, the user's WAV format preference set to 24-bit;
    afterwards: no dialog may have opened, and the preference is still the user's."""
    audacity.reset()
    audacity.command(f"SetPreference: Name={WAV_FORMAT_PREF} Value={USER_WAV_FORMAT}")
    yield audacity
    dialogs = audacity.dialogs()
    audacity.close_dialogs()
    assert dialogs == [], f"Audacity opened a dialog: {dialogs}"
    assert audacity.command(f"GetPreference: Name={WAV_FORMAT_PREF}") == USER_WAV_FORMAT


@pytest.fixture(scope="module")
def client(engine_endpoint):
    with Client(engine_endpoint, timeout_s=60) as c:
        yield c


def song_path(name: str):
    path = EVAL / name / "mixture.wav"
    if not path.is_file():
        pytest.skip(f"needs the real songs in {EVAL} (../shared beside the repository)")
    return path


def run_script(engine_endpoint, work_dir, *args, host=None, timeout_s: float = 120.0):
    """Run the script as a user does; returns (exit status, stdout, stderr, seconds). ``host``: the test's
    Audacity, whose own end of the pipes is closed meanwhile (one client at a time, as for a user)."""
    if host is not None:
        host.release()
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(SCRIPT), "--endpoint", engine_endpoint, "--work-dir",
                               str(work_dir), *args], capture_output=True, text=True, timeout=timeout_s, cwd="/")
        return done.returncode, done.stdout, done.stderr, time.monotonic() - started
    finally:
        if host is not None:
            host.reopen()


def export(aud, tmp_path, track: int, t0: float, t1: float, channels: int) -> np.ndarray:
    """Track ``track`` over [t0, t1) exported out of Audacity as float WAV: float32 [channels, frames]."""
    path = tmp_path / f"back-{track}-{time.monotonic_ns()}.wav"
    aud.command(f"SetPreference: Name={WAV_FORMAT_PREF} Value=6")
    try:
        aud.command(f"SelectTracks: Track={track} TrackCount=1 Mode=Set")
        aud.command(f"SelectTime: Start={t0!r} End={t1!r} RelativeTo=ProjectStart")
        aud.command(f'Export2: Filename="{path}" NumChannels={channels}')
    finally:
        aud.command(f"SetPreference: Name={WAV_FORMAT_PREF} Value={USER_WAV_FORMAT}")
    assert sf.info(str(path)).subtype == "FLOAT"
    return read(path)[0]


def check_stem_tracks(aud, tmp_path, first: int, name: str, t0: float, reference, channels: int) -> None:
    """Tracks first, first + 1, ... are "<name> - <stem>", each the reference stem starting at t0 to the sample."""
    tracks = aud.json("GetInfo: Type=Tracks Format=JSON")
    assert [t["name"] for t in tracks[first:]] == [f"{name} - {s}" for s in STEMS]
    assert all(t["channels"] == channels and t["selected"] for t in tracks[first:])
    assert not any(t["selected"] for t in tracks[:first])
    clips = aud.json("GetInfo: Type=Clips Format=JSON")
    for k, stem in enumerate(STEMS):
        (clip,) = [c for c in clips if c["track"] == first + k]
        assert abs(clip["start"] - t0) <= 1e-5 * max(1.0, t0)  # GetInfo prints 6 significant digits
        ref = reference[stem]
        pad = SR // 2
        back = export(aud, tmp_path, first + k, t0 - pad / SR, t0 + ref.shape[1] / SR, channels)
        assert back.shape == (channels, pad + ref.shape[1])
        assert np.all(back[:, :pad] == 0.0), "the stem starts before the selection start"
        assert np.abs(back[:, pad:pad + 8]).max() > 0 or np.abs(ref[:, :8]).max() == 0
        np.testing.assert_allclose(back[:, pad:], ref, atol=1e-5, rtol=0)


def one_line_error(code, out, err, seconds, *words):
    assert code == 1, (out, err)
    assert err.startswith("unbake: ") and err.count("\n") == 1, err
    assert "selection.wav" not in err and "unbake-audacity-" not in err, err  # no temp file the user never saw
    assert seconds < QUICK_S, f"took {seconds:.1f} s: {err}"
    for word in words:
        assert word in err, err


# -- the real Audacity ----------------------------------------------------------------------------

def test_six_seconds_of_a_song_read_from_audacitys_selection(aud, client, engine_endpoint, tmp_path):
    """No --start/--end: 3.2.4 has no GetInfo: Type=Selection; the script reads it anyway, exactly."""
    path = song_path("cristina-vane-so-easy")
    aud.command(f'Import2: Filename="{path}"')
    aud.command("SetClip: At=1 Start=100")  # the song plays from 100 s in the project
    start = 452171                          # 10.2533... s into the song
    t0, t1 = (100 * SR + start) / SR, (100 * SR + start + 6 * SR) / SR  # GetInfo prints 110.253: 14 samples off
    aud.command("SelectTracks: Track=0 TrackCount=1 Mode=Set")
    aud.command(f"SelectTime: Start={t0!r} End={t1!r} RelativeTo=ProjectStart")

    code, out, err, _ = run_script(engine_endpoint, tmp_path / "work", host=aud)
    assert code == 0, err
    assert "6.000 s from 110.253 s (2 channel(s)) -> 2 stem tracks" in out

    mix, sr = read(path)
    selection = np.ascontiguousarray(mix[:, start:start + 6 * SR])
    reference = client.separate(selection, sr)
    check_stem_tracks(aud, tmp_path, 1, "mixture", t0, reference, 2)
    # the song's own track is as it was (its clip moved by a script, without an undo point: not undone)
    assert [c["start"] for c in aud.json("GetInfo: Type=Clips Format=JSON") if c["track"] == 0] == [100]
    assert aud.json("GetInfo: Type=Labels Format=JSON") == []
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["mixture-accompaniment.wav", "mixture-vocals.wav"]
    for stem in STEMS:  # the files the script imported are the same stems
        np.testing.assert_allclose(read(tmp_path / "work" / f"mixture-{stem}.wav")[0], reference[stem], atol=1e-6, rtol=0)


def test_selection_is_read_to_the_sample_and_left_as_it_was(aud):
    song = song_path("music-delta-80s-rock")
    aud.command(f'Import2: Filename="{song}"')
    aud.command(f'Import2: Filename="{song}"')
    aud.command("SelectTracks: Track=1 TrackCount=1 Mode=Set")
    for t0, t1 in [(123.4567891234, 130.1234567), (0.0, 0.5), (2.5, 2.5), (250.12345678, 612.98765432)]:
        aud.command(f"SelectTime: Start={t0!r} End={t1!r} RelativeTo=ProjectStart")
        got = audacity_selection(aud.pipe, tracks=aud.json("GetInfo: Type=Tracks Format=JSON"))
        assert abs(got[0] - t0) < 1e-6 and abs(got[1] - t1) < 1e-6, (got, t0, t1)
    tracks = aud.json("GetInfo: Type=Tracks Format=JSON")
    assert [t["selected"] for t in tracks] == [0, 1]  # no label track left, the track selection as it was
    assert aud.json("GetInfo: Type=Labels Format=JSON") == []


def test_stereo_and_mono_track_selected(aud, client, engine_endpoint, tmp_path):
    song = song_path("music-delta-80s-rock")
    mix, sr = read(song)
    mono = tmp_path / "mono.wav"
    sf.write(str(mono), (0.5 * mix[0]).astype(np.float32), sr, subtype="FLOAT")
    aud.command(f'Import2: Filename="{song}"')
    aud.command(f'Import2: Filename="{mono}"')
    aud.command("SelectTracks: Track=1 TrackCount=1 Mode=Set")
    aud.command("SetClip: At=1 Start=1")  # the mono track starts at 1 s
    aud.command("SelectTracks: Track=0 TrackCount=2 Mode=Set")

    code, out, err, _ = run_script(engine_endpoint, tmp_path / "work", "--start", "0.5", "--end", "3.5", host=aud)
    assert code == 0, err
    assert "3.000 s from 0.500 s (2 channel(s))" in out

    expected = mix[:, SR // 2:SR // 2 + 3 * SR].copy()  # Audacity's mix: the mono track on both sides
    expected[:, SR // 2:] += 0.5 * mix[0, :expected.shape[1] - SR // 2]
    reference = client.separate(expected, sr)
    check_stem_tracks(aud, tmp_path, 2, "selection", 0.5, reference, 2)


def test_selection_running_past_the_end_is_separated_up_to_the_end(aud, client, engine_endpoint, tmp_path):
    song = song_path("music-delta-80s-rock")
    mix, sr = read(song)
    aud.command(f'Import2: Filename="{song}"')
    aud.command("SelectTracks: Track=0 TrackCount=1 Mode=Set")
    code, out, err, _ = run_script(engine_endpoint, tmp_path / "work", "--start", "5", "--end", "8", host=aud)
    assert code == 0, err
    n = mix.shape[1] - 5 * SR
    assert f"{n / SR:.3f} s from 5.000 s (the selection runs to 8.000 s, past the end of the audio)" in out
    check_stem_tracks(aud, tmp_path, 1, "mixture", 5.0, client.separate(mix[:, 5 * SR:], sr), 2)
    for stem in STEMS:
        assert sf.info(str(tmp_path / "work" / f"mixture-{stem}.wav")).frames == n


@pytest.mark.parametrize("case", ["past the end", "no track selected", "nothing selected in time", "muted"])
def test_what_cannot_be_separated_is_one_line_in_seconds(aud, engine_endpoint, tmp_path, case):
    song = song_path("music-delta-80s-rock")
    aud.command(f'Import2: Filename="{song}"')
    aud.command("SelectTracks: Track=0 TrackCount=1 Mode=Set")
    args, words = (), ()
    if case == "past the end":
        args, words = ("--start", "40", "--end", "46"), ("the selection 40.000-46.000 s lies past the end of the audio (6.800 s)",)
    elif case == "no track selected":
        aud.command("SelectTracks: Track=0 TrackCount=0 Mode=Set")
        aud.command("SelectTime: Start=1 End=2 RelativeTo=ProjectStart")
        words = ("no audio track is selected",)
    elif case == "nothing selected in time":
        aud.command("SelectTime: Start=3 End=3 RelativeTo=ProjectStart")
        words = ("nothing is selected in time (the cursor is at 3.000 s)",)
    else:
        aud.command("SetTrackAudio: Track=0 Mute=1")
        args, words = ("--start", "1", "--end", "2"), ("'mixture' are muted",)
    code, out, err, seconds = run_script(engine_endpoint, tmp_path / "work", *args, host=aud)
    one_line_error(code, out, err, seconds, *words)
    assert [t["name"] for t in aud.json("GetInfo: Type=Tracks Format=JSON")] == ["mixture"]
    assert aud.json("GetInfo: Type=Labels Format=JSON") == []
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_audacity_not_running_is_one_line_in_seconds(engine_endpoint, tmp_path):
    code, out, err, seconds = run_script(engine_endpoint, tmp_path / "work", "--pipe-to", str(tmp_path / "to"),
                                         "--pipe-from", str(tmp_path / "from"))
    one_line_error(code, out, err, seconds, "Audacity is not listening", "mod-script-pipe")
    os.mkfifo(tmp_path / "to")
    os.mkfifo(tmp_path / "from")  # the pipes an Audacity that quit leaves behind
    code, out, err, seconds = run_script(engine_endpoint, tmp_path / "work", "--pipe-to", str(tmp_path / "to"),
                                         "--pipe-from", str(tmp_path / "from"))
    one_line_error(code, out, err, seconds, "Audacity is not listening")


def test_a_dialog_in_audacity_is_reported_not_waited_for(aud):
    """3.2.4 opens a modal dialog for GetInfo: Type=Selection (which the script never sends): the
    transport gives up after its timeout with one line instead of waiting for someone to click."""
    started = time.monotonic()
    with pytest.raises(AudacityError, match="did not answer 'GetInfo' within 1 s: is a dialog open"):
        audacity_command(aud.pipe, "GetInfo: Type=Selection Format=JSON", timeout_s=1)
    assert time.monotonic() - started < 2
    assert aud.dialogs(), "expected 3.2.4's dialog"
    aud.close_dialogs()
    aud.resync(1)
    assert aud.command("Message: Text=again") == "again"


# -- reply reading (the Windows branch reads line by line; its pipes cannot run here) ---------------

REPLIES = ["\nBatchCommand finished: OK\n\n",                                # a command that prints nothing
           "\n[ \n  { \"name\":\"a\" } ]\nBatchCommand finished: OK\n\n",      # GetInfo, JSON
           "hi\nBatchCommand finished: OK\n\n",                              # Message
           "((2\n    ((1.5 2 \"\"))))\nBatchCommand finished: OK\n\n",        # GetInfo, LISP
           "\nBatchCommand finished: Failed!\n\n"]                          # byte for byte as 3.2.4 writes them
REAL_REPLIES = "".join(REPLIES)


def test_replies_as_real_audacity_writes_them():
    expected = ["BatchCommand finished: OK\n", "[ \n  { \"name\":\"a\" } ]\nBatchCommand finished: OK\n",
                "hi\nBatchCommand finished: OK\n", "((2\n    ((1.5 2 \"\"))))\nBatchCommand finished: OK\n",
                "BatchCommand finished: Failed!\n"]
    pending, got = REAL_REPLIES, []
    while (split := take_reply(pending)) is not None:
        reply, pending = split
        got.append(reply)
    assert got == expected and pending == ""
    for cut in range(len(REAL_REPLIES)):  # a reply read in two pieces is only taken once it is whole
        first = take_reply(REAL_REPLIES[:cut])
        assert first is None or first[0] == expected[0]
    import io
    stream = io.StringIO(REAL_REPLIES.replace("\n", "\r\n"))  # Windows: CRLF, read line by line
    assert [read_reply_lines(stream.readline) for _ in expected] == expected
    with pytest.raises(AudacityError, match="closed its reply pipe"):
        read_reply_lines(stream.readline)


def test_transport_reads_real_replies_through_fifos(tmp_path):
    """PipeTransport against FIFOs served as mod-script-pipe serves them, the replies byte for byte as
    3.2.4 wrote them (leading empty lines), written in small pieces."""
    import threading
    to_path, from_path = tmp_path / "to", tmp_path / "from"
    os.mkfifo(to_path)
    os.mkfifo(from_path)
    def serve():
        with open(to_path) as commands, open(from_path, "w") as out:
            for line, reply in zip(commands, REPLIES):
                for k in range(0, len(reply), 3):
                    out.write(reply[k:k + 3])
                    out.flush()
                    time.sleep(0.001)
    server = threading.Thread(target=serve, daemon=True)
    server.start()
    time.sleep(0.1)
    with PipeTransport(str(to_path), str(from_path), timeout_s=5) as pipe:
        assert audacity_command(pipe, "SelectTime: Start=0 End=1") == ""
        assert json.loads(audacity_command(pipe, "GetInfo: Type=Tracks")) == [{"name": "a"}]
        assert audacity_command(pipe, "Message: Text=hi") == "hi"
        assert audacity_command(pipe, "GetInfo: Type=Labels Format=LISP").startswith("((2")
        with pytest.raises(AudacityError, match="Nope: BatchCommand finished: Failed!"):
            audacity_command(pipe, "Nope:")
    server.join(5)
    assert not server.is_alive()
