"""Benchmark: a song through today's warm daemon against the daemon of an earlier commit (issue 15's
second bar: HT-Demucs through the daemon against the engine before issue 15, commit c68ac4b).

Run with ``python tests/bench/bench_daemon_ab.py [--model htdemucs] [--baseline c68ac4b] [--runs 5]
[--seconds 30]`` (not collected by pytest). The baseline's engine is checked out with ``git worktree``
into a temporary folder and run by the same Python; both daemons are real processes on ipc://
sockets, started with the same weights preloaded (``htdemucs``: official-size random weights in the
official package format, ``bench0ht``). After one warm-up request each, requests alternate
(today, baseline, ...); prints each daemon's median wall time per request (Client.separate, the
transfers included), the ratio today / baseline (medians, and per pair), and each stem's relative
error and max abs difference between the two.
"""
from __future__ import annotations

import argparse
import shutil
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

from tests.bench.bench_daemon_overhead import load_song  # noqa: E402
from tests.bench.bench_models import CHOICES, bench_model  # noqa: E402

BEFORE_ISSUE_15 = "c68ac4b"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="htdemucs", choices=CHOICES)
    parser.add_argument("--baseline", default=BEFORE_ISSUE_15, help="the commit whose daemon is the reference")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()

    from plugin_bridge.client import Client
    from tests.engine.engine_proc import EngineProcess

    tmp = Path(tempfile.mkdtemp(prefix="unbake-bench-ab-"))
    tree = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), args.baseline],
                   check=True)
    engines = {}
    try:
        repo, name = bench_model(args.model, tmp)
        mix, sr = load_song(args.seconds)
        for label, cwd in (("today", ROOT), (f"baseline {args.baseline}", tree)):
            engines[label] = EngineProcess(f"ipc://{tmp}/{len(engines)}.sock", "--preload", name, "--repo", repo,
                                           log=tmp / f"daemon{len(engines)}.log", cwd=cwd).start(timeout_s=600)
        times = {label: [] for label in engines}
        outs = {}
        clients = {label: Client(e.endpoint, autostart=False, timeout_s=600) for label, e in engines.items()}
        try:
            for label, client in clients.items():  # warm-up: the first session's buffers and pages
                outs[label] = client.separate(mix, sr, name)
            for _ in range(args.runs):
                for label, client in clients.items():
                    t0 = time.perf_counter()
                    outs[label] = client.separate(mix, sr, name)
                    times[label].append(time.perf_counter() - t0)
        finally:
            for client in clients.values():
                client.close()
    finally:
        for e in engines.values():
            e.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    today, base = list(times)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {name} ({args.model}), {args.seconds:g} s stereo {sr} Hz, {args.runs} requests each, alternating")
    for k, v in times.items():
        print(f"  {k:<20} median {med[k]:.2f} s  runs {', '.join(f'{t:.2f}' for t in v)}")
    pairs = [a / b for a, b in zip(times[today], times[base])]
    print(f"  ratio today / baseline: {med[today] / med[base]:.3f} (medians); per pair "
          f"{', '.join(f'{r:.3f}' for r in pairs)} (median {statistics.median(pairs):.3f})")
    for stem in outs[base]:
        a, b = outs[today][stem], outs[base][stem]
        print(f"  {stem:<8} rel.err {np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30):.2e}  "
              f"max abs {np.abs(a - b).max():.2e}")


if __name__ == "__main__":
    main()
