"""Benchmark: unbake's engine.apply vs demucs' apply_model on an official-size HT-Demucs.

Run with ``python tests/bench/bench_htdemucs.py`` (not collected by pytest). Builds a random-weight
HTDemucs with the official htdemucs hyper-parameters, writes it in the official package format and
loads it back through ``engine.models.htdemucs.load_demucs_package``; separates 30 s of stereo
44.1 kHz audio with both implementations (segment 7.8 s, overlap 0.25, shifts 0, split), interleaved,
and prints the median time of each, the ratio unbake / reference and the max abs difference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from demucs.apply import apply_model as demucs_apply_model  # noqa: E402

from engine.apply import apply_model  # noqa: E402
from engine.models.htdemucs import load_demucs_package  # noqa: E402
from tests.engine import demucs_fixtures as F  # noqa: E402

SR = 44100
SONG = ROOT.parent / "shared/eval-audio/real-dev-v1/cristina-vane-so-easy/mixture.wav"


def load_mix(seconds: float) -> tuple[torch.Tensor, str]:
    frames = int(seconds * SR)
    if SONG.exists():
        import soundfile as sf
        data, rate = sf.read(str(SONG), dtype="float32", always_2d=True, frames=frames)
        if rate == SR and data.shape[1] == 2 and data.shape[0] == frames:
            return torch.from_numpy(data.T.copy()), f"{SONG.parent.name}/{SONG.name}"
    gen = torch.Generator().manual_seed(0)
    return 0.1 * torch.randn(2, frames, generator=gen), "noise"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-segments", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model = F.round_to_half(F.make_official_size_htdemucs(seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        path = F.write_package(model, Path(tmp), "955717e8")
        adapter = load_demucs_package(path, device=device)
    model.to(device)
    mix, source = load_mix(args.seconds)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: HTDemucs, official htdemucs hyper-parameters, random weights, {n_params / 1e6:.1f} M params")
    print(f"input: {source}, {mix.shape[1] / SR:.1f} s stereo {SR} Hz; device {device}; "
          f"torch threads {torch.get_num_threads()}; batch_segments {args.batch_segments}")

    def run_unbake():
        return apply_model(adapter, mix, segment_s=7.8, overlap=0.25, shifts=0,
                           batch_segments=args.batch_segments)

    def run_reference():
        # demucs keeps the mix where it is and moves each chunk to `device`, like the engine.
        return demucs_apply_model(model, mix[None], segment=7.8, overlap=0.25, shifts=0, split=True,
                                  device=device)[0]

    times = {"unbake": [], "reference": []}
    outs = {}
    with torch.inference_mode():
        for fn in (run_unbake, run_reference):  # warm-up (allocator, kernels, caches)
            fn()
            sync()
        for i in range(args.runs):
            for name, fn in (("unbake", run_unbake), ("reference", run_reference)):
                sync()
                start = time.perf_counter()
                outs[name] = fn()
                sync()
                times[name].append(time.perf_counter() - start)
                print(f"  run {i + 1} {name:9s} {times[name][-1]:.3f} s", flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    diff = torch.max(torch.abs(outs["unbake"].cpu() - outs["reference"].cpu())).item()
    print(f"median unbake    {med['unbake']:.3f} s")
    print(f"median reference {med['reference']:.3f} s  (demucs.apply.apply_model)")
    print(f"ratio unbake/reference {med['unbake'] / med['reference']:.3f}")
    print(f"max abs diff {diff:.3e}")


if __name__ == "__main__":
    main()
