"""Latency a DAW accepts at offline quality (issue 13 item 6): spleeter-2stems on the dev songs with
short segments, with and without past context (engine.apply's past-context rule), against the
offline default, measured in one run.

    .venv/bin/python tests/bench/bench_latency_quality.py [--dir ../shared/eval-audio/real-dev-v1]

Each row: the session options, the latency a stream states at 44.1 kHz (samples and ms), mean
global SDR (vocals / accompaniment) and the difference to the offline default, and the speed in x
real time on this machine. The bar (the plugin's default row): latency <= 1.5 s at 44.1 and 48 kHz (in real time, with the
plugin's compute margin) and within 0.15 dB of the offline default; exit status 1 when missed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from engine.evaluate import evaluate  # noqa: E402
from engine.sessions import TrackSeparator  # noqa: E402

REALTIME_MARGIN_S = 0.24  # the plugin's own buffering in real time (Parameters.h kRealtimeMarginS)
CONFIGS = [
    ("offline default (34 s segments)", {}),
    ("segment 1 s, centred", {"segment_s": 1.0}),
    ("segment 2 s, centred", {"segment_s": 2.0}),
    ("segment 4 s, centred", {"segment_s": 4.0}),
    ("plugin default: seg 1 s, ctx 4 s, look 0.25 s", {"segment_s": 1.0, "overlap": 0.25, "context_s": 4.0,
                                                     "lookahead_s": 0.25}),
    ("segment 1 s, context 4 s, lookahead 0.45 s", {"segment_s": 1.0, "overlap": 0.25, "context_s": 4.0,
                                                     "lookahead_s": 0.45}),
    ("segment 0.5 s, context 4 s, lookahead 0.5 s", {"segment_s": 0.5, "overlap": 0.25, "context_s": 4.0,
                                                      "lookahead_s": 0.5}),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=str(REPO.parent / "shared/eval-audio/real-dev-v1"))
    args = p.parse_args(argv)
    from engine.registry import load_model
    model = load_model("spleeter-2stems")
    root = Path(args.dir)
    evaluate(model, root, log=lambda s: None)  # warm-up
    print(f"{'options':<46} {'latency':>16} {'vocals':>7} {'acc':>7} {'dV':>7} {'dA':>7} {'speed':>7}")
    base = None
    for label, options in CONFIGS:
        latency = TrackSeparator(model, 44100, 2, **options).latency_samples
        t0 = time.perf_counter()
        result = evaluate(model, root, log=lambda s: None, **options)
        rtf = result["audio_seconds"] / (time.perf_counter() - t0)
        v, a = result["mean"]["vocals"], result["mean"]["accompaniment"]
        base = base or (v, a)
        lat = "offline" if not options else f"{latency} ({1000 * latency / 44100:.0f} ms)"
        if label.startswith("plugin default"):
            at48 = TrackSeparator(model, 48000, 2, **options).latency_samples
            plugin_row = (latency, at48, v - base[0], a - base[1])
        print(f"{label:<46} {lat:>16} {v:7.3f} {a:7.3f} {v - base[0]:+7.3f} {a - base[1]:+7.3f} {rtf:6.1f}x",
              flush=True)
    lat44, lat48, dv, da = plugin_row
    # in real time the plugin adds its compute margin (plugin_bridge/vst3/Source/Parameters.h)
    rt44, rt48 = lat44 + round(REALTIME_MARGIN_S * 44100), lat48 + round(REALTIME_MARGIN_S * 48000)
    ok = max(rt44 / 44100, rt48 / 48000) <= 1.5 and min(dv, da) >= -0.15
    print(f"plugin default: latency {lat44} samples at 44.1 kHz ({1000 * lat44 / 44100:.1f} ms), {lat48} at 48 kHz "
          f"({1000 * lat48 / 48000:.1f} ms); in real time with its {1000 * REALTIME_MARGIN_S:.0f} ms compute margin "
          f"{rt44} ({1000 * rt44 / 44100:.1f} ms) and {rt48} ({1000 * rt48 / 48000:.1f} ms); "
          f"vocals {dv:+.3f} dB, accompaniment {da:+.3f} dB vs offline: "
          + ("bar met (<= 1.5 s, within 0.15 dB)" if ok else "A BAR IS MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
