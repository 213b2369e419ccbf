"""The VST3's editor (plugin_bridge/vst3/Source/PluginEditor), drawn for real: ``unbake_editor_snapshot``
(plugin_bridge/vst3/tools) builds the plugin's processor and editor from the same sources, prepares the
processor as a host does (a session with the real engine of ``engine_endpoint``), lets the editor's
4 Hz timer run and writes the editor as a PNG (JUCE's createComponentSnapshot, under Xvfb when
installed, else headless); it prints
the engine status the editor shows as one JSON line. pedalboard's ``show_editor()`` is not needed.

The build: ``install/build_vst3.sh`` (as test_vst3.py) then the tool's target (not built by default);
skipped, saying why, only when the build dependencies are missing and cannot be installed.
"""
import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.plugin_bridge.test_vst3 import PLUGIN_OPTIONS, plugin_path  # noqa: F401 (a fixture: the VST3, built)

MODEL = "spleeter-2stems"
BUILD_DIR = REPO / "plugin_bridge" / "vst3" / "build"
TOOL = BUILD_DIR / "unbake_editor_snapshot_artefacts" / "Release" / "unbake_editor_snapshot"
STEMS = ("vocals", "drums", "bass", "other", "guitar", "piano", "accompaniment")
WIDTH, HEIGHT = 560, 420
CONNECTED_GREEN = (0x5C, 0xC9, 0x82)  # palette::good in PluginEditor.cpp ("● connected")
NOT_CONNECTED_RED = (0xE8, 0x6F, 0x5E)  # palette::bad ("● not connected", and the mute ticks)


@pytest.fixture(scope="session")
def snapshot_tool(plugin_path) -> Path:
    """unbake_editor_snapshot, built in the plugin's build folder (once the plugin is: plugin_path)."""
    jobs = os.environ.get("UNBAKE_VST3_JOBS", "2")
    proc = subprocess.run(["cmake", "--build", str(BUILD_DIR), "--config", "Release", "--target",
                           "unbake_editor_snapshot", "-j", jobs], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert TOOL.is_file(), proc.stdout[-2000:]
    return TOOL


def read_png(path: Path) -> np.ndarray:
    """A non-interlaced 8-bit RGB/RGBA PNG (what JUCE writes) as uint8 [height, width, channels]."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    out = np.zeros((height, stride), np.int32)
    prev = np.zeros(stride, np.int32)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        if f == 0:
            cur = line
        elif f == 2:
            cur = (line + prev) & 255
        else:  # Sub, Average, Paeth: each byte depends on the one bpp before it
            cur = line.copy()
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                b = prev[x]
                if f == 1:
                    cur[x] = (cur[x] + a) & 255
                elif f == 3:
                    cur[x] = (cur[x] + (a + b) // 2) & 255
                else:
                    c = prev[x - bpp] if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[x] = (cur[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out[y] = cur
        prev = cur
    return out.reshape(height, width, bpp).astype(np.uint8)


def run_tool(tool: Path, out: Path, endpoint: str, *args: str, timeout: float = 90) -> dict:
    cmd = [str(tool), "--out", str(out), "--endpoint", endpoint, *args]
    env = dict(os.environ)
    if shutil.which("xvfb-run"):
        cmd = ["xvfb-run", "-a", *cmd]
    else:
        # createComponentSnapshot needs no window: without Xvfb, a display that does not exist keeps
        # JUCE headless (an X server of someone else on :0 that goes away would take the tool with it)
        env["DISPLAY"] = ":4093"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def pixels_near(img: np.ndarray, rgb, tol: int = 12) -> int:
    return int((np.abs(img[..., :3].astype(int) - np.array(rgb)).max(axis=-1) <= tol).sum())


def row_peak(img: np.ndarray, bounds) -> float:
    """The brightest pixel (mean of R, G, B) inside ``bounds`` ([x, y, w, h])."""
    x, y, w, h = bounds
    return float(img[y:y + h, x:x + w, :3].astype(float).mean(axis=-1).max())


def test_editor_snapshot_connected(snapshot_tool, engine_endpoint, tmp_path):
    from plugin_bridge.client import Client
    with Client(engine_endpoint, autostart=False, timeout_s=60) as client:
        device = client.hello()["device"]
        stream = client.stream(MODEL, 44100, 2, **PLUGIN_OPTIONS)
        latency = stream.latency_samples
        stream.cancel()
    png = tmp_path / "editor.png"
    st = run_tool(snapshot_tool, png, engine_endpoint, "--rate", "44100", "--channels", "2",
                  "--set", "vocals_gain_db=-6", "--set", "drums_mute=1",
                  "--type", "engine_command=unbake serve --device cpu")
    print("editor status:", json.dumps(st))

    assert st["connected"] is True, st["line"]
    assert st["endpoint"] == engine_endpoint
    assert st["model"] == MODEL and st["device"] == device
    assert st["stems"] == ["vocals", "accompaniment"]
    # offline (as pedalboard renders): the reported latency is the engine's, at the host's rate
    assert st["latency_samples"] == latency > 0
    assert st["sample_rate"] == 44100 and st["late_frames"] == 0
    # the stems spleeter-2stems lacks are dimmed; accompaniment always acts (everything but vocals)
    assert st["dimmed"] == ["drums", "bass", "other", "guitar", "piano"]
    lacking = ("drums", "bass", "other", "guitar", "piano")
    assert st["stem_tooltips"] == {s: f"not in {MODEL}" if s in lacking else "" for s in STEMS}
    assert st["model_shown"] == MODEL  # the combo box shows the "model" parameter
    # typed into the field + Return: the processor's setting (the state)
    assert st["engine_command_setting"] == "unbake serve --device cpu"
    assert st["endpoint_setting"] == engine_endpoint

    assert (st["editor_width"], st["editor_height"]) == (WIDTH, HEIGHT)
    img = read_png(png)
    assert img.shape[:2] == (HEIGHT, WIDTH) == (st["png_height"], st["png_width"])
    assert float(img[..., :3].astype(float).std()) > 10  # drawn, not blank
    assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 50  # text, controls, panels
    assert pixels_near(img, CONNECTED_GREEN) > 30  # "● connected" is drawn in green
    # dimmed rows are drawn dim: their brightest pixels (text, thumb) at most half as bright as an
    # active row's (measured: 118 against 255)
    peak = {s: row_peak(img, st["stem_rows"][s]) for s in STEMS}
    print("brightest pixel per stem row:", peak)
    for s in STEMS:
        assert (peak[s] < 140) if s in lacking else (peak[s] > 220), (s, peak[s])


def test_editor_snapshot_no_engine(snapshot_tool, tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody-here.sock"
    png = tmp_path / "editor.png"
    other = f"ipc://{tmp_path}/somewhere-else.sock"
    st = run_tool(snapshot_tool, png, endpoint, "--wait-s", "0", "--set", "model=htdemucs_6s",
                  "--type", f"endpoint={other}", timeout=60)
    print("editor status:", json.dumps(st))
    assert st["connected"] is False
    # the first endpoint, or already the one typed (a new endpoint opens a new session at once)
    assert f"no engine at {endpoint}" in st["line"] or f"no engine at {other}" in st["line"], st["line"]
    assert st["model_shown"] == "htdemucs_6s"
    # the endpoint typed into the editor is the state's (the next session's) endpoint
    assert st["endpoint_setting"] == other and st["endpoint"] == other
    assert st["latency_samples"] == 0 and st["stems"] == []
    assert st["dimmed"] == []  # nothing is known to be missing without a model
    img = read_png(png)
    assert img.shape[:2] == (HEIGHT, WIDTH)
    assert float(img[..., :3].astype(float).std()) > 10
    assert pixels_near(img, NOT_CONNECTED_RED) > 30 and pixels_near(img, CONNECTED_GREEN) == 0
    assert all(row_peak(img, st["stem_rows"][s]) > 220 for s in STEMS)  # none dimmed
    assert all(tip == "" for tip in st["stem_tooltips"].values())
