"""Benchmark: one spleeter-2stems StemStream fed 100 ms blocks through the daemon, vs real time.

Run with ``python tests/bench/bench_stream.py`` (not collected by pytest). Feeds a 30 s song block
by block (``StemStream.process``), like a host's audio callback would, and prints the speed as a
multiple of real time (audio seconds / wall seconds; the acceptance bar is 5x on 2 cores), the
stated ``latency_samples``, and the max abs difference, after removing the latency, against the
offline result of the same daemon (``Client.separate``). Both the model's default segment (34 s,
what offline uses) and a 1 s segment (a short latency for live use) are measured; then the same
through a ``StemChain`` (reverb on the vocals, compressor on the accompaniment, ``reset=False``)
against its own offline call.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

SONG = ROOT.parent / "shared/eval-audio/real-dev-v1/cristina-vane-so-easy/mixture.wav"
MODEL = "spleeter-2stems"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-ms", type=float, default=100.0)
    args = parser.parse_args()
    from engine import weights
    from plugin_bridge.client import Client
    from tests.engine.engine_proc import EngineProcess
    weights.fetch(MODEL)
    data, sr = sf.read(str(SONG), dtype="float32", always_2d=True)
    mix = np.ascontiguousarray(data.T)
    seconds = mix.shape[1] / sr
    block = int(sr * args.block_ms / 1000)
    tmp = Path(tempfile.mkdtemp(prefix="unbake-stream-"))
    engine = EngineProcess(f"ipc://{tmp}/e.sock", "--preload", MODEL, log=tmp / "daemon.log").start(timeout_s=120)
    print(f"{MODEL}, {SONG.parent.name} ({seconds:.1f} s), blocks of {block} frames ({args.block_ms:g} ms)")
    try:
        with Client(engine.endpoint, autostart=False, timeout_s=60) as client:
            for options in [{}, {"segment_s": 1.0}]:
                offline = client.separate(mix, sr, MODEL, **options)
                stream = client.stream(MODEL, sr, 2, **options)
                outs = []
                t0 = time.perf_counter()
                for pos in range(0, mix.shape[1], block):
                    outs.append(stream.process(mix[:, pos:pos + block]))
                outs.append(stream.flush())
                wall = time.perf_counter() - t0
                lat = stream.latency_samples
                diff = max(float(np.abs(np.concatenate([o[s] for o in outs], axis=1)[:, lat:] - offline[s]).max())
                           for s in offline)
                label = f"segment {options.get('segment_s', 'default')}"
                print(f"  {label:<16} {seconds / wall:6.1f}x real time ({wall:.2f} s), latency {lat} samples "
                      f"({lat / sr:.2f} s), max abs diff vs offline {diff:.1e}")
            from pedalboard import Compressor, Pedalboard, Reverb
            from plugin_bridge import StemChain

            def chains():
                return {"vocals": Pedalboard([Reverb(room_size=0.6)]), "accompaniment": Compressor(threshold_db=-18)}
            options = {"segment_s": 1.0}
            offline = StemChain(chains(), MODEL, client=client, **options)(mix, sr)
            chain = StemChain(chains(), MODEL, client=client, **options)
            outs = []
            t0 = time.perf_counter()
            for pos in range(0, mix.shape[1], block):
                outs.append(chain(mix[:, pos:pos + block], sr, reset=False))
            outs.append(chain.flush())
            wall = time.perf_counter() - t0
            lat = chain.latency_samples
            diff = float(np.abs(np.concatenate(outs, axis=1)[:, lat:] - offline).max())
            print(f"  {'StemChain, 1 s':<16} {seconds / wall:6.1f}x real time ({wall:.2f} s), latency {lat} samples "
                  f"({lat / sr:.2f} s), max abs diff vs offline {diff:.1e}")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
