"""Chain presets on the command line (``plugin_bridge/chains.py``): ``unbake chains``, ``unbake remix``
and the ``--chain`` of ``unbake separate``."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import EXIT_FAILED, EXIT_USAGE, _daemon_args, _endpoint, _err, _warn


def _load_chain_arg(args):
    """The ``--chain`` preset, validated before any audio is read or any daemon contacted; None
    (after its one-line error on stderr) when it cannot be used."""
    from plugin_bridge.chains import ChainError, load_chain
    try:
        return load_chain(args.chain)
    except ChainError as e:
        _err(str(e))
        return None


def cmd_chains(args) -> int:
    import json
    from plugin_bridge.chains import list_chains
    bad = []
    presets = list_chains(on_error=bad.append)
    if args.json:
        print(json.dumps([p.to_dict() for p in presets], indent=2))
    else:
        for p in presets:
            needs = f"; needs stems {', '.join(p.requires_stems)}" if p.requires_stems else ""
            print(f"{p.name:<14} {p.description}")
            print(f"{'':<14} model {p.model or 'any'}{needs}; {p.path}")
    for e in bad:
        _err(str(e))
    return EXIT_FAILED if bad else 0


def cmd_remix(args) -> int:
    from engine.errors import UnbakeError
    from engine.stemfiles import OutputFormat
    from plugin_bridge.chains import ChainError, ChainTrack, resolve_stems
    from plugin_bridge.client import Client
    preset = _load_chain_arg(args)
    if preset is None:
        return EXIT_USAGE
    out, path = Path(args.out), Path(args.file)
    ext = out.suffix.lower().lstrip(".")
    if ext not in ("wav", "flac", "mp3"):
        _err(f"{out}: unknown output format {out.suffix or '(no extension)'!r}; use .wav, .flac or .mp3")
        return EXIT_USAGE
    depth = 16 if args.int16 else 24 if args.int24 or ext == "flac" else 32
    options = {k: v for k, v in dict(segment_s=args.segment, shifts=args.shifts).items() if v is not None}
    try:
        fmt = OutputFormat(ext=ext, bit_depth=depth)
        endpoint = _endpoint(args)
    except (OSError, UnbakeError) as e:
        _err(str(e))
        return EXIT_USAGE
    client = Client(endpoint, autostart=True, daemon_args=_daemon_args(args))
    try:
        def open_track(sample_rate, channels, where):
            name, stems = resolve_stems(client, args.model or preset.model, **options)
            chain = preset.stem_chain(client, name, stems=stems, **options)
            if not args.quiet:
                print(f"{path}: chain {preset.name}, model {name}, stems {', '.join(stems)}", file=sys.stderr)
            return ChainTrack(chain, stems, sample_rate, where, keep_stems=False)

        from engine.stemfiles import write_track
        report = write_track(path, {"remix": out}, fmt, open_track)
    except ChainError as e:
        _err(str(e))
        return EXIT_USAGE
    except UnbakeError as e:
        msg = str(e)
        _err(msg if msg.startswith(str(path)) else f"{path}: {msg}")
        return EXIT_FAILED
    finally:
        client.close()
    r = report.stems["remix"]
    if r.clipped_samples:
        total = report.frames * report.channels
        _warn(f"{out}: {r.clipped_samples} samples ({100 * r.clipped_samples / total:.3f}%) clipped to "
              f"[-1, 1] (peak {r.peak:.2f}); write a float32 .wav to keep them")
    if not args.quiet:
        print(f"{path} -> {out}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    """Register ``chains`` and ``remix`` on the ``unbake`` subparsers ``sub``."""
    p = sub.add_parser("chains", help="list the chain presets (presets/chains, $UNBAKE_CHAINS)")
    p.add_argument("--json", action="store_true", help="print the presets as JSON")
    p.set_defaults(func=cmd_chains)

    p = sub.add_parser("remix", help="separate a file and remix its stems through a chain preset",
                       description="Separate FILE through the engine daemon, run each stem through the "
                                   "chain preset's effects, and write the sum to OUT (same rate, channels "
                                   "and length; float32 .wav, 24-bit .flac, or .mp3).")
    p.add_argument("--chain", required=True, metavar="NAME_OR_PATH", help="a chain preset (`unbake chains`)")
    p.add_argument("file", help="audio file (wav, flac, mp3, ogg, aiff)")
    p.add_argument("-o", "--out", required=True, help="output file: .wav (float32), .flac (24-bit) or .mp3")
    p.add_argument("-n", "--name", dest="model", default=None,
                   help="model name (default: the preset's model, else the engine's default)")
    p.add_argument("--endpoint", default=None, metavar="ENDPOINT",
                   help="the engine's address (default: $UNBAKE_ENDPOINT, else the per-user socket)")
    p.add_argument("--segment", type=float, default=None, metavar="S", help="segment length in seconds")
    p.add_argument("--shifts", type=int, default=None, metavar="N", help="average N time-shifted passes")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--int16", action="store_true", help="16-bit integer output (.wav, .flac)")
    depth.add_argument("--int24", action="store_true", help="24-bit integer output (.wav, .flac)")
    p.add_argument("-q", "--quiet", action="store_true", help="no messages")
    p.set_defaults(func=cmd_remix, device=None, fp16=False, jobs=None, batch_segments=None, repo=None)
