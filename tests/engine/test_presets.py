"""engine.presets: parsing and validation (errors name file and key), resolution, installed;
`unbake presets`; presets through Service.open and `separate --in-process` (toy models)."""
import json

import numpy as np
import pytest

from engine import presets
from engine.errors import BadRequest
from plugin_bridge import cli

SHIPPED = ["4stem", "6stem", "acapella", "best-available", "default", "fast", "karaoke", "vocals-hq"]


def write(tmp_path, name, text):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(presets.ENV_DIRS, str(tmp_path))
    return tmp_path


def test_every_shipped_preset_parses():
    found = {p.name: p for p in presets.list_presets()}
    assert sorted(found) == SHIPPED
    assert found["vocals-hq"].algorithm == "avg" and len(found["vocals-hq"].members) == 2
    assert found["6stem"].models == ["htdemucs_6s"] and found["fast"].models == ["spleeter-2stems"]
    assert found["karaoke"].two_stems == "vocals" and found["karaoke"].residual is True


@pytest.mark.parametrize("text,key", [
    ('model = "htdemucs"\nbogus = 1', "bogus"),
    ('description = 3\nmodel = "htdemucs"', "description"),
    ('model = "htdemucs"\n[options]\nshifts = "two"', "shifts"),
    ('model = "htdemucs"\n[options]\nnope = 1', "nope"),
    ('model = "htdemucs"\nalgorithm = "avg"', "algorithm"),
    ('algorithm = "mean"\n[[members]]\nmodel = "a"\n[[members]]\nmodel = "b"', "algorithm"),
    ('algorithm = "avg"\n[[members]]\nmodel = "a"\nwieght = 2\n[[members]]\nmodel = "b"', "members[0].wieght"),
    ('algorithm = "avg"\n[[members]]\nmodel = "a"\n[[members]]\nmodel = "b"\nweights = { vocals = -1 }',
     "members[1].weights.vocals"),
    ('algorithm = "median"\n[[members]]\nmodel = "a"\n[[members]]\nmodel = "b"', "algorithm"),
    ('algorithm = "max_spec"\nn_fft = 1000\nhop = 300\n[[members]]\nmodel = "a"\n[[members]]\nmodel = "b"', "hop"),
    ('algorithm = "avg"\n[[members]]\nmodel = "a"', "members"),
    ('candidates = []', "candidates"),
    ('candidates = ["fast"]\n[candidate_options.4stem]\nshifts = 1', "candidate_options.4stem"),
    ('model = "htdemucs"\nresidual = 3', "residual"),
    ('description = "nothing to run"', "model"),
    ('model = "htdemucs"\nmembers = []', "model"),
    ('model = [', "TOML"),
])
def test_validation_errors_name_file_and_key(user_dir, text, key):
    path = write(user_dir, "broken", text)
    with pytest.raises(BadRequest) as e:
        presets.load_preset("broken")
    msg = str(e.value)
    assert str(path) in msg and key in msg and "\n" not in msg


def test_a_preset_may_not_take_a_catalog_name(user_dir):
    write(user_dir, "htdemucs", 'model = "spleeter-2stems"')
    assert not presets.is_preset("htdemucs")  # the model wins
    with pytest.raises(BadRequest, match="htdemucs.toml: name"):
        presets.parse_preset('model = "x"', "htdemucs", str(user_dir / "htdemucs.toml"))


def test_resolve_precedence_and_candidates(user_dir, monkeypatch):
    write(user_dir, "ens", 'algorithm = "avg"\ntwo_stems = "vocals"\n[options]\nshifts = 2\noverlap = 0.5\n'
                           '[[members]]\nmodel = "m1"\n[[members]]\nmodel = "m2"\noptions = { shifts = 3 }')
    write(user_dir, "pick", 'candidates = ["ens", "solo"]\n[candidate_options.solo]\nsegment_s = 4.0')
    write(user_dir, "solo", 'model = "m3"\nresidual = true')
    plan = presets.resolve("ens", {"overlap": 0.1, "segment_s": None})
    assert plan.ensemble and plan.preset == "ens"
    assert plan.options == {"two_stems": "vocals", "shifts": 2, "overlap": 0.5} and plan.caller == {"overlap": 0.1}
    assert plan.session_options["overlap"] == 0.1
    installed = set()
    monkeypatch.setattr(presets, "_model_installed", lambda m, repo=None: m in installed)
    assert presets.resolve("pick").preset == "solo"  # nothing installed: the last candidate
    assert presets.resolve("pick").options == {"residual": True, "segment_s": 4.0}
    installed |= {"m1"}
    assert presets.resolve("pick").preset == "solo" and not presets.installed("pick")
    installed |= {"m2"}
    assert presets.resolve("pick").preset == "ens" and presets.installed("pick")
    bare = presets.resolve("htdemucs", {"shifts": 1})
    assert bare.preset is None and bare.members[0].model == "htdemucs" and not bare.ensemble


def test_best_available_is_spleeter_when_only_spleeter_is_installed(monkeypatch):
    monkeypatch.setattr(presets, "_model_installed", lambda m, repo=None: m == "spleeter-2stems")
    plan = presets.resolve("best-available")
    assert plan.preset == "fast" and [m.model for m in plan.members] == ["spleeter-2stems"]
    assert presets.installed("best-available") and not presets.installed("vocals-hq")


def test_unbake_presets_lists_every_shipped_preset(capsys, tmp_path):
    assert cli.main(["presets", "--repo", str(tmp_path)]) == 0  # an empty repo: nothing installed
    out = capsys.readouterr().out
    for name in SHIPPED:
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert "installed no" in line
    assert "unbake fetch 4stem` downloads htdemucs (84 MB)" in out
    assert cli.main(["presets", "--json", "--repo", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["name"] for r in rows) == SHIPPED and not any(r["installed"] for r in rows)


# -- presets through the real entry points, with toy models in place of the loader ---------------

@pytest.fixture
def toy_loader(monkeypatch, user_dir):
    from engine import registry
    from tests.engine.test_ensemble import A, B
    toys = {"toy-a": A, "toy-b": B}

    def load_model(name, repo=None, device="cpu"):
        return toys[name]
    monkeypatch.setattr(registry, "load_model", load_model)
    write(user_dir, "toys", 'description = "two toys"\nalgorithm = "max_spec"\nn_fft = 256\nhop = 64\n'
                            'residual = true\n[[members]]\nmodel = "toy-a"\nweight = 2\n[[members]]\nmodel = "toy-b"')
    return toys


def test_service_open_builds_an_ensemble(toy_loader):
    from engine.ensemble import EnsembleTrack, ResidualTrack
    from engine.service import Service
    service = Service(lambda *a: None, device="cpu")
    try:
        ready = service.open("s1", "toys", 16000, 2, {"shifts": 1})
        assert ready["model"] == "toys" and ready["stems"] == ["vocals", "accompaniment", "drums"]
        track = service.scheduler.sessions["s1"].track
        assert isinstance(track, ResidualTrack) and isinstance(track.track, EnsembleTrack)
        assert ready["latency_samples"] == max(t.latency_samples for t in track.track.tracks) + 255
    finally:
        service.stop()


def test_separate_in_process_with_a_preset_and_residual(toy_loader, tmp_path):
    import soundfile as sf
    mix = (0.3 * np.random.default_rng(0).standard_normal((4000, 2))).astype(np.float32)
    src = tmp_path / "song.wav"
    sf.write(src, mix, 16000, subtype="FLOAT")
    out = tmp_path / "out"
    assert cli.main(["separate", "--in-process", "-q", "-n", "toys", "--float32", "-o", str(out), str(src)]) == 0
    stems = {p.stem: sf.read(p, dtype="float32")[0] for p in (out / "toys" / "song").glob("*.wav")}
    assert sorted(stems) == ["accompaniment", "drums", "vocals"]
    assert np.max(np.abs(sum(stems.values()) - mix)) < 1e-5
