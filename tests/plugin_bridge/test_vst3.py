"""The unbake VST3 (plugin_bridge/vst3), built here and hosted for real by pedalboard, the engine a real
process (``engine_endpoint``).

What a plugin can equal. A plugin sees a stream with no end: pedalboard's one-shot ``p(audio, sr)``
feeds the audio, then ``reported_latency_samples`` frames of silence, and drops the first
``reported_latency_samples`` output frames. The plugin opens its sessions with the engine's
past-context rule (``PLUGIN_OPTIONS``, as Parameters.h's kSessionOptions), under which a closed track
equals a stream of it followed by silence (engine/apply.py). So the plugin's one-shot output is
``Client.separate(audio, sr, MODEL, **PLUGIN_OPTIONS)``, same length, within 1e-5, and its latency
the engine's for those options (55124 samples at 44.1 kHz, 60374 at 48 kHz for spleeter-2stems).

The build: ``install/build_vst3.sh`` with UNBAKE_VST3_NO_INSTALL=1 (an incremental build when the
build folder exists); the module skips, saying why, only when the build dependencies are missing and
cannot be installed (not root).
"""
import gc
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

MODEL = "spleeter-2stems"
BUILD_DIR = REPO / "plugin_bridge" / "vst3" / "build"
PLUGIN = BUILD_DIR / "unbake_artefacts" / "Release" / "VST3" / "unbake.vst3"
STEM_PARAMS = ("vocals", "drums", "bass", "other", "guitar", "piano", "accompaniment")
# the session options the plugin opens its sessions with (plugin_bridge/vst3/Source/Parameters.h,
# kSessionOptions): the engine's past-context rule
PLUGIN_OPTIONS = dict(segment_s=1.0, overlap=0.25, context_s=4.0, lookahead_s=0.25)

pedalboard = pytest.importorskip("pedalboard")


@pytest.fixture(scope="session")
def plugin_path() -> Path:
    # JUCE (inside the plugin) opens an X display when one is named, and ":0.0" when DISPLAY is
    # unset: an X server of someone else on :0 that goes away then takes this process with it
    # ("X connection to :0.0 broken"). Name a display that does not exist: JUCE runs headless.
    if not os.environ.get("DISPLAY"):
        os.environ["DISPLAY"] = ":4093"
    env = dict(os.environ, UNBAKE_VST3_NO_INSTALL="1", UNBAKE_VST3_BUILD=str(BUILD_DIR))
    proc = subprocess.run(["bash", str(REPO / "install" / "build_vst3.sh")], env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        if "missing build dependencies" in proc.stderr:
            pytest.skip("the VST3's build dependencies are missing and this user cannot install them: "
                        + proc.stderr.strip().splitlines()[-1])
        pytest.fail(f"install/build_vst3.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    assert PLUGIN.is_dir(), proc.stdout
    return PLUGIN


@pytest.fixture(scope="module", autouse=True)
def _plugins_gone_before_the_engine():
    """pedalboard's parameter wrappers make reference cycles, and pytest holds a fixture's value until
    after its teardown: the last plugin would live on past the engine (logging that it went away and
    retrying it). Collected here, at the module's end, while the engine still runs."""
    yield
    gc.collect()


@pytest.fixture()
def plugin(plugin_path, engine_endpoint, monkeypatch, request):
    monkeypatch.setenv("UNBAKE_ENDPOINT", engine_endpoint)
    p = pedalboard.load_plugin(str(plugin_path))
    yield p
    # gone now, while its engine runs: pedalboard's parameter wrappers make reference cycles, so
    # without a collection it would live on past the engine (retrying it in the background) until
    # the interpreter exits (see test_a_leftover_plugin_is_quiet_at_exit)
    request.node.funcargs.pop("plugin", None)
    del p
    gc.collect()


def music(sr: int, seconds: float, channels: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    t = np.arange(n) / sr
    voice = 0.25 * np.sin(2 * np.pi * 220 * t + 2 * np.sin(2 * np.pi * 5 * t)) * (1 + np.sin(2 * np.pi * 0.7 * t))
    x = np.stack([voice + 0.1 * np.sin(2 * np.pi * 55 * t), np.roll(voice, 23) + 0.1 * np.sin(2 * np.pi * 82 * t)])
    x = x + 0.02 * rng.standard_normal((2, n))
    x[:, :: sr // 3] += 0.8  # clicks
    x = x.astype(np.float32)
    return x[:1] if channels == 1 else x


def solo(p, *stems_on: str) -> None:
    """Every stem parameter muted except ``stems_on`` (at 0 dB)."""
    for s in STEM_PARAMS:
        setattr(p, f"{s}_gain_db", 0.0)
        setattr(p, f"{s}_mute", s not in stems_on)


def reference(endpoint: str, audio: np.ndarray, sr: int) -> dict:
    """Client.separate of ``audio`` (a closed track) with the plugin's session options."""
    from plugin_bridge.client import Client
    with Client(endpoint, autostart=False, timeout_s=60) as client:
        stems = client.separate(audio, sr, MODEL, **PLUGIN_OPTIONS)
    return {name: stems[name] for name in stems.stems}


def engine_latency(endpoint: str, sr: int, channels: int, model: str = MODEL) -> int:
    """The engine's latency_samples for a session with the plugin's options (its open reply)."""
    from plugin_bridge.client import Client
    with Client(endpoint, autostart=False, timeout_s=60) as client:
        session = client.open(model, sr, channels, **PLUGIN_OPTIONS)
        latency = session.latency_samples
        session.cancel()
    return latency


def juce_base64_decode(text: str) -> bytes:
    """juce::MemoryBlock::fromBase64Encoding: "<size>.<chars>", 6 bits a char, least significant first."""
    size, chars = text.strip().split(".", 1)
    table = ".ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+"
    value = 0
    for i, ch in enumerate(chars):
        value |= table.index(ch) << (6 * i)
    return (value & ((1 << (8 * int(size))) - 1)).to_bytes(int(size), "little")


def juce_base64_encode(data: bytes) -> str:
    table = ".ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+"
    value = int.from_bytes(data, "little")
    return f"{len(data)}." + "".join(table[(value >> (6 * i)) & 63] for i in range((len(data) * 8 + 5) // 6))


def plugin_state(raw: bytes):
    """The plugin's own state (its XML, an ElementTree element) inside pedalboard's raw_state (JUCE's
    VST3 host: "VC2!" + size + <VST3PluginState><IComponent>base64 of the plugin's getStateInformation)."""
    import xml.etree.ElementTree as ET
    assert raw[:4] == b"VC2!"
    outer = ET.fromstring(raw[8:8 + int.from_bytes(raw[4:8], "little")].rstrip(b"\0"))
    inner = juce_base64_decode(outer.find("IComponent").text)
    assert inner[:4] == b"VC2!"
    return outer, ET.fromstring(inner[8:8 + int.from_bytes(inner[4:8], "little")].rstrip(b"\0"))


def with_plugin_state(raw: bytes, edit) -> bytes:
    """raw_state with the plugin's XML changed by ``edit(element)``."""
    import xml.etree.ElementTree as ET
    outer, inner = plugin_state(raw)
    edit(inner)

    def binary(element) -> bytes:  # juce::AudioProcessor::copyXmlToBinary
        body = ET.tostring(element, encoding="unicode").encode()
        return b"VC2!" + len(body).to_bytes(4, "little") + body + b"\0"
    outer.find("IComponent").text = juce_base64_encode(binary(inner))
    return binary(outer)


def test_parameters_are_plain_attributes(plugin):
    names = set(plugin.parameters.keys())
    for s in STEM_PARAMS:
        assert {f"{s}_gain_db", f"{s}_mute"} <= names  # no label appended (no "_db_db")
    assert "model" in names and plugin.model == MODEL
    plugin.vocals_gain_db = -6.0
    assert plugin.vocals_gain_db == pytest.approx(-6.0, abs=0.01)
    plugin.vocals_mute = True
    assert plugin.vocals_mute == True  # noqa: E712 (pedalboard wraps the bool)


# The engine at 48 kHz (not the model's 44.1 kHz): a closed track's last frames differ from those of a
# stream of it followed by silence (at close, engine.sessions.TrackSeparator flushes its resamplers as
# if the track ended there: the model does not see the resampled tail a stream has, and spleeter's
# STFT, 4096 frames, spreads that over the last window; measured: from frame 142903 of 144000, max
# 0.0145). The plugin is that stream (equal to Client.separate of the audio padded with silence).
RESAMPLER_REACH = 4096


@pytest.mark.parametrize("sr,channels", [(44100, 2), (48000, 2), (44100, 1), (48000, 1)])
def test_one_shot_equals_client_separate(plugin, engine_endpoint, sr, channels):
    """The plugin's one-shot output is Client.separate with the plugin's options (a closed track equals
    a stream of it followed by silence under the past-context rule), exactly aligned, same length;
    its reported latency is the engine's for those options. For each mix: vocals only, vocals muted,
    every stem at 0 dB, vocals at -6 dB."""
    audio = music(sr, 3.0, channels)
    g = 10 ** (-6.0 / 20)
    outs = {}
    solo(plugin, "vocals")
    outs["vocals"] = plugin(audio, sr)
    latency = engine_latency(engine_endpoint, sr, channels)
    print(f"{sr} Hz, {channels} channel(s): the engine's latency {latency} samples; "
          f"the plugin reports {plugin.reported_latency_samples}")
    assert plugin.reported_latency_samples == latency
    assert latency == {44100: 55124, 48000: 60374}[sr]  # 1 s segment + 0.25 s lookahead, at the model's rate
    solo(plugin, *[s for s in STEM_PARAMS if s != "vocals"])  # karaoke: vocals muted
    outs["vocals muted"] = plugin(audio, sr)
    solo(plugin, *STEM_PARAMS)  # every stem at 0 dB: the sum of the stems
    outs["all at 0 dB"] = plugin(audio, sr)
    # "vocals -6 dB". pedalboard sets a float parameter on a grid of 1000 steps of its normalised
    # range ([-60, 12] dB: 0.072 dB apart); -6 dB is on it (6.0 would become 6.024)
    plugin.vocals_gain_db = -6.0
    outs["vocals -6 dB"] = plugin(audio, sr)

    def mixes(stems):
        v, a = stems["vocals"], stems["accompaniment"]
        return {"vocals": v, "vocals muted": a, "all at 0 dB": v + a, "vocals -6 dB": g * v + a}

    closed = mixes(reference(engine_endpoint, audio, sr))
    padded = np.concatenate([audio, np.zeros((channels, latency), np.float32)], axis=1)
    stream = {k: v[:, :audio.shape[1]] for k, v in mixes(reference(engine_endpoint, padded, sr)).items()}
    assert all(out.shape == audio.shape for out in outs.values())  # pedalboard removed the reported latency
    diff = {k: float(np.abs(outs[k] - closed[k]).max()) for k in outs}
    diff_stream = {k: float(np.abs(outs[k] - stream[k]).max()) for k in outs}
    bad = np.flatnonzero(np.max([np.abs(outs[k] - closed[k]).max(0) for k in outs], axis=0) > 1e-5)
    print("max |plugin - Client.separate(audio)|: " + ", ".join(f"{k} {v:.3g}" for k, v in diff.items())
          + (f" (frames {bad[0]}..{bad[-1]} of {audio.shape[1]})" if bad.size else "")
          + "; max |plugin - Client.separate(audio + latency zeros)|: " + f"{max(diff_stream.values()):.3g}"
          + f"; peak of the vocals {float(np.abs(closed['vocals']).max()):.3g}")
    assert float(np.abs(closed["vocals"]).max()) > 0.01  # not a comparison of silences
    assert max(diff_stream.values()) <= 1e-5, diff_stream  # the stream of the audio followed by silence
    if sr != 44100 and bad.size and bad[0] >= audio.shape[1] - RESAMPLER_REACH:
        pytest.xfail(f"engine: at {sr} Hz a closed track's last {audio.shape[1] - bad[0]} frames differ from a "
                     f"stream followed by silence (max {max(diff.values()):.3g}); see RESAMPLER_REACH")
    assert max(diff.values()) <= 1e-5, diff


def test_a_stream_starts_at_its_first_sound(plugin, engine_endpoint):
    """The digital silence a host plays before the audio (a DAW's pre-roll, the transport started
    before a region) is not sent: it comes out as silence and the engine's grid starts with the
    audio, so the render is the audio's Client.separate after the same silence, wherever the host
    started. After reset() the next stream starts at its first sound again."""
    sr = 44100
    audio = music(sr, 2.5, seed=5)
    want = reference(engine_endpoint, audio, sr)["vocals"]
    solo(plugin, "vocals")
    for lead in (0, 1, 700, 30000):
        out = plugin(np.concatenate([np.zeros((2, lead), np.float32), audio], axis=1), sr)
        assert out.shape == (2, lead + audio.shape[1])
        assert not out[:, :lead].any()
        diff = float(np.abs(out[:, lead:] - want).max())
        print(f"{lead} frames of silence first: max |diff| {diff:.3g}")
        assert diff <= 1e-5
    # digital silence inside the audio is sent as it is (only the stream's start is skipped)
    gap = audio.copy()
    gap[:, sr:sr + 5000] = 0
    assert float(np.abs(plugin(gap, sr) - reference(engine_endpoint, gap, sr)["vocals"]).max()) <= 1e-5


def test_one_shot_equals_client_stream(plugin, engine_endpoint):
    """The plugin's stream is the Python client's StemStream (same options), frame for frame."""
    from plugin_bridge.client import Client
    sr = 44100
    audio = music(sr, 2.0, seed=3)
    solo(plugin, "vocals")
    out = plugin(audio, sr)
    with Client(engine_endpoint, autostart=False, timeout_s=60) as client:
        stream = client.stream(MODEL, sr, 2, **PLUGIN_OPTIONS)
        latency = stream.latency_samples
        got = stream.process(np.concatenate([audio, np.zeros((2, latency), np.float32)], axis=1))
        stream.cancel()
    assert plugin.reported_latency_samples == latency
    assert float(np.abs(out - got["vocals"][:, latency:]).max()) <= 1e-5


def test_no_engine_is_silence_within_a_bound(plugin_path, tmp_path):
    """No engine at the endpoint: loading and rendering return within their bounds, the output is
    silence, nothing crashes (run in a child process, so a crash fails this test and nothing else)."""
    script = textwrap.dedent(f"""
        import time, numpy as np, pedalboard
        t0 = time.monotonic()
        p = pedalboard.load_plugin({str(plugin_path)!r})
        t1 = time.monotonic()
        x = (0.1 * np.random.default_rng(0).standard_normal((2, 44100))).astype(np.float32)
        y = p(x, 44100)
        t2 = time.monotonic()
        print("RESULT", t1 - t0, t2 - t1, y.shape, float(np.abs(y).max()), p.reported_latency_samples)
    """)
    env = dict(os.environ, UNBAKE_ENDPOINT=f"ipc://{tmp_path}/nobody-here.sock")
    env.pop("UNBAKE_EXECUTABLE", None)  # no engine to start either
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    _, load_s, render_s, *_ = line.split(" ", 3)
    assert "(2, 44100) 0.0 0" in line, line  # full length, silence, no latency claimed
    assert float(load_s) < 10 and float(render_s) < 10 and wall < 60, line
    assert "no engine at" in proc.stdout + proc.stderr  # the log says why


def test_streaming_random_blocks_equals_the_one_shot(plugin):
    """``reset=False`` with random block sizes from 3 to 8192 (pedalboard re-prepares the plugin when
    the block size changes: the stream must go on). pedalboard itself compensates a plugin's latency
    across ``reset=False`` calls (measured here: the first ``reported_latency_samples`` output frames
    never come back, so early calls return fewer frames than they got), so the concatenated output
    of the audio followed by ``reported_latency_samples`` frames of silence is the one-shot output.
    Blocks of 1 or 2 frames are left out: pedalboard cannot tell a [2, 1] array's layout (it returned
    shape (0, 1)), nothing the plugin sees."""
    sr = 44100
    audio = music(sr, 2.0, seed=5)
    solo(plugin, "vocals")
    want = plugin(audio, sr)
    latency = plugin.reported_latency_samples
    plugin.reset()
    feed = np.concatenate([audio, np.zeros((2, latency), np.float32)], axis=1)
    rng = np.random.default_rng(7)
    outs, pos, calls = [], 0, 0
    sizes = [3, 8192, 17, 4096, 5]  # first a few fixed ones, then random
    while pos < feed.shape[1]:
        n = sizes.pop(0) if sizes else int(rng.integers(3, 8193))
        if feed.shape[1] - pos - n < 3:
            n = feed.shape[1] - pos
        block = feed[:, pos:pos + n]
        out = plugin(block, sr, reset=False)
        assert out.shape[0] == 2 and out.shape[1] <= block.shape[1]
        outs.append(out)
        pos += block.shape[1]
        calls += 1
    got = np.concatenate(outs, axis=1)
    print(f"streamed {feed.shape[1]} frames in {calls} calls; got {got.shape[1]} frames back")
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= 1e-5


def test_automation_between_blocks(plugin):
    """A gain or a mute changed between two blocks of a stream (``reset=False``) applies from the
    first output frame of the next block on, exactly: the mix is made at the output, so the change
    is heard at once (not a latency later), and the stream itself is not disturbed."""
    sr = 44100
    audio = music(sr, 3.0, seed=9)
    solo(plugin, "vocals")
    want = plugin(audio, sr)  # the vocals at 0 dB
    latency = plugin.reported_latency_samples
    plugin.reset()
    feed = np.concatenate([audio, np.zeros((2, latency), np.float32)], axis=1)
    block, outs, changes = 4096, [], {}
    for k, pos in enumerate(range(0, feed.shape[1], block)):
        if k == 20:
            plugin.vocals_gain_db = -6.0
            changes["gain"] = pos - latency  # pedalboard drops the first `latency` output frames
        if k == 26:
            plugin.vocals_mute = True
            changes["mute"] = pos - latency
        outs.append(plugin(feed[:, pos:pos + block], sr, reset=False))
    got = np.concatenate(outs, axis=1)
    assert got.shape == want.shape
    a, b = changes["gain"], changes["mute"]
    assert 0 < a < b < want.shape[1]
    g = 10 ** (-6.0 / 20)
    assert float(np.abs(got[:, :a] - want[:, :a]).max()) <= 1e-5
    assert float(np.abs(got[:, a:b] - g * want[:, a:b]).max()) <= 1e-5
    assert float(np.abs(want[:, a:b]).max()) > 0.01 and not got[:, b:].any()


def test_state_round_trip(plugin_path, engine_endpoint, monkeypatch, tmp_path):
    """raw_state carries the parameters, the endpoint and engine_command properties, and a read-only
    <engine_status> node (what the last session said); a state set back keeps endpoint, model and
    gains and ignores that node."""
    monkeypatch.setenv("UNBAKE_ENDPOINT", engine_endpoint)
    a = pedalboard.load_plugin(str(plugin_path))
    a.vocals_gain_db = -6.0
    a.drums_mute = True
    a.accompaniment_gain_db = 3.0
    sr = 48000
    assert a(music(sr, 1.0), sr).shape == (2, sr)
    _, state = plugin_state(a.raw_state)
    status = state.find("engine_status")
    print("status node:", {k: v for k, v in status.attrib.items()})
    assert list(status.attrib) == ["connected", "endpoint", "model", "device", "line", "latency_samples",
                                   "sample_rate", "late_frames", "stems"]
    assert status.get("connected") == "1" and status.get("endpoint") == engine_endpoint
    assert status.get("model") == MODEL and status.get("stems") == "vocals,accompaniment"
    assert status.get("device") and status.get("line").startswith("connected to " + engine_endpoint)
    assert int(status.get("latency_samples")) == engine_latency(engine_endpoint, sr, 2) == a.reported_latency_samples
    assert status.get("sample_rate") == str(sr)
    assert status.get("late_frames") == "0"  # offline: every block waited for its stems
    assert state.get("endpoint") == "" and state.get("engine_command") == ""  # the defaults

    # an endpoint and an engine command in the state (as a host would restore them)
    command = str(tmp_path / "bin" / "unbake")
    def edit(element):
        element.set("endpoint", engine_endpoint)
        element.set("engine_command", command)
        element.find("engine_status").set("model", "not-a-model")  # read-only: ignored
    raw = with_plugin_state(a.raw_state, edit)
    monkeypatch.setenv("UNBAKE_ENDPOINT", f"ipc://{tmp_path}/elsewhere.sock")  # the state's endpoint wins
    b = pedalboard.load_plugin(str(plugin_path))
    b.raw_state = raw
    assert b.vocals_gain_db == pytest.approx(-6.0, abs=0.01)
    assert b.drums_mute == True  # noqa: E712
    assert b.accompaniment_gain_db == pytest.approx(a.accompaniment_gain_db, abs=1e-6)
    assert b.model == MODEL
    _, state = plugin_state(b.raw_state)
    assert state.get("endpoint") == engine_endpoint and state.get("engine_command") == command
    assert len(state.findall("engine_status")) == 1 and state.find("engine_status").get("model") == MODEL
    out = b(music(sr, 1.0), sr)
    assert float(np.abs(out).max()) > 0  # it reached the engine at the state's endpoint
    assert plugin_state(b.raw_state)[1].find("engine_status").get("endpoint") == engine_endpoint
    del a, b  # now (their parameter wrappers make cycles), not when the engine has gone at the end
    gc.collect()


def test_inside_a_pedalboard_chain(plugin, engine_endpoint):
    """Pedalboard([Gain, unbake, Reverb]) one-shot equals the same done with the Python client and
    pedalboard's own plugins (the stem of the gained audio, then the reverb)."""
    from pedalboard import Gain, Pedalboard, Reverb
    sr = 44100
    audio = music(sr, 2.0, seed=9)
    solo(plugin, "vocals")
    board = Pedalboard([Gain(gain_db=-3.0), plugin, Reverb(room_size=0.3)])
    out = board(audio, sr)
    gained = Gain(gain_db=-3.0)(audio, sr)
    vocals = reference(engine_endpoint, gained, sr)["vocals"]
    want = Reverb(room_size=0.3)(vocals, sr)
    assert out.shape == want.shape
    assert float(np.abs(out - want).max()) <= 1e-5


def _start_engine(endpoint: str, repo, log: Path) -> subprocess.Popen:
    from plugin_bridge.client import Client
    env = dict(os.environ, UNBAKE_REPO=str(repo), UNBAKE_ENDPOINT=endpoint)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "engine.daemon", "--endpoint", endpoint, "--idle-exit-s", "300"],
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(log, "ab"))
    deadline = time.monotonic() + 60
    while True:
        try:
            with Client(endpoint, autostart=False, timeout_s=2, retries=0) as client:
                client.hello()
            return proc
        except Exception:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)


def test_engine_killed_mid_render_then_back(plugin_path, spleeter_repo, tmp_path):
    """The engine killed (SIGKILL) while the plugin renders: the call returns within its bound, no crash,
    silence from where the stems stopped; the log says why. With an engine back at the endpoint, the
    next render (at once, no wait for a background retry) is the stem again."""
    endpoint = f"ipc://{tmp_path}/engine.sock"
    log = tmp_path / "engine.log"
    script = textwrap.dedent(f"""
        import sys, time, numpy as np, pedalboard
        p = pedalboard.load_plugin({str(plugin_path)!r})
        p.accompaniment_mute = True
        x = (0.1 * np.random.default_rng(0).standard_normal((2, 44100 * 60))).astype(np.float32)
        print("LOADED", flush=True)
        t = time.monotonic(); y = p(x, 44100); t = time.monotonic() - t
        nz = np.flatnonzero(np.abs(y).max(0) > 0)
        print("FIRST", t, y.shape, int(nz[-1]) + 1 if nz.size else 0, flush=True)
        sys.stdin.readline()
        t = time.monotonic(); y = p(x[:, :44100 * 3], 44100); t = time.monotonic() - t
        print("SECOND", t, y.shape, float(np.abs(y).max()), flush=True)
    """)
    engine = _start_engine(endpoint, spleeter_repo, log)
    env = dict(os.environ, UNBAKE_ENDPOINT=endpoint, DISPLAY=os.environ.get("DISPLAY") or ":4093")
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().startswith("LOADED")
        time.sleep(1.5)
        engine.kill()
        engine.wait()
        first = child.stdout.readline().split()
        assert first and first[0] == "FIRST", child.stderr.read()[-3000:] if child.poll() is not None else first
        took, rendered = float(first[1]), int(first[-1])
        print(f"killed mid-render: the call returned in {took:.1f} s, stems for {rendered} of 2646000 frames, "
              f"then silence")
        assert took < 40  # one block's bound (30 s) at most, not one per block
        assert rendered < 44100 * 60
        engine = _start_engine(endpoint, spleeter_repo, log)
        # offline, the plugin does not reconnect in the background (a reconnect between two blocks of
        # a render would go on from a fresh stream, or be silence): the next render's reset() does
        child.stdin.write("go\n")
        child.stdin.flush()
        second = child.stdout.readline().split()
        assert second and second[0] == "SECOND", second
        print(f"engine back: the next render took {float(second[1]):.1f} s, peak {float(second[-1]):.3g}")
        child.stdin.close()
        assert child.wait(timeout=60) == 0
        err = child.stderr.read()
        assert float(second[-1]) > 0, err  # processing resumed
        assert "went away" in err  # the log says why
    finally:
        if child.poll() is None:
            child.kill()
        if engine.poll() is None:
            engine.terminate()
            engine.wait(timeout=15)


def status_node(p) -> dict:
    return dict(plugin_state(p.raw_state)[1].find("engine_status").attrib)


def test_a_model_the_engine_cannot_load_is_silence_then_back(plugin, engine_endpoint):
    """The model parameter names a model whose weights the engine lacks (htdemucs here): the engine's
    error is silence within a bound, not a hang, no latency claimed, and the status says why; back on
    spleeter-2stems, the stems and the latency come back (the session reopened before the host read
    the latency: the output is exact)."""
    sr = 44100
    audio = music(sr, 1.0, seed=11)
    solo(plugin, "vocals")
    plugin.model = "htdemucs"
    t = time.monotonic()
    out = plugin(audio, sr)
    took = time.monotonic() - t
    status = status_node(plugin)
    print(f"htdemucs without weights: silence after {took:.1f} s; status {status}")
    assert out.shape == audio.shape and not out.any() and took < 60
    assert plugin.reported_latency_samples == 0 and status["latency_samples"] == "0"
    assert status["connected"] == "0" and status["model"] == "htdemucs" and "engine error" in status["line"]
    plugin.model = MODEL
    out = plugin(audio, sr)
    assert plugin.reported_latency_samples == engine_latency(engine_endpoint, sr, 2)
    assert out.shape == audio.shape
    assert float(np.abs(out - reference(engine_endpoint, audio, sr)["vocals"]).max()) <= 1e-5
    assert status_node(plugin)["connected"] == "1"


def test_model_change_re_reports_the_latency(plugin, engine_endpoint):
    """A change of the model parameter between renders: the plugin's listener asks for a new session,
    its background thread opens it (no render, no prepare) and sets the new latency (its state's
    status node shows it at once; JUCE's wrapper tells the host through an asynchronous
    restartComponent, which pedalboard, never running its message loop, takes at its next prepare:
    the next render reports it and is exact)."""
    sr = 44100
    audio = music(sr, 1.0, seed=13)
    solo(plugin, "vocals")
    plugin(audio, sr)
    latency = engine_latency(engine_endpoint, sr, 2)
    assert plugin.reported_latency_samples == latency

    def wait_for(model, want, timeout_s=30.0):
        t = time.monotonic()
        while time.monotonic() - t < timeout_s:
            status = status_node(plugin)
            if status["model"] == model and status["latency_samples"] == str(want):
                break
            time.sleep(0.05)
        return time.monotonic() - t, status

    plugin.model = "htdemucs"
    took, status = wait_for("htdemucs", 0)
    print(f"model -> htdemucs (no weights), no render: after {took:.2f} s the status is {status}")
    assert status["model"] == "htdemucs" and status["latency_samples"] == "0" and status["connected"] == "0"
    assert "engine error" in status["line"] and "htdemucs" in status["line"]
    out = plugin(audio, sr)
    assert plugin.reported_latency_samples == 0 and not out.any()

    plugin.model = MODEL
    took, status = wait_for(MODEL, latency)
    print(f"model -> {MODEL}, no render: after {took:.2f} s the status is {status}")
    assert status["latency_samples"] == str(latency) and status["connected"] == "1"
    out = plugin(audio, sr)
    assert plugin.reported_latency_samples == latency
    assert float(np.abs(out - reference(engine_endpoint, audio, sr)["vocals"]).max()) <= 1e-5


def test_no_engine_with_an_engine_command_starts_one(plugin_path, spleeter_repo, tmp_path):
    """No engine at a fresh ipc endpoint and $UNBAKE_EXECUTABLE names `unbake` (here a wrapper that
    runs this checkout's CLI): loading the plugin and rendering starts `unbake serve --endpoint E`
    (detached, logging to engine.log beside the socket), and the render is the stems, exactly."""
    endpoint = f"ipc://{tmp_path}/engine.sock"
    wrapper = tmp_path / "unbake"
    wrapper.write_text(f"#!/bin/sh\nexport PYTHONPATH={str(REPO)!r}${{PYTHONPATH:+:$PYTHONPATH}}\n"
                       f"exec {sys.executable!r} -m plugin_bridge.cli \"$@\"\n")
    wrapper.chmod(0o755)
    script = textwrap.dedent(f"""
        import time, numpy as np, pedalboard
        from plugin_bridge.client import Client
        from tests.plugin_bridge.test_vst3 import MODEL, PLUGIN_OPTIONS, music, solo
        t0 = time.monotonic()
        p = pedalboard.load_plugin({str(plugin_path)!r})
        solo(p, "vocals")
        x = music(44100, 2.0)
        y = p(x, 44100)
        took = time.monotonic() - t0
        with Client({endpoint!r}, autostart=False, timeout_s=60) as c:
            pid = c.hello()["pid"]
            want = c.separate(x, 44100, MODEL, **PLUGIN_OPTIONS)["vocals"]
        print("RESULT", took, pid, p.reported_latency_samples, float(np.abs(y).max()),
              float(np.abs(y - want).max()), flush=True)
    """)
    env = dict(os.environ, UNBAKE_ENDPOINT=endpoint, UNBAKE_EXECUTABLE=str(wrapper), UNBAKE_REPO=str(spleeter_repo),
               DISPLAY=os.environ.get("DISPLAY") or ":4093")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    pid = None
    try:
        proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=240)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
        log = tmp_path / "engine.log"
        assert proc.returncode == 0 and line, (proc.stderr[-3000:], log.read_text()[-2000:] if log.exists() else "")
        _, took, pid, latency, peak, diff = line.split()
        pid = int(pid)
        print(f"autostarted engine (pid {pid}) answered; load + render took {float(took):.1f} s; latency {latency}, "
              f"peak {float(peak):.3g}, max |plugin - Client.separate| {float(diff):.3g}")
        assert int(latency) == 55124 and float(peak) > 0.01 and float(diff) <= 1e-5
        assert "starting the unbake engine at " + endpoint in proc.stdout + proc.stderr
        assert log.exists() and "ready on" in log.read_text()  # its log, beside the socket
    finally:
        if pid is None:  # it may have started all the same: find it by its (private) endpoint
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    if endpoint.encode() in cmdline.read_bytes():
                        pid = int(cmdline.parent.name)
                except OSError:
                    pass
        if pid is not None:
            os.kill(pid, 15)
            deadline = time.monotonic() + 15
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, 9)


def test_a_leftover_plugin_is_quiet_at_exit(plugin_path, engine_endpoint, tmp_path):
    """A plugin still alive when the interpreter exits, after the environment that named its endpoint
    changed (as pytest's monkeypatch undoes UNBAKE_ENDPOINT): nothing reaches for another endpoint,
    nothing waits, nothing is printed about a missing engine."""
    script = textwrap.dedent(f"""
        import os, time, numpy as np, pedalboard
        p = pedalboard.load_plugin({str(plugin_path)!r})
        y = p(np.zeros((2, 44100), np.float32), 44100)
        os.environ["UNBAKE_ENDPOINT"] = "ipc://{tmp_path}/nobody-here.sock"
        time.sleep(0.5)
        print("EXITING", p.reported_latency_samples, flush=True)
    """)
    env = dict(os.environ, UNBAKE_ENDPOINT=engine_endpoint, DISPLAY=os.environ.get("DISPLAY") or ":4093")
    env.pop("UNBAKE_EXECUTABLE", None)
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t
    print(f"exited in {took:.1f} s; stderr: {proc.stderr.strip()[-500:]!r}")
    assert proc.returncode == 0 and "EXITING" in proc.stdout, proc.stderr[-3000:]
    assert "no engine at" not in proc.stderr and "nobody-here" not in proc.stderr
    assert took < 30
