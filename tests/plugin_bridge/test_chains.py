"""Chain presets (plugin_bridge/chains.py): every shipped preset loads and maps to the expected
StemChain; every kind of mistake is one ChainError whose message names the file, the stem and the
key; random junk never raises anything else. No daemon here (a fake client stands in)."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pedalboard
import pytest
import soundfile as sf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.errors import BadRequest
from plugin_bridge import chains
from plugin_bridge.chains import CHAINS_DIR, ChainError, ChainPreset, list_chains, load_chain, parse_chain
from tests.conftest import REPO

SHIPPED = {"acapella", "drumless", "karaoke", "lofi-vocals", "vocal-up"}
TWO = ["vocals", "accompaniment"]
FOUR = ["drums", "bass", "other", "vocals"]


@pytest.fixture(autouse=True)
def _no_user_chains(monkeypatch):
    monkeypatch.delenv("UNBAKE_CHAINS", raising=False)


def write(tmp_path, text: str, name: str = "bad.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path) -> str:
    with pytest.raises(ChainError) as e:
        load_chain(path)
    assert e.value.code == "E_BAD_REQUEST" and isinstance(e.value, BadRequest)
    assert "\n" not in str(e.value)
    return str(e.value)


# -- the shipped presets ------------------------------------------------------------------------

def test_shipped_presets_all_load_with_their_sha256_and_documented_format():
    presets = {p.name: p for p in list_chains()}
    assert set(presets) >= SHIPPED
    for name in SHIPPED:
        p = presets[name]
        assert p.path == CHAINS_DIR / f"{name}.toml"
        assert p.sha256 == hashlib.sha256(p.path.read_bytes()).hexdigest()
        assert p.description and "\n" not in p.description
        assert p.path.read_text().startswith("# unbake chain preset")  # the format, in a comment
        assert load_chain(name) == p and load_chain(str(p.path)) == p
        json.dumps(p.to_dict())  # `unbake chains --json` can print it


def test_karaoke_mutes_vocals_on_any_model():
    p = load_chain("karaoke")
    assert p.mapping(TWO) == ({"vocals": None}, {})
    assert p.mapping(FOUR) == ({"vocals": None}, {})


def test_acapella_mutes_every_other_stem_of_whatever_model():
    p = load_chain("acapella")
    assert p.others_mode == "mute"
    assert p.mapping(TWO) == ({"accompaniment": None}, {})
    assert p.mapping(FOUR) == ({"drums": None, "bass": None, "other": None}, {})
    assert p.mapping(["vocals", "no_vocals"]) == ({"no_vocals": None}, {})  # --two-stems vocals


def test_vocal_up_and_drumless():
    assert load_chain("vocal-up").mapping(TWO) == ({}, {"vocals": 6.0})
    d = load_chain("drumless")
    assert (d.model, d.requires_stems) == ("htdemucs", ("drums",))
    assert d.mapping(FOUR) == ({"drums": None}, {})
    with pytest.raises(ChainError) as e:
        d.mapping(TWO, "spleeter-2stems")
    assert str(e.value) == (f"{d.path}: requires_stems: model spleeter-2stems has no stem 'drums' (its stems: "
                            f"vocals, accompaniment); the chain is made for htdemucs")


def test_lofi_vocals_boards_are_fresh_pedalboards_in_order():
    p = load_chain("lofi-vocals")
    chains_, gains = p.mapping(FOUR)
    assert gains == {"vocals": -1.0, "drums": -3.0, "bass": -3.0, "other": -3.0}
    board = chains_["vocals"]
    assert [type(x).__name__ for x in board] == ["HighpassFilter", "LowpassFilter", "Bitcrush", "Reverb"]
    assert board[3].room_size == pytest.approx(0.4) and board[2].bit_depth == 8
    again = p.boards()["vocals"]
    assert again is not board and all(a is not b for a, b in zip(again, board))


class FakeClient:
    """Stands in for the daemon: fixed stems for ``separate``, and ``open`` for resolve_stems."""

    def __init__(self, stems):
        self.stems, self.calls = stems, []

    def separate(self, audio, sample_rate, model=None, **options):
        self.calls.append(("separate", model, options))
        return {s: (i + 1) * 0.1 * audio for i, s in enumerate(self.stems)}

    def open(self, model, sample_rate, channels, **options):
        self.calls.append(("open", model, options))
        client = self

        class Session:
            model = "fake-model"
            stems = list(client.stems)

            def cancel(self):
                client.calls.append(("cancel",))
        return Session()

    def close(self):
        pass


def test_stem_chain_resolves_stems_then_processes_with_gains_and_boards():
    p = load_chain("lofi-vocals")
    client = FakeClient(FOUR)
    chain = p.stem_chain(client, segment_s=2.0)
    assert client.calls == [("open", None, {"segment_s": 2.0}), ("cancel",)] and chain.model == "fake-model"
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 44100)).astype(np.float32)
    out = chain.process_stems(x, 44100)
    assert client.calls[-1] == ("separate", "fake-model", {"segment_s": 2.0})
    g = 10 ** (-3 / 20)
    for i, s in enumerate(["drums", "bass", "other"]):
        np.testing.assert_allclose(out[s], (i + 1) * 0.1 * x * g, atol=1e-6)
    expected_vocals = p.boards()["vocals"](0.4 * x, 44100) * 10 ** (-1 / 20)
    np.testing.assert_allclose(out["vocals"], expected_vocals, atol=1e-6)
    assert np.abs(out["vocals"] - 0.4 * x * 10 ** (-1 / 20)).max() > 0.05  # the chain did something


def test_stem_chain_with_known_stems_does_not_ask_the_daemon():
    client = FakeClient(TWO)
    chain = load_chain("acapella").stem_chain(client, "spleeter-2stems", stems=TWO)
    assert client.calls == [] and chain.model == "spleeter-2stems"
    x = np.full((2, 1000), 0.5, np.float32)
    np.testing.assert_allclose(chain(x, 44100), 0.1 * x)  # vocals (0.1 x) alone


def test_chains_are_torch_free():
    code = ("import sys; from plugin_bridge.chains import list_chains\n"
            "[p.mapping(['drums', 'bass', 'other', 'vocals']) for p in list_chains()]\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr


# -- finding presets ----------------------------------------------------------------------------

def test_unknown_name_suggests_and_lists():
    msg = error_of("karoke")
    assert msg.startswith("no chain preset 'karoke' (did you mean karaoke?); known: acapella, drumless, ")
    assert msg.endswith("(or give the path of a .toml file)")


def test_missing_file_and_user_folder_shadows_shipped(tmp_path, monkeypatch):
    assert error_of(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: no such chain preset file"
    user = tmp_path / "mine"
    user.mkdir()
    write(user, 'description = "my karaoke"\n[stems.vocals]\ngain_db = -20\n', "karaoke.toml")
    write(user, 'description = "extra"\n', "extra.toml")
    monkeypatch.setenv("UNBAKE_CHAINS", str(user))
    assert load_chain("karaoke").description == "my karaoke"
    assert load_chain("karaoke").path == user / "karaoke.toml"
    names = [p.name for p in list_chains()]
    assert names == sorted(names) and "extra" in names and SHIPPED <= set(names)


def test_list_chains_reports_bad_files_and_keeps_the_rest(tmp_path, monkeypatch):
    write(tmp_path, "description = 3\n", "broken.toml")
    monkeypatch.setenv("UNBAKE_CHAINS", str(tmp_path))
    with pytest.raises(ChainError):
        list_chains()
    errors = []
    assert {p.name for p in list_chains(on_error=errors.append)} == SHIPPED
    assert [str(e) for e in errors] == [f"{tmp_path / 'broken.toml'}: description: must be a string, got int 3"]


# -- each kind of mistake: one line naming file, stem and key ----------------------------------

CASES = [
    ('[[stems.vocals.chain]]\nplugin = "Reverbb"\n',
     "stems.vocals.chain[0].plugin: unknown pedalboard plugin 'Reverbb' (did you mean Reverb?)"),
    ('[[stems.drums.chain]]\nplugin = "Gain"\n[[stems.drums.chain]]\nplugin = "Compresor"\n',
     "stems.drums.chain[1].plugin: unknown pedalboard plugin 'Compresor' (did you mean Compressor?)"),
    ('[[stems.vocals.chain]]\nplugin = "Reverb"\nroom_sise = 0.3\n',
     "stems.vocals.chain[0].room_sise: Reverb has no parameter 'room_sise' (did you mean room_size?) (its "
     "parameters: room_size, damping, wet_level, dry_level, width, freeze_mode)"),
    ('[[stems.vocals.chain]]\nplugin = "Reverb"\nroom_size = 3\n',
     "stems.vocals.chain[0].room_size: 3 is refused by Reverb: Room Size value must be between 0.0 and 1.0."),
    ('[[stems.bass.chain]]\nplugin = "Compressor"\nthreshold_db = -10\nratio = 0.5\n',
     "stems.bass.chain[0].ratio: 0.5 is refused by Compressor: Compressor ratio must be a value >= 1.0."),
    ('[[stems.vocals.chain]]\nplugin = "Reverb"\nroom_size = "big"\n',
     "stems.vocals.chain[0].room_size: must be a number, got str 'big'"),
    ('[[stems.vocals.chain]]\nplugin = "Reverb"\nroom_size = true\n',
     "stems.vocals.chain[0].room_size: must be a number, got bool True"),
    ('[[stems.vocals.chain]]\nplugin = "Reverb"\nroom_size = nan\n',
     "stems.vocals.chain[0].room_size: must be a finite number, got nan"),
    ('[[stems.vocals.chain]]\nplugin = "HighpassFilter"\ncutoff_frequency_hz = -5\n',
     "stems.vocals.chain[0].cutoff_frequency_hz: must be > 0 Hz, got -5"),
    ('[[stems.vocals.chain]]\nplugin = "BrickwallLimiter"\ntrue_peak = 1\n',
     "stems.vocals.chain[0].true_peak: must be true or false, got int 1"),
    ('[[stems.other.chain]]\nplugin = "LadderFilter"\nmode = "HPF13"\n',
     "stems.other.chain[0].mode: must be one of LPF12, HPF12, BPF12, LPF24, HPF24, BPF24, got str 'HPF13' "
     "(did you mean HPF12?)"),
    ('[[stems.other.chain]]\nplugin = "Convolution"\n',
     "stems.other.chain[0].impulse_response_filename: Convolution needs parameter 'impulse_response_filename'"),
    ('[[stems.vocals.chain]]\nroom_size = 0.5\n', "stems.vocals.chain[0].plugin: missing (plugin = \"Reverb\", ...)"),
    ('[[stems.vocals.chain]]\nplugin = 5\n',
     "stems.vocals.chain[0].plugin: must be a pedalboard plugin class name, got int 5"),
    ('[stems.vocals]\nchain = "Reverb"\n',
     "stems.vocals.chain: must be an array of tables ([[stems.vocals.chain]]), got str 'Reverb'"),
    ('[stems.vocals]\nmute = "yes"\n', "stems.vocals.mute: must be true or false, got str 'yes'"),
    ('[stems.vocals]\ngain_db = "6"\n', "stems.vocals.gain_db: must be a finite number of dB, got str '6'"),
    ('[stems.vocals]\ngain_db = inf\n', "stems.vocals.gain_db: must be a finite number of dB, got float inf"),
    ('[stems.vocals]\ngain_db = 1000\n',
     "stems.vocals.gain_db: must be within -100..100 dB (mute = true for silence), got 1000"),
    ('[stems.vocals]\nmute = true\ngain_db = 3\n',
     "stems.vocals.gain_db: a muted stem has no gain_db (drop one of mute, gain_db)"),
    ('[stems.vocals]\ngian_db = 1\n',
     "stems.vocals.gian_db: unknown key (did you mean gain_db?) (keys: gain_db, mute, chain)"),
    ('stems = 3\n', "stems: must be a table of stems ([stems.vocals]), got int 3"),
    ('stems.vocals = 3\n', "stems.vocals: must be a table (gain_db, mute, chain), got int 3"),
    ('descripton = "x"\n',
     "descripton: unknown key (did you mean description?) (keys: description, model, requires_stems, others, stems)"),
    ('others = "mutte"\n', "others: must be \"pass\", \"mute\" or a table like a stem's, got 'mutte' (did you mean mute?)"),
    ('[others]\ngain_db = "x"\n', "others.gain_db: must be a finite number of dB, got str 'x'"),
    ('[[others.chain]]\nplugin = "Delayy"\n', "others.chain[0].plugin: unknown pedalboard plugin 'Delayy' (did you mean Delay?)"),
    ('requires_stems = "vocals"\n', "requires_stems: must be an array of stem names, got str 'vocals'"),
    ('[[stems.vocals.chain]]\nplugin = "Phaser"\nrate_hz = 1634021578394147.0\n',  # its render never returned
     "stems.vocals.chain[0].rate_hz: must be from 0 to 100 Hz, got 1634021578394147.0"),
    ('[[stems.vocals.chain]]\nplugin = "Chorus"\nrate_hz = -1\n',
     "stems.vocals.chain[0].rate_hz: must be from 0 to 100 Hz, got -1"),
    ('[[stems.drums.chain]]\nplugin = "Resample"\ntarget_sample_rate = 1e7\n',  # minutes, or out of memory
     "stems.drums.chain[0].target_sample_rate: must be from 1 to 768000 Hz, got 10000000.0"),
    ('model = ""\n', "model: must be a model or preset name, got str ''"),
    ('description = "x"\nx = = 1\n', "TOML syntax error: Invalid value (at line 2, column 5)"),
    ('[stems.vocals]\nmute = true\n[stems.vocals]\nmute = false\n',
     "TOML syntax error: Cannot declare ('stems', 'vocals') twice (at line 3, column 14)"),
]


@pytest.mark.parametrize("text,message", CASES, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(CASES)])
def test_each_mistake_is_one_line_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: {message}"


@pytest.mark.parametrize("name", ["VST3Plugin", "ExternalPlugin", "Pedalboard", "Chain", "Mix", "Plugin",
                                  "PluginContainer", "IIRFilter"])
def test_external_plugins_and_containers_are_refused(tmp_path, name):
    path = write(tmp_path, f'[[stems.vocals.chain]]\nplugin = "{name}"\n')
    msg = error_of(path)
    assert msg.startswith(f"{path}: stems.vocals.chain[0].plugin: {name!r} is not allowed in a chain preset "
                          f"(only pedalboard's built-in effects, in series: Bitcrush, ")


def test_allowed_plugins_are_builtin_effects_only():
    allowed = chains.allowed_plugins()
    assert {"Reverb", "Compressor", "HighpassFilter", "LowpassFilter", "Bitcrush", "Gain"} <= set(allowed)
    for cls in allowed.values():
        assert issubclass(cls, pedalboard.Plugin)
        assert not issubclass(cls, (pedalboard.PluginContainer, pedalboard.ExternalPlugin))


def test_enum_and_file_parameters(tmp_path):
    sf.write(str(tmp_path / "ir.wav"), np.r_[1.0, np.zeros(99)].astype(np.float32), 44100)
    path = write(tmp_path, '[[stems.vocals.chain]]\nplugin = "LadderFilter"\nmode = "HPF24"\ncutoff_hz = 500\n'
                           '[[stems.vocals.chain]]\nplugin = "Convolution"\nimpulse_response_filename = "ir.wav"\n'
                           'mix = 0.5\n', "ok.toml")
    board = load_chain(path).boards()["vocals"]
    assert board[0].mode == pedalboard.LadderFilter.Mode.HPF24 and board[0].cutoff_hz == 500
    assert isinstance(board[1], pedalboard.Convolution) and board[1].mix == 0.5
    (tmp_path / "ir.wav").unlink()
    with pytest.raises(ChainError) as e:
        load_chain(path)
    assert str(e.value) == (f"{path}: stems.vocals.chain[1].impulse_response_filename: no such file "
                            f"{str(tmp_path / 'ir.wav')!r}")


def test_a_stem_the_model_lacks_is_named(tmp_path):
    path = write(tmp_path, '[stems.vocal]\nmute = true\n', "typo.toml")
    p = load_chain(path)
    with pytest.raises(ChainError) as e:
        p.mapping(TWO, "spleeter-2stems")
    assert str(e.value) == (f"{path}: stems.vocal: model spleeter-2stems has no stem 'vocal' (did you mean "
                            f"vocals?) (its stems: vocals, accompaniment)")


# -- junk never raises anything but ChainError --------------------------------------------------

KEYS = ["description", "model", "requires_stems", "others", "stems", "vocals", "drums", "gain_db", "mute",
        "chain", "plugin", "room_size", "cutoff_frequency_hz", "mode", "bit_depth", "x"]
PLUGINS = ["Reverb", "Reverbb", "Compressor", "LadderFilter", "VST3Plugin", "Pedalboard", "Convolution",
           "Bitcrush", "HighpassFilter", "Resample", "GSMFullRateCompressor", "pass", "mute", "HPF12", ""]
scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True)
           | st.sampled_from(PLUGINS) | st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=4),
                      max_leaves=12)


def _drop_none(v):
    """TOML has no null."""
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_none(x) for x in v if x is not None]
    return v


def to_toml(data: dict) -> str:
    """A minimal TOML writer (inline tables and arrays; json strings are valid TOML basic strings)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return "nan" if v != v else ("inf" if v > 0 else "-inf") if abs(v) == float("inf") else repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "{" + ", ".join(f"{value(k)} = {value(x)}" for k, x in v.items()) + "}"
    return "".join(f"{value(k)} = {value(v)}\n" for k, v in data.items())


def mostly(valid, junk=scalars):
    """Mostly ``valid``, now and then junk: random documents get deep into the validation."""
    return st.integers(0, 7).flatmap(lambda i: junk if i == 0 else valid)


params = {k: mostly(st.floats(-1, 2) | st.sampled_from(["HPF12", "LPF24", "WindowedSinc8"]) | st.booleans())
          for k in ["room_size", "mode", "bit_depth", "cutoff_frequency_hz", "quality", "true_peak", "x"]}
entries = st.fixed_dictionaries({"plugin": st.sampled_from(PLUGINS)}, optional=params)
stem_tables = st.fixed_dictionaries({}, optional={
    "gain_db": mostly(st.floats(-200, 200)), "mute": mostly(st.booleans()),
    "chain": mostly(st.lists(mostly(entries, values), max_size=3), values), "x": st.nothing()})
documents = st.fixed_dictionaries({}, optional={
    "description": mostly(st.text(max_size=8)), "model": mostly(st.just("htdemucs")),
    "requires_stems": mostly(st.lists(mostly(st.sampled_from(["vocals", "drums"]), st.text(max_size=2)),
                                      max_size=2), values),
    "others": mostly(st.sampled_from(["pass", "mute"]) | stem_tables, values),
    "stems": mostly(st.dictionaries(mostly(st.sampled_from(["vocals", "drums"]), st.text(max_size=4)),
                                    mostly(stem_tables, values), max_size=3), values)})
documents = mostly(documents, st.builds(lambda d, x: {**d, "x": x}, documents, values))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
@example({"model": "htdemucs", "stems": {"0\n": False}})  # found by CI: a key with a line break
@example({"model": "htdemucs", "others": {"\n": False}})
def test_random_documents_raise_only_chain_error(tmp_path_factory, data):
    data = _drop_none(data)
    path = tmp_path_factory.mktemp("junk") / "junk.toml"
    path.write_text(to_toml(data))
    for load in (lambda: load_chain(path), lambda: parse_chain(data, path)):
        try:
            preset = load()
        except ChainError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
            continue
        assert isinstance(preset, ChainPreset)
        preset.boards()  # what loaded also builds


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_random_bytes_raise_only_chain_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("junk") / "junk.toml"
    path.write_bytes(raw)
    try:
        load_chain(path)
    except ChainError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)


ALL_PARAMS = sorted({k for cls in chains.allowed_plugins().values() for k in chains.plugin_parameters(cls)})
param_values = st.one_of(st.floats(), st.floats(-2, 2), st.integers(-100, 30000), st.booleans(),
                         st.sampled_from(["HPF12", "Linear", "WindowedSinc8", "ir.wav", "", "x"]),
                         st.lists(st.floats(0, 1), max_size=2))
def _entry(name):
    """Mostly the plugin's own parameters, now and then anyone's."""
    cls = chains.allowed_plugins().get(name)
    own = sorted(chains.plugin_parameters(cls)) if cls else []
    return st.fixed_dictionaries({"plugin": st.just(name)},
                                 optional={k: param_values for k in own + ["x"] * (not own)}) | \
        st.fixed_dictionaries({"plugin": st.just(name)}, optional={k: param_values for k in ALL_PARAMS})


chain_entries = (st.sampled_from(sorted(chains.allowed_plugins())) | st.sampled_from(PLUGINS)).flatmap(_entry)


@settings(max_examples=300, deadline=None)
@given(st.lists(chain_entries, min_size=1, max_size=3))
@example([{"plugin": "Phaser", "rate_hz": 1634021578394147.0, "depth": 1634021578394147.0}])  # found by CI: a hang
@example([{"plugin": "Resample", "target_sample_rate": 1e7}])
def test_random_plugin_parameters_raise_only_chain_error_and_what_loads_runs(tmp_path_factory, entries):
    path = tmp_path_factory.mktemp("junk") / "junk.toml"
    path.write_text(to_toml({"stems": {"vocals": {"chain": entries}}}))
    try:
        preset = load_chain(path)
    except ChainError as e:
        assert str(e).startswith(f"{path}: stems.vocals.chain[") and "\n" not in str(e)
        return
    board = preset.boards()["vocals"]
    assert [type(p).__name__ for p in board] == [e["plugin"] for e in entries]
    out = board(np.zeros((2, 256), np.float32), 44100)
    assert out.ndim == 2
