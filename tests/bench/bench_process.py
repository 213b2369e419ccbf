"""Benchmark: whole processes, a song from file to stem files: ``unbake separate --in-process`` against a
process running demucs' ``apply_model`` on the same weights (issue 15's first bar).

Run with ``python tests/bench/bench_process.py [--seconds 30] [--rounds 5]`` (not collected by pytest).
Official-size HTDemucs with random weights written in the official package format (``bench0ht``; the
real ones cannot be downloaded here); the first ``--seconds`` of a dev song (noise without
../shared). Each row is a fresh process, timed from its start to its exit; rounds alternate between
rows, after one warm-up round (page cache; the onnx artefact is built there):

- ``demucs``: python running ``demucs.apply.apply_model`` (segment 7.8, overlap 0.25, split, no
  shifts) on the package, reading the song and writing float32 stems with soundfile: the reference;
- ``demucs, engine heap``: the same with the engine's glibc heap policy (engine.heap.tune_heap) given
  through glibc's environment variables: how much of the difference is that policy alone;
- ``unbake``: ``unbake separate --in-process --float32`` (the default: torch);
- ``unbake onnx``: the same with ``--cpu-runtime onnx`` (when onnxruntime is installed).

Prints each row's median wall time and its ratio to ``demucs``, and each stem's relative error
(||a - b|| / ||b||) and max abs difference against demucs' stems.
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
import soundfile as sf  # noqa: E402

from engine.heap import policy_env  # noqa: E402

SR = 44100
SONG = ROOT.parent / "shared/eval-audio/real-dev-v1/cristina-vane-so-easy/mixture.wav"
UNBAKE = str(Path(sys.executable).with_name("unbake"))

DEMUCS = """
import sys
import soundfile as sf
import torch
from demucs.apply import apply_model
from demucs.states import load_model
song, package, out = sys.argv[1:4]
data, sr = sf.read(song, dtype="float32", always_2d=True)
model = load_model(package).eval()
with torch.inference_mode():
    stems = apply_model(model, torch.from_numpy(data.T.copy())[None], segment=7.8, overlap=0.25,
                        split=True, shifts=0)[0]
for name, s in zip(model.sources, stems):
    sf.write(f"{out}/{name}.wav", s.numpy().T, sr, subtype="FLOAT")
"""


def write_song(path: Path, seconds: float) -> str:
    frames = int(seconds * SR)
    if SONG.exists():
        data, rate = sf.read(str(SONG), dtype="float32", always_2d=True, frames=frames)
        if rate == SR and data.shape == (frames, 2):
            sf.write(str(path), data, SR, subtype="FLOAT")
            return f"{SONG.parent.name}, first {seconds:g} s"
    data = 0.1 * np.random.default_rng(0).standard_normal((frames, 2)).astype(np.float32)
    sf.write(str(path), data, SR, subtype="FLOAT")
    return f"noise, {seconds:g} s"


def stems_in(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: sf.read(str(p), dtype="float32")[0] for p in sorted(folder.rglob("*.wav"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        import onnxruntime  # noqa: F401
        has_onnx = True
    except ImportError:
        has_onnx = False
    from tests.bench.bench_models import bench_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo, name = bench_model("htdemucs", tmp)
        package = next(repo.glob(f"{name}-*.th"))
        song = tmp / "song.wav"
        source = write_song(song, args.seconds)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        unbake = [UNBAKE, "separate", "--in-process", "-q", "--float32", "-n", name, "--repo", str(repo),
                  str(song), "-o"]
        rows = {"demucs": ([sys.executable, "-c", DEMUCS, str(song), str(package)], base_env),
                "demucs, engine heap": ([sys.executable, "-c", DEMUCS, str(song), str(package)],
                                        {**base_env, **policy_env()}),
                "unbake": (unbake, base_env)}
        if has_onnx:
            rows["unbake onnx"] = (unbake[:2] + ["--cpu-runtime", "onnx"] + unbake[2:], base_env)
        print(f"HTDemucs, official size, random weights; {source}; {os.cpu_count()} CPUs; "
              f"{args.rounds} rounds after a warm-up" + ("" if has_onnx else "; onnxruntime not installed"))
        times: dict[str, list[float]] = {row: [] for row in rows}
        outs = {}
        for r in range(args.rounds + 1):
            for i, (row, (cmd, env)) in enumerate(rows.items()):
                out = tmp / f"out-{i}-{r}"
                out.mkdir()
                t0 = time.perf_counter()
                subprocess.run(cmd + [str(out)], env=env, check=True)
                dt = time.perf_counter() - t0
                if r:
                    times[row].append(dt)
                outs[row] = stems_in(out)
                print(f"  round {r}{' (warm-up)' if not r else ''} {row:20s} {dt:6.2f} s", flush=True)
        ref_time = statistics.median(times["demucs"])
        ref = outs["demucs"]
        for row, t in times.items():
            med = statistics.median(t)
            got = outs[row]
            assert sorted(got) == sorted(ref), (row, sorted(got), sorted(ref))
            rel = max(float(np.linalg.norm(got[s] - ref[s]) / np.linalg.norm(ref[s])) for s in ref)
            mad = max(float(np.max(np.abs(got[s] - ref[s]))) for s in ref)
            print(f"{row:20s} median {med:6.2f} s  ratio to demucs {med / ref_time:.3f}  "
                  f"rel.err {rel:.2e}  max abs {mad:.2e}  {[round(v, 2) for v in t]}")


if __name__ == "__main__":
    main()
