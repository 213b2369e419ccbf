"""A track's stems are committed all or none (issue 12, item 3).

A destination that is an existing folder is found before anything is written (one line, the older
stems beside it untouched, the next input separated). A folder that appears at a destination while
the track is being separated makes the rename of that stem fail after the others were renamed:
those are put back as they were (an older stem restored, byte for byte and inode, a new one removed).
Through the session's real engine: the real CLI, and ``separate_file_via`` for the race.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine.errors import OutputError
from engine.stemfiles import OutputFormat, stem_paths
from plugin_bridge.client import Client
from plugin_bridge.files import separate_file_via

MODEL = "spleeter-2stems"
OLD = b"an older vocals stem, kept until the new one is complete\n"


def unbake(*args):
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def song(eval_dir, tmp_path_factory) -> Path:
    """5 s of a real song, 16-bit stereo (written to a temp folder)."""
    data, sr = sf.read(str(eval_dir / "music-delta-80s-rock" / "mixture.wav"), dtype="float32", frames=5 * 44100)
    path = tmp_path_factory.mktemp("audio") / "song.wav"
    sf.write(str(path), data, sr, subtype="PCM_16")
    return path


def test_a_destination_that_is_a_folder_is_one_line_before_any_write(song, spleeter_repo, engine_endpoint,
                                                                      tmp_path, monkeypatch):
    monkeypatch.setenv("UNBAKE_ENDPOINT", engine_endpoint)
    other = tmp_path / "other.wav"
    sf.write(str(other), sf.read(str(song), frames=22050)[0], 44100, subtype="PCM_16")
    out = tmp_path / "out"
    track = out / MODEL / "song"
    (track / "accompaniment.wav").mkdir(parents=True)
    (track / "vocals.wav").write_bytes(OLD)
    inode = (track / "vocals.wav").stat().st_ino
    r = unbake("separate", "-n", MODEL, "-q", "-o", out, song, other)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"error: {song}: {track / 'accompaniment.wav'}: is a folder; a stem cannot replace it (nothing written "
        f"for this track)",
        "error: 1 of 2 file(s) failed"]
    assert (track / "vocals.wav").read_bytes() == OLD and (track / "vocals.wav").stat().st_ino == inode
    assert everything_under(out) == [MODEL, f"{MODEL}/other", f"{MODEL}/other/accompaniment.wav",
                                     f"{MODEL}/other/vocals.wav", f"{MODEL}/song", f"{MODEL}/song/accompaniment.wav",
                                     f"{MODEL}/song/vocals.wav"]
    assert sf.info(str(out / MODEL / "other" / "vocals.wav")).frames == 22050


def test_a_failed_rename_puts_back_the_stems_already_renamed(song, spleeter_repo, engine_endpoint, tmp_path):
    out = tmp_path / "out"
    fmt = OutputFormat()
    dests = stem_paths(out, MODEL, song, ["vocals", "accompaniment"], fmt)  # renamed in this order
    dests["vocals"].parent.mkdir(parents=True)
    dests["vocals"].write_bytes(OLD)
    inode = dests["vocals"].stat().st_ino

    def progress(done, total):  # a folder takes the accompaniment's name while the track is separated
        dests["accompaniment"].mkdir(exist_ok=True)

    with Client(engine_endpoint, autostart=False) as client:
        with pytest.raises(OutputError) as e:
            separate_file_via(client, song, dests, fmt, model=MODEL, progress=progress)
        assert str(e.value) == (f"{dests['accompaniment']}: is a folder; no stem of this track was written")
        # vocals.wav had been replaced by then: it is the older file again (its inode, its bytes)
        assert dests["vocals"].read_bytes() == OLD and dests["vocals"].stat().st_ino == inode
        assert everything_under(out) == [MODEL, f"{MODEL}/song", f"{MODEL}/song/accompaniment.wav",
                                         f"{MODEL}/song/vocals.wav"]  # no temp file, no file kept aside
        assert os.listdir(dests["accompaniment"]) == []

        # Once the folder is gone, both older files are replaced, and nothing is left beside them.
        dests["accompaniment"].rmdir()
        report, _ = separate_file_via(client, song, dests, fmt, model=MODEL)
    assert everything_under(out) == [MODEL, f"{MODEL}/song", f"{MODEL}/song/accompaniment.wav",
                                     f"{MODEL}/song/vocals.wav"]
    assert {s: sf.info(str(p)).frames for s, p in dests.items()} == {"vocals": 5 * 44100, "accompaniment": 5 * 44100}
    voc, _ = sf.read(str(dests["vocals"]), dtype="float32")
    assert np.abs(voc).max() > 0.01
