"""Benchmark: 4 tools separating 4 songs at the same time, sharing one daemon vs each in its own process.

Run with ``python tests/bench/bench_sharing.py [--tool cli|array|both] [--model spleeter-2stems|htdemucs]``
(not collected by pytest). Each tool is a process that separates one song file into stem files with
the model (spleeter-2stems by default; ``htdemucs`` is the official-size HT-Demucs with random
weights, the product's default model where its weights are installed); two kinds:

- ``cli`` (the main job): ``unbake separate SONG -o OUT -n spleeter-2stems --float32``, shared
  through the daemon (no torch in the tool; the file is streamed in blocks) vs
  ``--in-process`` (the model loaded in the tool).
- ``array``: the tool reads the whole song into memory (soundfile), calls
  ``plugin_bridge.client.Client.separate`` (shared) or ``engine.sessions.separate_array`` (in
  process, ``engine.registry.load_model``) and writes the stems (soundfile).

Memory is the sum of the peak RSS of every process involved (the daemon's own peak included);
time is the wall time from starting the 4 tools until the last one has written its stems. The
shared case is measured with a daemon that is already warm (the product's normal state) and also
counting a cold daemon start (the embedded daemon started by the first tool).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.bench.bench_models import bench_model  # noqa: E402

EVAL = ROOT.parent / "shared/eval-audio/real-dev-v1"
MODEL = "spleeter-2stems"


def peak_rss_bytes() -> int:
    """VmHWM, as engine.heap.peak_rss_bytes (not imported here: it would add to the tool's RSS).
    Not ru_maxrss: a spawned child's includes the RSS of this bench process it was exec'd from."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(mode: str, song: str, out: str, endpoint: str | None, model: str, repo: str) -> None:
    """One tool: read, separate, write; prints {"peak_rss_mb", "seconds"} as JSON."""
    t0 = time.perf_counter()
    if mode.startswith("cli-"):
        from plugin_bridge import cli
        argv = ["separate", song, "-o", out, "-n", model, "--repo", repo, "--float32", "-q"]
        argv += ["--in-process"] if mode == "cli-inprocess" else ["--endpoint", endpoint]
        if cli.main(argv):
            raise SystemExit(f"unbake {' '.join(argv)} failed")
        print(json.dumps({"peak_rss_mb": peak_rss_bytes() / 2 ** 20,
                          "seconds": time.perf_counter() - t0, "torch": "torch" in sys.modules}))
        return
    import numpy as np
    import soundfile as sf
    data, sr = sf.read(song, dtype="float32", always_2d=True)
    mix = np.ascontiguousarray(data.T)
    if mode == "client":
        from plugin_bridge.client import Client
        with Client(endpoint, timeout_s=120) as client:
            stems = client.separate(mix, sr, model)
    else:
        from engine.registry import load_model
        from engine.sessions import separate_array
        stems = separate_array(load_model(model, repo=repo), mix, sr)
    os.makedirs(out, exist_ok=True)
    for name, audio in stems.items():
        sf.write(os.path.join(out, f"{name}.wav"), audio.T, sr, subtype="FLOAT")
    print(json.dumps({"peak_rss_mb": peak_rss_bytes() / 2 ** 20,
                      "seconds": time.perf_counter() - t0, "torch": "torch" in sys.modules}))


def run_tools(mode: str, songs: list[Path], tmp: Path, endpoint: str | None, env: dict,
              model: str, repo: Path) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--child", mode, str(song), str(tmp / f"{mode}{i}-{time.monotonic_ns()}"),
                               endpoint or "", model, str(repo)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT)
             for i, song in enumerate(songs)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode:
            raise RuntimeError(f"{mode} tool failed: {err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return time.perf_counter() - t0, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=6, metavar=("MODE", "SONG", "OUT", "ENDPOINT", "MODEL", "REPO"))
    parser.add_argument("--tool", choices=["cli", "array", "both"], default="both")
    parser.add_argument("--model", choices=[MODEL, "htdemucs"], default=MODEL)
    args = parser.parse_args()
    if args.child:
        mode, song, out, endpoint, model, repo = args.child
        child(mode, song, out, endpoint or None, model, repo)
        return
    tmp = Path(tempfile.mkdtemp(prefix="unbake-share-"))
    repo, model = bench_model("htdemucs" if args.model == "htdemucs" else MODEL, tmp)
    for tool in (["cli", "array"] if args.tool == "both" else [args.tool]):
        compare(tool, model, repo, tmp)


def compare(tool: str, model: str, repo: Path, tmp: Path) -> None:
    shared_mode, alone_mode = ("cli-daemon", "cli-inprocess") if tool == "cli" else ("client", "inprocess")

    from tests.engine.engine_proc import EngineProcess
    songs = sorted(EVAL.glob("*/mixture.wav"))
    songs = songs + [EVAL / "cristina-vane-so-easy" / "mixture.wav"]  # the 3 dev songs + the 30 s one again
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    wall_ind, ind = run_tools(alone_mode, songs, tmp, None, env, model, repo)
    # the same under the daemon's heap policy (engine.heap.tune_heap: one arena, 32 MiB mmap threshold, no
    # automatic trim); `unbake separate --in-process` sets it itself, so for --tool cli both rows have it
    from engine.heap import policy_env
    wall_tuned, tuned = run_tools(alone_mode, songs, tmp, None, {**env, **policy_env()}, model, repo)

    endpoint = f"ipc://{tmp}/warm.sock"
    engine = EngineProcess(endpoint, "--preload", model, "--repo", repo, log=tmp / "warm.log").start(timeout_s=300)
    try:
        wall_warm, warm = run_tools(shared_mode, songs, tmp, endpoint, env, model, repo)
        daemon_peak_warm = engine.status()["peak_rss_mb"]
    finally:
        engine.stop()

    cold_endpoint = f"ipc://{tmp}/cold.sock"
    t0 = time.perf_counter()
    cold_engine = EngineProcess(cold_endpoint, "--repo", repo, log=tmp / "cold.log").start(timeout_s=300)
    try:
        start_s = time.perf_counter() - t0
        wall_cold, cold = run_tools(shared_mode, songs, tmp, cold_endpoint, env, model, repo)
        daemon_peak_cold = cold_engine.status()["peak_rss_mb"]
    finally:
        cold_engine.stop()

    def each(results):
        return " + ".join(f"{r['peak_rss_mb']:.0f}" for r in results)

    rss_ind = sum(r["peak_rss_mb"] for r in ind)
    rss_warm = daemon_peak_warm + sum(r["peak_rss_mb"] for r in warm)
    rss_cold = daemon_peak_cold + sum(r["peak_rss_mb"] for r in cold)
    print(f"{tool} tools: 4 at once, {model}, songs: {', '.join(s.parent.name for s in songs)}; "
          f"{os.cpu_count()} CPUs")
    print(f"  independent: wall {wall_ind:.2f} s, peak RSS {each(ind)}"
          f" = {rss_ind:.0f} MB")
    for label, wall, daemon, clients in [("shared, warm daemon", wall_warm, daemon_peak_warm, warm),
                                         ("shared, cold daemon", wall_cold + start_s, daemon_peak_cold, cold)]:
        rss = daemon + sum(r["peak_rss_mb"] for r in clients)
        print(f"  {label}: wall {wall:.2f} s, peak RSS daemon {daemon:.0f} + clients "
              f"{each(clients)} = {rss:.0f} MB "
              f"(clients import torch: {any(r['torch'] for r in clients)})")
    rss_tuned = sum(r["peak_rss_mb"] for r in tuned)
    print(f"  independent, the daemon heap policy: wall {wall_tuned:.2f} s, peak RSS {each(tuned)} = {rss_tuned:.0f} MB")
    print(f"  ratio RSS shared / independent: warm {rss_warm / rss_ind:.3f}, cold {rss_cold / rss_ind:.3f}; "
          f"against independent runs with the daemon heap policy too: warm {rss_warm / rss_tuned:.3f}, "
          f"cold {rss_cold / rss_tuned:.3f}")
    print(f"  ratio wall shared / independent: warm {wall_warm / wall_ind:.3f}, "
          f"cold (daemon start {start_s:.2f} s included) {(wall_cold + start_s) / wall_ind:.3f}")


if __name__ == "__main__":
    main()
