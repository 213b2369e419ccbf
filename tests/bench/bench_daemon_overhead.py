"""Benchmark: a 30 s song through the daemon (Client.separate) vs in process, same model, same options.

Run with ``python tests/bench/bench_daemon_overhead.py [--model spleeter-2stems|htdemucs]`` (not
collected by pytest). The daemon is a real process on an ipc:// socket, started with the model
preloaded; the in-process run loads the same weights through the same code path
(``engine.registry.load_model``) in this process. Runs alternate (daemon, in-process, ...); prints
the median of each, the ratio daemon / in-process (the daemon's overhead: transfers, scheduling)
and the max abs difference between the two outputs. ``htdemucs`` uses random weights of the
official size written in the official package format (the real ones cannot be downloaded here).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.bench.bench_models import CHOICES, bench_model  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

SONG = ROOT.parent / "shared/eval-audio/real-dev-v1/cristina-vane-so-easy/mixture.wav"


def load_song(seconds: float) -> tuple[np.ndarray, int]:
    data, sr = sf.read(str(SONG), dtype="float32", always_2d=True, frames=int(seconds * 44100))
    return np.ascontiguousarray(data.T), sr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="spleeter-2stems", choices=CHOICES)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()

    from engine.registry import load_model
    from engine.sessions import separate_array
    from plugin_bridge.client import Client
    from tests.engine.engine_proc import EngineProcess

    tmp = Path(tempfile.mkdtemp(prefix="unbake-bench-"))
    repo, name = bench_model(args.model, tmp)
    mix, sr = load_song(args.seconds)
    model = load_model(name, repo=repo)
    engine = EngineProcess(f"ipc://{tmp}/e.sock", "--preload", name, "--repo", repo, log=tmp / "daemon.log")
    engine.start(timeout_s=300)
    times = {"daemon": [], "in-process": []}
    try:
        with Client(engine.endpoint, autostart=False, timeout_s=120) as client:
            client.separate(mix[:, :sr], sr, name)  # first session: connection, buffers
            separate_array(model, mix[:, :sr], sr)
            for _ in range(args.runs):
                t0 = time.perf_counter()
                via_daemon = client.separate(mix, sr, name)
                times["daemon"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                local = separate_array(model, mix, sr)
                times["in-process"].append(time.perf_counter() - t0)
            status = client.status()
    finally:
        engine.stop()
    diff = max(float(np.abs(via_daemon[s] - local[s]).max()) for s in local)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {name} ({args.model}), {args.seconds:.0f} s stereo {sr} Hz, {args.runs} runs, "
          f"{os.cpu_count()} CPUs, daemon device {status['device']}")
    for k, v in times.items():
        print(f"  {k:<10} median {med[k]:.3f} s  runs {', '.join(f'{t:.3f}' for t in v)}")
    print(f"  ratio daemon / in-process: {med['daemon'] / med['in-process']:.3f} (medians), "
          f"{min(times['daemon']) / min(times['in-process']):.3f} (best runs)")
    print(f"  max abs diff daemon vs in-process: {diff:.2e}")


if __name__ == "__main__":
    main()
