"""``unbake`` command line. Subcommands: separate, eval, fetch, models.

This module imports no torch at import time: the engine is imported inside the commands that
need it. Every failure is one line on stderr naming the file and the problem; the other inputs
are still processed; the exit status is non-zero if anything failed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_FAILED = 1
EXIT_USAGE = 2


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--name", dest="model", default=None,
                   help="model name (default: htdemucs if installed, else spleeter-2stems)")
    p.add_argument("--repo", default=None, help="folder of model weights (default: $UNBAKE_REPO or the "
                                                "user cache dir)")
    p.add_argument("--segment", type=float, default=None, metavar="S", help="segment length in seconds")
    p.add_argument("--overlap", type=float, default=None, metavar="O",
                   help="overlap between segments, fraction (default: the model's, 0.25 for demucs)")
    p.add_argument("--shifts", type=int, default=0, metavar="N",
                   help="average N randomly time-shifted passes (deterministic, seed 0)")
    p.add_argument("-d", "--device", default=None, help="cpu, cuda, cuda:N, mps (default: cuda if available)")
    p.add_argument("--fp16", action="store_true", help="half precision on CUDA")
    p.add_argument("-j", "--jobs", type=int, default=None, help="CPU threads for the network")
    p.add_argument("--batch-segments", type=int, default=1, metavar="N",
                   help="segments per forward pass (GPU: more is faster)")


def _load(args):
    """(model, options) from the common arguments; raises UnbakeError."""
    import torch
    from engine import devices, registry
    if args.jobs:
        torch.set_num_threads(args.jobs)
    name = args.model or registry.default_model(args.repo)
    device = devices.pick_device(args.device)
    dtype = devices.pick_dtype(device, args.fp16)
    model = registry.load_model(name, repo=args.repo, device=device)
    options = dict(segment_s=args.segment, overlap=args.overlap, shifts=args.shifts,
                   batch_segments=args.batch_segments, dtype=dtype)
    return name, model, options, device


def cmd_separate(args) -> int:
    from engine.errors import UnbakeError
    from engine.separate import OutputFormat, separate_file, stem_paths
    from engine.sessions import output_stems
    try:
        fmt = OutputFormat(ext="flac" if args.flac else "mp3" if args.mp3 else "wav",
                           bit_depth=32 if args.float32 else 24 if args.int24 else 16,
                           mp3_bitrate_kbps=args.mp3_bitrate)
        name, model, options, device = _load(args)
        stems = output_stems(list(model.sources), args.two_stems)
    except UnbakeError as e:
        _err(str(e))
        return EXIT_FAILED
    if not args.quiet:
        print(f"model {name} on {device} -> {Path(args.out) / name}", file=sys.stderr)
    show_bar = not args.quiet and sys.stderr.isatty()
    failed = 0
    for file in args.files:
        path = Path(file)
        bar = None
        try:
            dests = stem_paths(Path(args.out), name, path, stems, fmt, args.filename)
            if show_bar:
                from tqdm import tqdm
                bar = tqdm(total=1.0, desc=path.name, unit="track", bar_format="{desc}: {percentage:3.0f}%|"
                           "{bar}| [{elapsed}<{remaining}]", file=sys.stderr, leave=False)

                def progress(done, total, bar=bar):
                    bar.update(done / total - bar.n)
            else:
                progress = None
            t0 = time.perf_counter()
            report = separate_file(model, path, dests, fmt, two_stems=args.two_stems, progress=progress,
                                   **options)
        except UnbakeError as e:
            failed += 1
            msg = str(e)
            _err(msg if msg.startswith(str(path)) else f"{path}: {msg}")
            continue
        finally:
            if bar is not None:
                bar.close()
        for stem, r in report.stems.items():
            if r.clipped_samples:
                total = report.frames * report.channels
                _warn(f"{r.path}: {r.clipped_samples} samples ({100 * r.clipped_samples / total:.3f}%) "
                      f"clipped to [-1, 1] (peak {r.peak:.2f}); use --float32 to keep them")
        if not args.quiet:
            secs = report.frames / report.sample_rate
            print(f"{path}: {secs:.1f} s in {time.perf_counter() - t0:.1f} s -> "
                  f"{next(iter(report.stems.values())).path.parent}", file=sys.stderr)
    if failed:
        _err(f"{failed} of {len(args.files)} file(s) failed")
    return EXIT_FAILED if failed else 0


def cmd_eval(args) -> int:
    from engine.errors import UnbakeError
    from engine.evaluate import evaluate, format_table, song_dirs, write_json
    root = Path(args.dir)
    if not root.is_dir() or not song_dirs(root):
        _err(f"{root}: no song folders with a mixture.wav")
        return EXIT_FAILED
    try:
        name, model, options, _ = _load(args)
        result = evaluate(model, root, log=lambda s: print(s, file=sys.stderr), **options)
    except UnbakeError as e:
        _err(str(e))
        return EXIT_FAILED
    result["model"] = name
    result["options"] = {k: v for k, v in options.items() if k != "dtype"}
    print(format_table(result))
    out = Path(args.json or f"eval-{name}.json")
    write_json(result, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_fetch(args) -> int:
    from engine import weights
    from engine.errors import UnbakeError
    failed = 0
    for name in args.names:
        try:
            paths = weights.fetch(name, args.repo, log=lambda s: print(s, file=sys.stderr))
            print(f"{name}: installed in {paths[0].parent}")
        except UnbakeError as e:
            failed += 1
            _err(str(e))
    return EXIT_FAILED if failed else 0


def cmd_models(args) -> int:
    from engine import weights
    root = weights.repo_dir(args.repo)
    print(f"weights folder: {root}")
    for name, spec in weights.catalog().items():
        state = "installed" if weights.is_installed(spec, args.repo) else "not installed"
        size = f"{spec.size / 1e6:.0f} MB" if spec.size else "?"
        print(f"{name:<18} {state:<14} {size:>8}  {len(spec.sources)} stems: {', '.join(spec.sources)}")
        if args.verbose:
            print(f"{'':<18} {spec.description}; licence: {spec.licence}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unbake", description="Take songs apart into stems.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("separate", help="separate audio files into stems (demucs-style options)")
    _add_model_args(p)
    p.add_argument("files", nargs="+", help="audio files (wav, flac, mp3, ogg, aiff)")
    p.add_argument("-o", "--out", default="separated", help="output folder (default: ./separated)")
    p.add_argument("--two-stems", default=None, metavar="STEM", help="write STEM and no_STEM only")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--float32", action="store_true", help="32-bit float WAV (keeps peaks above 0 dBFS)")
    depth.add_argument("--int24", action="store_true", help="24-bit integer output")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--flac", action="store_true", help="FLAC output")
    fmt.add_argument("--mp3", action="store_true", help="MP3 output")
    p.add_argument("--mp3-bitrate", type=int, default=320, help="MP3 bitrate in kbps (default 320)")
    p.add_argument("--filename", default="{track}/{stem}.{ext}",
                   help="output path under OUT/MODEL; variables: track, trackext, stem, ext")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")
    p.set_defaults(func=cmd_separate)

    p = sub.add_parser("eval", help="SDR of a model on song folders (mixture.wav + stem files)")
    _add_model_args(p)
    p.add_argument("dir", help="folder of song folders")
    p.add_argument("--json", default=None, help="where to write the JSON (default: ./eval-MODEL.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("fetch", help="download and verify model weights")
    p.add_argument("names", nargs="+")
    p.add_argument("--repo", default=None)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("models", help="list the model catalog")
    p.add_argument("--repo", default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:  # `unbake models | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
