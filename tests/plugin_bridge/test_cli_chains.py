"""`unbake chains`, `unbake remix --chain`, `unbake separate --chain` end to end, against the real test
daemon (tests/plugin_bridge/conftest.py) and spleeter-2stems on a 6 s excerpt of a dev song.

The reference stems come from ``Client.separate`` on the same daemon: karaoke's remix is the
accompaniment and acapella's the vocals, within 1e-5; a bad preset fails before any audio is read
or any daemon contacted (exit 2, one line naming file, stem and key).
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from plugin_bridge.chains import load_chain
from plugin_bridge.client import Client
from tests.conftest import read

MODEL = "spleeter-2stems"
BAD = '[[stems.vocals.chain]]\nplugin = "Reverbb"\nroom_size = 0.5\n'


def unbake(*args, env=None):
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env)


def files_under(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def excerpt(eval_dir, tmp_path_factory):
    """6 s of a real song with vocals, float32 WAV in a temp folder."""
    data, sr = sf.read(str(eval_dir / "cristina-vane-so-easy" / "mixture.wav"), dtype="float32",
                       frames=6 * 44100, start=20 * 44100)
    path = tmp_path_factory.mktemp("chain-audio") / "song.wav"
    sf.write(str(path), data, sr, subtype="FLOAT")
    return path


@pytest.fixture(scope="module")
def reference(excerpt, engine_endpoint):
    """The engine's own stems of the excerpt, through the client."""
    mix, sr = read(excerpt)
    with Client(engine_endpoint, timeout_s=120) as client:
        stems = client.separate(mix, sr, MODEL)
        return mix, sr, {s: np.asarray(stems[s]) for s in stems}


def remix(chain, src, out, *extra):
    r = unbake("remix", "--chain", chain, "-n", MODEL, "-q", *extra, src, "-o", out)
    assert r.returncode == 0, r.stderr
    return read(out)


def test_karaoke_remix_is_the_accompaniment(reference, excerpt, tmp_path):
    mix, sr, stems = reference
    out, sr_out = remix("karaoke", excerpt, tmp_path / "karaoke.wav")
    assert sr_out == sr and out.shape == mix.shape
    assert sf.info(str(tmp_path / "karaoke.wav")).subtype == "FLOAT"
    assert np.abs(out - stems["accompaniment"]).max() < 1e-5
    assert np.abs(out - mix).max() > 0.05  # the vocals are gone: not the mix again
    assert files_under(tmp_path) == ["karaoke.wav"]  # no temporary left beside it


def test_acapella_remix_is_the_vocals(reference, excerpt, tmp_path):
    mix, sr, stems = reference
    out, sr_out = remix("acapella", excerpt, tmp_path / "acapella.wav")
    assert sr_out == sr and out.shape == mix.shape
    assert np.abs(out - stems["vocals"]).max() < 1e-5
    assert np.abs(stems["vocals"]).max() > 0.05  # there are vocals to compare


def test_vocal_up_and_lofi_vocals_match_the_stems_through_their_chains(reference, excerpt, tmp_path):
    mix, sr, stems = reference
    voc, acc = stems["vocals"], stems["accompaniment"]
    out, _ = remix("vocal-up", excerpt, tmp_path / "up.wav")
    np.testing.assert_allclose(out, acc + 10 ** (6 / 20) * voc, atol=1e-5, rtol=0)
    out, _ = remix("lofi-vocals", excerpt, tmp_path / "lofi.wav")
    board = load_chain("lofi-vocals").boards()["vocals"]
    expected = 10 ** (-3 / 20) * acc + 10 ** (-1 / 20) * board(voc, sr)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    assert np.abs(out - (10 ** (-3 / 20) * acc + 10 ** (-1 / 20) * voc)).max() > 0.01  # the chain ran


def test_default_model_and_a_preset_file_by_path(reference, excerpt, tmp_path):
    """No -n: the engine's default (spleeter-2stems here); a preset given as a path."""
    mix, sr, stems = reference
    preset = tmp_path / "half.toml"
    preset.write_text('description = "accompaniment -6 dB, vocals muted"\n[stems.vocals]\nmute = true\n'
                      '[stems.accompaniment]\ngain_db = -6.0\n')
    r = unbake("remix", "--chain", preset, excerpt, "-o", tmp_path / "half.wav")
    assert r.returncode == 0, r.stderr
    assert f"chain half, model {MODEL}, stems vocals, accompaniment" in r.stderr
    out, _ = read(tmp_path / "half.wav")
    np.testing.assert_allclose(out, 10 ** (-6 / 20) * stems["accompaniment"], atol=1e-5, rtol=0)


def test_unknown_plugin_fails_before_any_audio_or_daemon(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD)
    dead = tmp_path / "dead" / "engine.sock"  # no engine, and none must be started there
    msg = f"error: {bad}: stems.vocals.chain[0].plugin: unknown pedalboard plugin 'Reverbb' (did you mean Reverb?)"
    for args in (["remix", "--chain", bad, tmp_path / "missing.wav", "-o", tmp_path / "out.wav"],
                 ["separate", "--chain", bad, "-o", tmp_path / "sep", tmp_path / "missing.wav"]):
        r = unbake(*args, "--endpoint", f"ipc://{dead}")
        assert r.returncode == 2, r.stderr
        assert r.stderr.splitlines() == [msg]
    assert files_under(tmp_path) == ["bad.toml"] and not dead.parent.exists()


def test_unknown_preset_name_and_bad_output_extension_exit_2(excerpt, tmp_path):
    r = unbake("remix", "--chain", "karoke", excerpt, "-o", tmp_path / "o.wav")
    assert r.returncode == 2
    assert r.stderr.startswith("error: no chain preset 'karoke' (did you mean karaoke?); known: acapella, ")
    r = unbake("remix", "--chain", "karaoke", excerpt, "-o", tmp_path / "o.ogg")
    assert (r.returncode, r.stderr) == (2, f"error: {tmp_path / 'o.ogg'}: unknown output format '.ogg'; use "
                                           f".wav, .flac or .mp3\n")
    assert files_under(tmp_path) == []


def test_drumless_needs_a_four_stem_model(excerpt, tmp_path, engine_endpoint):
    drumless = load_chain("drumless").path
    r = unbake("remix", "--chain", "drumless", "-n", MODEL, excerpt, "-o", tmp_path / "o.wav")
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == (f"error: {drumless}: requires_stems: model {MODEL} has no stem 'drums' "
                                         f"(its stems: vocals, accompaniment); the chain is made for htdemucs")
    r = unbake("separate", "--chain", "drumless", "-n", MODEL, "-o", tmp_path / "sep", excerpt)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith(f"error: {drumless}: requires_stems: ")
    # Without -n the preset's model, htdemucs, is asked for; the test engine has no weights for it.
    with Client(engine_endpoint) as client:
        installed = {m["name"]: m["installed"] for m in client.models()}
    if not installed.get("htdemucs"):
        r = unbake("remix", "--chain", "drumless", excerpt, "-o", tmp_path / "o.wav")
        assert r.returncode == 1 and "htdemucs" in r.stderr
    assert files_under(tmp_path) == []


def test_separate_with_chain_writes_processed_stems_and_remix(reference, excerpt, tmp_path):
    mix, sr, stems = reference
    r = unbake("separate", "--chain", "karaoke", "-n", MODEL, "--float32", "-q", "-o", tmp_path, excerpt)
    assert r.returncode == 0, r.stderr
    assert files_under(tmp_path) == [f"{MODEL}/song/accompaniment.wav", f"{MODEL}/song/remix.wav",
                                     f"{MODEL}/song/vocals.wav"]
    got = {s: read(tmp_path / MODEL / "song" / f"{s}.wav")[0] for s in ("accompaniment", "vocals", "remix")}
    assert np.abs(got["vocals"]).max() == 0.0  # muted
    assert np.abs(got["accompaniment"] - stems["accompaniment"]).max() < 1e-5
    assert np.abs(got["remix"] - stems["accompaniment"]).max() < 1e-5


def test_integer_output_warns_how_many_samples_clipped(reference, engine_endpoint, tmp_path):
    mix, sr, _ = reference
    loud = (0.98 / np.abs(mix).max() * mix).astype(np.float32)  # the song, normalised: vocals +6 dB clip
    src = tmp_path / "loud.wav"
    sf.write(str(src), loud.T, sr, subtype="FLOAT")
    with Client(engine_endpoint, timeout_s=120) as client:
        stems = client.separate(loud, sr, MODEL)
    expected = stems["accompaniment"] + np.float32(10 ** (6 / 20)) * stems["vocals"]
    clipped = int(np.count_nonzero(np.abs(expected) > 1.0))
    assert clipped > 0
    r = unbake("remix", "--chain", "vocal-up", "-n", MODEL, "--int16", src, "-o", tmp_path / "up16.wav")
    assert r.returncode == 0, r.stderr
    warn = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and warn[0].startswith(f"warning: {tmp_path / 'up16.wav'}: {clipped} samples (")
    assert sf.info(str(tmp_path / "up16.wav")).subtype == "PCM_16"
    r = unbake("remix", "--chain", "vocal-up", "-n", MODEL, src, "-o", tmp_path / "up32.wav")
    assert r.returncode == 0 and "warning" not in r.stderr
    np.testing.assert_allclose(read(tmp_path / "up32.wav")[0], expected, atol=1e-5, rtol=0)


def test_bad_input_leaves_nothing(tmp_path):
    src = tmp_path / "nan.wav"
    x = np.zeros((44100, 2), np.float32)
    x[1000, 0] = np.nan
    sf.write(str(src), x, 44100, subtype="FLOAT")
    r = unbake("remix", "--chain", "karaoke", "-n", MODEL, src, "-o", tmp_path / "out" / "o.wav")
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == f"error: {src}: NaN or Inf sample at frame 1000 (0.023 s)"
    assert files_under(tmp_path) == ["nan.wav"]


def test_chains_lists_shipped_and_user_presets(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "quiet.toml").write_text('description = "all -12 dB"\n[others]\ngain_db = -12\n')
    (user / "broken.toml").write_text(BAD)
    env = dict(__import__("os").environ, UNBAKE_CHAINS=str(user))
    r = unbake("chains", env=env)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"error: {user / 'broken.toml'}: stems.vocals.chain[0].plugin: unknown "
                                     f"pedalboard plugin 'Reverbb' (did you mean Reverb?)"]
    lines = r.stdout.splitlines()
    names = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert names == ["acapella", "drumless", "karaoke", "lofi-vocals", "quiet", "vocal-up"]
    assert any("model htdemucs; needs stems drums;" in line for line in lines)
    r = unbake("chains", "--json")
    assert r.returncode == 0, r.stderr
    listed = {p["name"]: p for p in json.loads(r.stdout)}
    assert listed["acapella"]["others"] == "mute" and listed["karaoke"]["stems"]["vocals"]["mute"] is True
    assert listed["lofi-vocals"]["others"]["gain_db"] == -3.0
    assert listed["karaoke"]["sha256"] == load_chain("karaoke").sha256
