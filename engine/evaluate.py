"""``unbake eval DIR``: separate every song folder's mixture.wav and score global SDR per stem.

A song folder holds mixture.wav and stem files named after the sources (vocals.wav, ...).
``accompaniment`` is scored for models that do not output it when it can be formed as the sum of
the non-vocal stems (so 4-stem models compare with 2-stem ones).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from .audio import sdr_db
from .sessions import separate_array


def song_dirs(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).iterdir() if (p / "mixture.wav").is_file())


def _read(path: Path) -> tuple[np.ndarray, int]:
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), sr


def evaluate(model, root: Path, log=print, open_track=None, **options) -> dict:
    """{"model", "songs": {song: {stem: sdr_db}}, "mean": {stem: sdr_db}, "seconds", "audio_seconds"}.

    model: a Separator or Bag, separated with ``options``; or None with ``open_track(sample_rate,
    channels, where) -> track`` (a TrackSeparator-like track: a preset, an ensemble), pushed whole."""
    songs = {}
    audio_s = compute_s = 0.0
    for song in song_dirs(root):
        mix, sr = _read(song / "mixture.wav")
        t0 = time.perf_counter()
        if open_track is not None:
            track = open_track(sr, mix.shape[0], str(song / "mixture.wav"))
            parts = [track.push(mix), track.close()]
            est = {s: np.concatenate([p[s] for p in parts], axis=-1) for s in track.stems}
        else:
            est = separate_array(model, mix, sr, **options)
        compute_s += time.perf_counter() - t0
        audio_s += mix.shape[1] / sr
        if "accompaniment" not in est and "vocals" in est:
            est["accompaniment"] = sum(v for k, v in est.items() if k != "vocals")
        scores = {}
        for stem, estimate in est.items():
            ref_path = song / f"{stem}.wav"
            if ref_path.is_file():
                ref, _ = _read(ref_path)
                scores[stem] = sdr_db(ref, estimate)
        songs[song.name] = scores
        log(f"{song.name}: " + ", ".join(f"{k} {v:.3f} dB" for k, v in scores.items()))
    stems = sorted({s for sc in songs.values() for s in sc})
    mean = {s: float(np.mean([sc[s] for sc in songs.values() if s in sc])) for s in stems}
    return {"model": getattr(model, "name", "?"), "songs": songs, "mean": mean,
            "seconds": compute_s, "audio_seconds": audio_s}


def format_table(result: dict) -> str:
    stems = list(result["mean"])
    width = max([len("mean")] + [len(s) for s in result["songs"]])
    lines = [f"{'song':<{width}}  " + "  ".join(f"{s:>13}" for s in stems)]
    for song, scores in result["songs"].items():
        lines.append(f"{song:<{width}}  " + "  ".join(
            f"{scores[s]:>10.3f} dB" if s in scores else f"{'-':>13}" for s in stems))
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{result['mean'][s]:>10.3f} dB" for s in stems))
    rtf = result["audio_seconds"] / max(result["seconds"], 1e-9)
    lines.append(f"model {result['model']}: {result['audio_seconds']:.1f} s of audio in "
                 f"{result['seconds']:.1f} s ({rtf:.1f}x real time)")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    tmp = Path(str(path) + ".partial")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
