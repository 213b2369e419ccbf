"""Benchmark: ``unbake serve --ray`` on a real two-node Ray cluster on this machine (tests/ray_cluster.py).

Run with ``python tests/bench/bench_ray.py [--model spleeter-2stems|htdemucs] [--rounds 3]`` (not
collected by pytest). Three engines, each a real process on an ipc:// socket, models preloaded:

- ``ray x2``: ``--ray ADDRESS --replicas 2 --replica-threads 1`` (one replica on each node)
- ``ray x1``: ``--ray ADDRESS --replicas 1 --replica-threads 1``
- ``local``: ``--jobs 1`` (no Ray; the same threads as one replica)

Throughput: 4 concurrent ``Client.separate`` of the 30 s song on ``ray x2`` vs ``ray x1`` (the
issue's bar: ratio <= 0.6). Overhead: one session on ``ray x1`` vs ``local`` (bar: <= 1.10).
Rounds alternate between the engines; medians and ratios are printed, with the max |diff| of every
output against the local engine's. ``htdemucs`` uses random weights of the official size in the
official package format. The nodes are given 2 logical CPUs each so that all three engines' replicas
fit at once; each replica still runs one torch thread.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.bench.bench_models import CHOICES, bench_model  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

SONG = ROOT.parent / "shared/eval-audio/real-dev-v1/cristina-vane-so-easy/mixture.wav"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="spleeter-2stems", choices=CHOICES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--sessions", type=int, default=4)
    args = parser.parse_args()

    from plugin_bridge.client import Client
    from tests.engine.engine_proc import EngineProcess
    from tests.ray_cluster import ray_env, two_node_cluster

    tmp = Path(tempfile.mkdtemp(prefix="unbake-bench-ray-"))
    repo, name = bench_model(args.model, tmp)
    data, sr = sf.read(str(SONG), dtype="float32", always_2d=True, frames=int(args.seconds * 44100))
    mix = np.ascontiguousarray(data.T)

    def separate(endpoint: str) -> dict:
        with Client(endpoint, timeout_s=600) as client:
            return client.separate(mix, sr, name)

    def concurrent(endpoint: str) -> tuple[float, list]:
        outs: list = [None] * args.sessions

        def one(i: int) -> None:
            outs[i] = separate(endpoint)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.sessions)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0, outs

    def timed(endpoint: str) -> tuple[float, list]:
        t0 = time.perf_counter()
        out = separate(endpoint)
        return time.perf_counter() - t0, [out]

    with two_node_cluster(cpus_per_node=2) as address:
        env = {"UNBAKE_REPO": str(repo), **ray_env(address)}
        engines = {
            "ray x2": EngineProcess(f"ipc://{tmp}/r2.sock", "--ray", address, "--replicas", "2", "--preload", name,
                                    env=env, log=tmp / "r2.log"),
            "ray x1": EngineProcess(f"ipc://{tmp}/r1.sock", "--ray", address, "--replicas", "1", "--preload", name,
                                    env=env, log=tmp / "r1.log"),
            "local": EngineProcess(f"ipc://{tmp}/l.sock", "--jobs", "1", "--preload", name, env=env,
                                   log=tmp / "l.log"),
        }
        with ExitStack() as running:  # every engine started is stopped (EngineProcess.__exit__), also on failure
            for e in engines.values():
                running.push(e.__exit__)
                e.start(timeout_s=300)
            want = separate(engines["local"].endpoint)
            for e in engines.values():  # warm: first-call allocations, replicas' networks
                separate(e.endpoint)
            times: dict[str, list[float]] = {k: [] for k in ("4 on ray x2", "4 on ray x1", "1 on ray x1", "1 on local")}
            diff = 0.0
            for _ in range(args.rounds):
                for label, engine, fn in (("4 on ray x2", "ray x2", concurrent), ("4 on ray x1", "ray x1", concurrent),
                                          ("1 on ray x1", "ray x1", timed), ("1 on local", "local", timed)):
                    secs, outs = fn(engines[engine].endpoint)
                    times[label].append(secs)
                    for out in outs:
                        diff = max(diff, max(float(np.abs(out[k] - want[k]).max()) for k in want))
            nodes = {r["node"] for r in engines["ray x2"].status()["replicas"]}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {name}, {args.seconds:g} s song, {args.rounds} alternating rounds, replicas of 1 thread; "
          f"ray x2 replicas on {len(nodes)} nodes")
    for k, v in times.items():
        print(f"  {k:<12} median {med[k]:7.2f} s  ({', '.join(f'{t:.2f}' for t in v)})")
    print(f"throughput: {args.sessions} sessions, 2 replicas / 1 replica: ratio {med['4 on ray x2'] / med['4 on ray x1']:.3f}"
          f" (bar <= 0.6)")
    print(f"overhead: 1 session, ray 1 replica / local 1 thread: ratio {med['1 on ray x1'] / med['1 on local']:.3f}"
          f" (bar <= 1.10)")
    print(f"max |diff| of every output vs the local engine: {diff:g}")


if __name__ == "__main__":
    main()
