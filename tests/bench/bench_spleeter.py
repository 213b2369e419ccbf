"""Spleeter speed: x real time once warm (median of 3) and cold start (process start to stems written).

    .venv/bin/python tests/bench/bench_spleeter.py [SONG.wav]

The TensorFlow reference cannot run here (no TensorFlow); its figures on these 2-core machines are
in ../shared/reference/README.md: 12-14x real time warm (30 s in 2.1-2.5 s), 5.8 s cold.
"""
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
SONG = REPO.parent / "shared/eval-audio/real-dev-v1/cristina-vane-so-easy/mixture.wav"
REF_WARM_X = (12.0, 14.0)
REF_COLD_S = 5.8


def main():
    song = Path(sys.argv[1]) if len(sys.argv) > 1 else SONG
    from engine.registry import load_model
    from engine.sessions import separate_array
    mix, sr = sf.read(str(song), dtype="float32", always_2d=True)
    mix = np.ascontiguousarray(mix.T)
    seconds = mix.shape[1] / sr
    model = load_model("spleeter-2stems")
    separate_array(model, mix[:, : sr * 2], sr)  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        separate_array(model, mix, sr)
        times.append(time.perf_counter() - t0)
    warm = statistics.median(times)
    x_rt = seconds / warm
    print(f"warm: {seconds:.1f} s of stereo audio in {warm:.2f} s (median of 3) = {x_rt:.1f}x real time; "
          f"reference 12-14x -> ratio {x_rt / REF_WARM_X[1]:.2f}-{x_rt / REF_WARM_X[0]:.2f}x the reference")
    colds = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "plugin_bridge.cli", "separate", "-q", "-n", "spleeter-2stems",
                            "-o", out, str(song)], check=True, cwd=REPO)
            colds.append(time.perf_counter() - t0)
    cold = statistics.median(colds)
    print(f"cold: process start to stems written {cold:.2f} s (median of 3); reference {REF_COLD_S} s -> "
          f"{REF_COLD_S / cold:.2f}x faster")


if __name__ == "__main__":
    main()
