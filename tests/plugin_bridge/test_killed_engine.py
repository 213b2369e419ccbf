"""An engine killed (SIGKILL) in the middle of a separation leaves nothing behind (issue 12, part of
item 15): not the stems' temporary files, and not the empty OUT/MODEL/TRACK folders made for them.

A real engine process of its own (not the session's), the real file job of `unbake separate`
(``plugin_bridge.files.separate_file_via``), the engine killed from the progress callback once the
first blocks of the song are in flight.
"""
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine.errors import EngineUnavailable
from engine.stemfiles import OutputFormat, stem_paths
from plugin_bridge.client import Client
from plugin_bridge.files import separate_file_via
from tests.engine.engine_proc import EngineProcess

MODEL = "spleeter-2stems"


def test_an_engine_killed_mid_separation_leaves_no_folder(eval_dir, spleeter_repo, tmp_path):
    mix, sr = sf.read(str(eval_dir / "music-delta-80s-rock" / "mixture.wav"), dtype="float32")
    song = tmp_path / "song.wav"
    sf.write(str(song), np.concatenate([mix] * 3), sr, subtype="PCM_16")  # 20.4 s: 11 blocks to send
    out = tmp_path / "out"
    out.mkdir()
    endpoint = f"ipc://{tmp_path}/engine.sock"
    engine = EngineProcess(endpoint, "--preload", MODEL, env={"UNBAKE_REPO": str(spleeter_repo)},
                           log=tmp_path / "engine.log")
    engine.start()
    killed = []

    def progress(done, total):
        if not killed:
            os.kill(engine.proc.pid, signal.SIGKILL)
            engine.proc.wait()
            killed.append(done)

    fmt = OutputFormat()
    try:
        with Client(endpoint, autostart=False, timeout_s=2, retries=0) as client:
            with pytest.raises(EngineUnavailable):
                separate_file_via(client, song, lambda model, stems: stem_paths(out, model, song, stems, fmt), fmt,
                                  model=MODEL, progress=progress)
    finally:
        engine.kill()
    assert killed == [2 * sr] and engine.proc.returncode == -signal.SIGKILL
    assert os.listdir(out) == []  # no MODEL/song folder, no temp file
