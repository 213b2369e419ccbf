"""Quality beyond the reference with the same weights: each idea's effect on spleeter-2stems alone,
then combinations, measured in one run on the dev songs (global SDR, engine.evaluate).

    .venv/bin/python tests/bench/bench_quality.py [--dir ../shared/eval-audio/real-dev-v1] [--quick]

Prints one row per configuration: mean vocals / accompaniment SDR, their deltas vs the TF reference
(Separator(MWF=False): 9.945 / 13.183 dB, ../shared/reference/README.md) and vs unbake's default,
and the speed in x real time (whole pipeline, this machine, warm).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from engine.evaluate import _read, evaluate, song_dirs  # noqa: E402
from engine.audio import sdr_db  # noqa: E402

REFERENCE = {"vocals": 9.945, "accompaniment": 13.183}
REFERENCE_MWF = {"vocals": 10.104, "accompaniment": 13.315}

# (label, session options); each idea alone against the default, then combinations.
CONFIGS = [
    ("default (34 s segments, crossfade)", {}),
    ("(a) 11.9 s segments, overlap 0.25", {"segment_s": 512 * 1024 / 44100, "overlap": 0.25}),
    ("(b) full_band", {"full_band": True}),
    ("(c) wiener 1 (EM from power-2 masks)", {"wiener_iterations": 1}),
    ("(c) wiener 2 (EM from power-2 masks)", {"wiener_iterations": 2}),
    ("(c) wiener 1 + mask_exponent 1 (=MWF)", {"wiener_iterations": 1, "mask_exponent": 1.0}),
    ("(c) wiener 2 + mask_exponent 1", {"wiener_iterations": 2, "mask_exponent": 1.0}),
    ("(d) tta swap", {"tta": ["swap"]}),
    ("(d) tta polarity", {"tta": ["polarity"]}),
    ("(d) shifts 1", {"shifts": 1}),
    ("(d) shifts 2", {"shifts": 2}),
    ("(e) mask_exponent 1", {"mask_exponent": 1.0}),
    ("(e) mask_exponent 1.5", {"mask_exponent": 1.5}),
    ("(e) mask_exponent 3", {"mask_exponent": 3.0}),
]
# Spleeter's MWF is norbert.wiener(U-Net magnitudes, softmask, 1 iteration): ratio masks of power 1
# then one EM step, whose PSDs |m_j x|^2 make the effective mask power 2 again, plus spatial
# covariances. EM from power-2 masks sharpens them to power 4 and loses.
BEST = {"full_band": True, "mask_exponent": 1.0, "wiener_iterations": 1, "tta": ["swap"]}
COMBOS = [
    ("full_band + MWF", {"full_band": True, "mask_exponent": 1.0, "wiener_iterations": 1}),
    ("BEST: full_band + MWF + tta swap", BEST),
    ("BEST + shifts 2", {**BEST, "shifts": 2}),
]


def reference_port(model, root: Path) -> dict:
    """The TF pipeline as ported (separate_reference: whole-track STFT, hard 512-frame blocks)."""
    from engine.models.spleeter import separate_reference
    songs, compute_s, audio_s = {}, 0.0, 0.0
    for song in song_dirs(root):
        mix, sr = _read(song / "mixture.wav")
        t0 = time.perf_counter()
        out = separate_reference(model, torch.from_numpy(mix)).numpy()
        compute_s += time.perf_counter() - t0
        audio_s += mix.shape[1] / sr
        songs[song.name] = {s: sdr_db(_read(song / f"{s}.wav")[0], out[i]) for i, s in enumerate(model.sources)}
    mean = {s: float(np.mean([v[s] for v in songs.values()])) for s in model.sources}
    return {"mean": mean, "seconds": compute_s, "audio_seconds": audio_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=str(REPO.parent / "shared/eval-audio/real-dev-v1"))
    p.add_argument("--only", default=None, help="run only configurations whose label contains this")
    args = p.parse_args(argv)
    from engine.registry import load_model
    model = load_model("spleeter-2stems")
    root = Path(args.dir)
    evaluate(model, root, log=lambda s: None)  # warm-up
    rows = []

    def row(label, result):
        rtf = result["audio_seconds"] / max(result["seconds"], 1e-9)
        m = result["mean"]
        rows.append((label, m["vocals"], m["accompaniment"], rtf))
        base = rows[1] if len(rows) > 1 else rows[0]
        print(f"{label:<42} {m['vocals']:7.3f} {m['accompaniment']:7.3f} "
              f"{m['vocals'] - REFERENCE['vocals']:+7.3f} {m['accompaniment'] - REFERENCE['accompaniment']:+7.3f} "
              f"{m['vocals'] - base[1]:+7.3f} {m['accompaniment'] - base[2]:+7.3f} {rtf:7.1f}x", flush=True)

    print(f"{'configuration':<42} {'voc dB':>7} {'acc dB':>7} {'dV ref':>7} {'dA ref':>7} "
          f"{'dV def':>7} {'dA def':>7} {'speed':>8}")
    print(f"{'TF reference (MWF off; MWF on: 10.104 / 13.315)':<42} {REFERENCE['vocals']:7.3f} "
          f"{REFERENCE['accompaniment']:7.3f}")
    row("reference port: 512-frame hard blocks", reference_port(model, root))
    for label, options in CONFIGS + COMBOS:
        if args.only and args.only not in label and label != CONFIGS[0][0]:
            continue
        row(label, evaluate(model, root, log=lambda s: None, **options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
