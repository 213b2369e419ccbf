"""Peak memory does not grow with the length of the file: `unbake separate` (spleeter-2stems) on a
1-minute and a 20-minute input, each in a fresh process; prints both peak RSS and their ratio.

    .venv/bin/python tests/bench/bench_memory.py
"""
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[2]
SONG = REPO.parent / "shared/eval-audio/real-dev-v1/cristina-vane-so-easy/mixture.wav"


def make_input(path: Path, minutes: float) -> None:
    """A real song looped to ``minutes``, written block by block (PCM16 stereo 44.1 kHz)."""
    data, sr = sf.read(str(SONG), dtype="float32")
    total = int(minutes * 60 * sr)
    with sf.SoundFile(str(path), "w", sr, 2, subtype="PCM_16") as f:
        done = 0
        while done < total:
            n = min(len(data), total - done)
            f.write(data[:n])
            done += n


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{cmd} failed ({status})")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0  # Linux: KiB


def main():
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for minutes in (1, 20):
            src = Path(tmp) / f"{minutes}min.wav"
            make_input(src, minutes)
            rss, secs = peak_rss_mb([sys.executable, "-m", "plugin_bridge.cli", "separate", "-q",
                                     "-n", "spleeter-2stems", "-o", str(Path(tmp) / "out"), str(src)])
            results[minutes] = rss
            print(f"{minutes:>2}-minute input: peak RSS {rss:.0f} MB, {secs:.1f} s")
            src.unlink()
        print(f"ratio 20-minute / 1-minute peak RSS: {results[20] / results[1]:.2f} (must be <= 1.5)")


if __name__ == "__main__":
    main()
