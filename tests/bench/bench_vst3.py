"""Benchmark: an offline render through the unbake VST3 (hosted by pedalboard) vs Client.separate of
the same audio, same engine, same model, same session options (the plugin's: 1 s segments, 4 s past
context, 0.25 s lookahead; ``PLUGIN_OPTIONS``).

Run with ``python tests/bench/bench_vst3.py [--seconds 90] [--runs 3]`` (not collected by pytest)
after ``install/build_vst3.sh``. The engine is a real process on a private ipc:// socket. Runs
alternate (plugin, client, ...); prints the median of each and the ratio plugin / client (the bar:
<= 1.05), the max difference of the outputs, and for scale Client.separate with the engine's
default (offline) grid. The plugin renders ``reported_latency_samples`` more frames than the song:
pedalboard feeds that much silence after it to flush the latency (1.25 s at 44.1 kHz).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

SONGS = ROOT.parent / "shared/eval-audio/real-dev-v1"
PLUGIN = ROOT / "plugin_bridge/vst3/build/unbake_artefacts/Release/VST3/unbake.vst3"
# the plugin's session options (plugin_bridge/vst3/Source: kSessionOptions)
PLUGIN_OPTIONS = {"segment_s": 1.0, "overlap": 0.25, "context_s": 4.0, "lookahead_s": 0.25}


def song(seconds: float) -> tuple[np.ndarray, int]:
    """``seconds`` of the dev songs one after the other (../shared), else a synthetic tone."""
    if SONGS.is_dir():
        import soundfile as sf
        parts, need = [], int(seconds * 44100)
        for mix in sorted(SONGS.glob("*/mixture.wav")):
            data, sr = sf.read(str(mix), dtype="float32", always_2d=True)
            parts.append(data.T)
            need -= data.shape[0]
            if need <= 0:
                break
        audio = np.concatenate(parts, axis=1)[:, :int(seconds * 44100)]
        return np.ascontiguousarray(audio), 44100
    sr = 44100
    t = np.arange(int(seconds * sr)) / sr
    x = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.02 * np.random.default_rng(0).standard_normal(t.size)
    return np.stack([x, x]).astype(np.float32), sr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("DISPLAY", ":4093")  # JUCE headless (see tests/plugin_bridge/test_vst3.py)

    from engine import weights
    from plugin_bridge.client import Client
    weights.fetch("spleeter-2stems")
    tmp = tempfile.mkdtemp(prefix="bench-vst3-")
    endpoint = f"ipc://{tmp}/engine.sock"
    env = dict(os.environ, UNBAKE_REPO=str(weights.repo_dir()), UNBAKE_ENDPOINT=endpoint,
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    engine = subprocess.Popen([sys.executable, "-m", "engine.daemon", "--endpoint", endpoint, "--idle-exit-s", "600"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/engine.log", "wb"))
    try:
        while True:
            try:
                with Client(endpoint, autostart=False, timeout_s=2, retries=0) as c:
                    c.hello()
                break
            except Exception:
                time.sleep(0.2)
        os.environ["UNBAKE_ENDPOINT"] = endpoint
        import pedalboard
        audio, sr = song(args.seconds)
        p = pedalboard.load_plugin(str(PLUGIN))
        p.accompaniment_mute = True
        client = Client(endpoint, autostart=False, timeout_s=120)
        client.separate(audio[:, :sr], sr, "spleeter-2stems", **PLUGIN_OPTIONS)  # warm: model loaded
        p(audio[:, :sr], sr)
        t_plugin, t_client, t_default = [], [], []
        for _ in range(args.runs):
            t = time.perf_counter(); out = p(audio, sr); t_plugin.append(time.perf_counter() - t)
            t = time.perf_counter(); ref = client.separate(audio, sr, "spleeter-2stems", **PLUGIN_OPTIONS)
            t_client.append(time.perf_counter() - t)
            t = time.perf_counter(); client.separate(audio, sr, "spleeter-2stems"); t_default.append(time.perf_counter() - t)
        client.close()
        mp, mc, md = (statistics.median(t) for t in (t_plugin, t_client, t_default))
        latency = p.reported_latency_samples
        print(f"song: {audio.shape[1] / sr:.1f} s at {sr} Hz; plugin latency {latency} samples ({1000 * latency / sr:.0f} ms)")
        print(f"plugin (pedalboard one-shot) median {mp:.2f} s, Client.separate (same options) median {mc:.2f} s, "
              f"ratio plugin / client {mp / mc:.3f} ({args.runs} runs each; bar <= 1.05)")
        print(f"for scale: Client.separate with the offline default grid {md:.2f} s (plugin / that {mp / md:.3f}: "
              f"past context puts each second through the network about "
              f"{(PLUGIN_OPTIONS['context_s'] + PLUGIN_OPTIONS['segment_s'] + PLUGIN_OPTIONS['lookahead_s']) / (PLUGIN_OPTIONS['segment_s'] * (1 - PLUGIN_OPTIONS['overlap'])):.1f} times)")
        print(f"audio through the network: plugin {(audio.shape[1] + latency) / sr:.1f} s, client {audio.shape[1] / sr:.1f} s")
        print(f"max |plugin - Client.separate| (vocals): {float(np.abs(out - ref['vocals']).max()):.3g}")
    finally:
        engine.terminate()
        engine.wait(timeout=30)


if __name__ == "__main__":
    main()
