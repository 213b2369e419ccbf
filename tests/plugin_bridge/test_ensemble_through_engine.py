"""A separation preset and an ensemble through the real daemon: one-shot, streaming and StemChain
all give the in-process ensemble's output; the stream's latency is the largest member's."""
import numpy as np
import pytest

from engine import presets
from engine.ensemble import open_track
from plugin_bridge import StemChain
from plugin_bridge.client import Client
from tests.conftest import read
from tests.engine.engine_proc import EngineProcess

# Two members with the one model installed here, on different grids and options: their outputs
# differ, so the weighted average is a real combination.
DUO = """
description = "spleeter on two grids, weighted"
algorithm = "avg"
[[members]]
model = "spleeter-2stems"
weight = 3.0
options = { segment_s = 2.0 }
[[members]]
model = "spleeter-2stems"
weight = 1.0
options = { segment_s = 1.0, full_band = true }
"""


@pytest.fixture(scope="module")
def engine(spleeter_repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ensemble-engine")
    (tmp / "presets").mkdir()
    (tmp / "presets" / "spleeter-duo.toml").write_text(DUO)
    env = {"UNBAKE_REPO": str(spleeter_repo), "UNBAKE_SEPARATION_PRESETS": str(tmp / "presets")}
    with EngineProcess(f"ipc://{tmp}/e.sock", env=env, log=tmp / "daemon.log") as proc:
        yield proc, tmp / "presets"


@pytest.fixture(scope="module")
def excerpt(eval_dir):
    mix, sr = read(eval_dir / "music-delta-80s-rock" / "mixture.wav")
    return mix[:, :4 * sr].copy(), sr


def in_process(spleeter, preset_dir, monkeypatch, mix, sr, name):
    monkeypatch.setenv("UNBAKE_SEPARATION_PRESETS", str(preset_dir))
    plan = presets.resolve(name, {}, None)
    track = open_track(plan, {"spleeter-2stems": spleeter}, sr, mix.shape[0])
    parts = [track.push(mix), track.close()]
    return {s: np.concatenate([p[s] for p in parts], axis=-1) for s in track.stems}


def test_ensemble_one_shot_stream_and_stemchain_equal_in_process(engine, excerpt, spleeter, monkeypatch):
    proc, preset_dir = engine
    mix, sr = excerpt
    want = in_process(spleeter, preset_dir, monkeypatch, mix, sr, "spleeter-duo")
    with Client(proc.endpoint, timeout_s=60) as client:
        got = client.separate(mix, sr, "spleeter-duo")
        assert got.model == "spleeter-duo" and list(got) == ["vocals", "accompaniment"]
        for s in got:
            assert float(np.abs(got[s] - want[s]).max()) <= 1e-5, s

        with client.stream("spleeter-duo", sr, 2) as stream:
            latency = stream.latency_samples
            members = [client.stream("spleeter-2stems", sr, 2, segment_s=seg) for seg in (2.0, 1.0)]
            member_latencies = [m.latency_samples for m in members]
            for m in members:
                m.cancel()
            assert latency == max(member_latencies) and member_latencies[0] != member_latencies[1]
            rng = np.random.default_rng(5)
            outs, pos = [], 0
            while pos < mix.shape[1]:
                n = int(rng.integers(1, 20000))
                outs.append(stream.process(mix[:, pos:pos + n]))
                pos += n
            outs.append(stream.flush())
        for s in want:
            out = np.concatenate([o[s] for o in outs], axis=1)
            assert float(np.abs(out[:, :latency]).max()) == 0.0
            assert float(np.abs(out[:, latency:] - want[s]).max()) <= 1e-5, s

        remix = StemChain({"vocals": None}, "spleeter-duo", client=client)(mix, sr)
        assert float(np.abs(remix - want["accompaniment"]).max()) <= 1e-5


def test_best_available_through_the_engine_is_spleeter_with_its_quality_options(engine, excerpt, spleeter):
    proc, _ = engine
    mix, sr = excerpt
    from engine.sessions import separate_array
    want = separate_array(spleeter, mix, sr, full_band=True, mask_exponent=1.0, wiener_iterations=1,
                          tta=["swap"])
    with Client(proc.endpoint, timeout_s=60) as client:
        got = client.separate(mix, sr, "best-available")
    for s in want:
        assert float(np.abs(got[s] - want[s]).max()) <= 1e-5, s
