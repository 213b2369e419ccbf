"""Short clips (a DAW region, a plugin's phrase): spleeter-2stems through engine.apply (the default
path) against the TF-exact reference port on the same excerpt, global SDR of the vocals.

    .venv/bin/python tests/bench/bench_short_clips.py [--dir ../shared/eval-audio/real-dev-v1]
                                                      [--lengths 2 3 6 10] [--every 3.7]

Excerpts every ``--every`` s from the start of each dev song, skipping those whose vocals are near
silent (mean square below 1e-5). Columns, per excerpt length:

- reference: ``separate_reference`` (TF spleeter's layout: the clip first in a 512-frame block,
  zeros after it);
- default: ``engine.apply.apply_model`` as the engine runs it (windows past the clip's ends hold the
  clip mirrored, ``Spleeter.pad_mode = "reflect"``);
- zeros: the same grid and windows with ``pad_mode = "zeros"`` (digital silence past the ends, the
  engine's behaviour before): the difference between these two columns is the padding alone;
- worst: the lowest (default - reference) over the excerpts of that length.

Then the full dev songs (mean vocals / accompaniment), default and zeros. The acceptance bar
(issue 11): default mean >= reference mean at every length, worst >= -0.5 dB, full songs at or
above 10.372 / 13.613 dB. Exit status 1 when a bar is missed.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from engine.apply import apply_model  # noqa: E402
from engine.audio import sdr_db  # noqa: E402
from engine.evaluate import _read, song_dirs  # noqa: E402

FULL_SONGS_BAR = {"vocals": 10.372, "accompaniment": 13.613}  # the scores before this change
WORST_BAR_DB = -0.5
SILENT_MEAN_SQUARE = 1e-5


def excerpts(root: Path, seconds: float, every_s: float):
    """Yield (song, start_s, mix [2, n], vocals [2, n]) for excerpts of ``seconds`` s."""
    for song in song_dirs(root):
        mix, sr = _read(song / "mixture.wav")
        vocals, _ = _read(song / "vocals.wav")
        n, k = int(seconds * sr), 0
        while int(k * every_s * sr) + n <= mix.shape[1]:
            start = int(k * every_s * sr)
            k += 1
            v = vocals[:, start:start + n]
            if float((v ** 2).mean()) >= SILENT_MEAN_SQUARE:
                yield song.name, start / sr, mix[:, start:start + n], v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=str(REPO.parent / "shared/eval-audio/real-dev-v1"))
    p.add_argument("--lengths", type=float, nargs="+", default=[2, 3, 6, 10])
    p.add_argument("--every", type=float, default=3.7, help="seconds between excerpt starts")
    args = p.parse_args(argv)
    from engine.models.spleeter import separate_reference
    from engine.registry import load_model
    model = load_model("spleeter-2stems")
    zeros = copy.copy(model)  # shares the weights; only the padding differs
    zeros.pad_mode = "zeros"
    root = Path(args.dir)
    if not root.is_dir():
        print(f"bench_short_clips: {root}: no such folder (the dev songs live in ../shared)", file=sys.stderr)
        return 2
    ok = True
    print(f"{'length':>6} {'excerpts':>8} {'reference':>9} {'default':>8} {'zeros':>7} "
          f"{'worst default-ref':>17} {'worst zeros-ref':>15}  worst excerpt")
    for seconds in args.lengths:
        rows, names = [], []
        for song, at, mix, vocals in excerpts(root, seconds, args.every):
            x = torch.from_numpy(np.ascontiguousarray(mix))
            ref = separate_reference(model, x)[0].numpy()
            default = apply_model(model, x)[0].numpy()
            zero = apply_model(zeros, x)[0].numpy()
            rows.append([sdr_db(vocals, ref), sdr_db(vocals, default), sdr_db(vocals, zero)])
            names.append(f"{song} @ {at:.1f} s")
        r = np.array(rows)
        mean = r.mean(0)
        gap = r[:, 1] - r[:, 0]
        worst = int(np.argmin(gap))
        ok &= bool(mean[1] >= mean[0] and gap.min() >= WORST_BAR_DB)
        print(f"{seconds:5.1f}s {len(r):8d} {mean[0]:9.3f} {mean[1]:8.3f} {mean[2]:7.3f} "
              f"{gap.min():+17.3f} {(r[:, 2] - r[:, 0]).min():+15.3f}  {names[worst]}", flush=True)
    for label, m in (("default", model), ("zeros", zeros)):
        scores = {s: [] for s in model.sources}
        for song in song_dirs(root):
            mix, _ = _read(song / "mixture.wav")
            out = apply_model(m, torch.from_numpy(mix)).numpy()
            for i, s in enumerate(model.sources):
                scores[s].append(sdr_db(_read(song / f"{s}.wav")[0], out[i]))
        means = {s: float(np.mean(v)) for s, v in scores.items()}
        if label == "default":
            ok &= all(means[s] >= FULL_SONGS_BAR[s] for s in FULL_SONGS_BAR)
        print(f"full dev songs, {label}: vocals {means['vocals']:.3f}, accompaniment "
              f"{means['accompaniment']:.3f} dB (bar {FULL_SONGS_BAR['vocals']} / "
              f"{FULL_SONGS_BAR['accompaniment']})")
    print("bars met" if ok else "A BAR IS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
