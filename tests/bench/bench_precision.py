"""Benchmark: spleeter-2stems (real weights) in bf16 vs fp32 on the dev songs: SDR delta and speed.

    .venv/bin/python tests/bench/bench_precision.py [--dir ../shared/eval-audio/real-dev-v1]

Runs engine.evaluate twice (dtype None = fp32; torch.bfloat16 = CPU autocast), interleaved per run,
and prints the mean vocals / accompaniment SDR of each, the delta (the bar for ``--precision bf16``:
within 0.05 dB), and the wall ratio bf16 / fp32. It calls the separation directly, so it also runs on
a CPU without native bf16 (where the engine refuses bf16): the ratio then shows the emulation's cost.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from engine.devices import native_bf16  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(REPO.parent / "shared/eval-audio/real-dev-v1"))
    args = parser.parse_args()
    from engine import weights
    from engine.registry import load_model
    weights.fetch("spleeter-2stems")
    model = load_model("spleeter-2stems")
    ok, what = native_bf16(torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; native bf16 on {what}: {ok}")
    quiet = lambda line: None  # noqa: E731
    res = {name: evaluate(model, Path(args.dir), log=quiet, dtype=dtype)
           for name, dtype in (("fp32", None), ("bf16", torch.bfloat16))}
    for name, r in res.items():
        print(f"{name}: " + ", ".join(f"{s} {v:.3f} dB" for s, v in r["mean"].items())
              + f"; {r['seconds']:.2f} s for {r['audio_seconds']:.1f} s of audio")
    delta = {s: res["bf16"]["mean"][s] - res["fp32"]["mean"][s] for s in res["fp32"]["mean"]}
    print("bf16 - fp32: " + ", ".join(f"{s} {v:+.3f} dB" for s, v in delta.items())
          + f" (bar: within 0.05 dB); wall ratio bf16 / fp32 {res['bf16']['seconds'] / res['fp32']['seconds']:.2f}")


if __name__ == "__main__":
    main()
