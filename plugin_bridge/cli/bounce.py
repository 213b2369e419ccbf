"""``unbake bounce``'s command line: its flags, ``Settings`` from them, and the command itself; the
batch render is ``plugin_bridge.bounce`` (imported when the parser is built, as before)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from plugin_bridge.flags import add_format_args, output_format

if TYPE_CHECKING:
    from plugin_bridge.bounce import Settings

USAGE = ("unbake bounce [-n MODEL] [--chain NAME] [-o OUT] [--filename TEMPLATE] [--float32 | --int24] "
         "[--flac | --mp3] [--two-stems STEM] [--segment S] [--overlap O] [--shifts N] [--jobs N] "
         "[--list FILE] [--verify] [--endpoint ENDPOINT] [--repo DIR] [-d DEVICE] [--fp16] "
         "[--ray ADDRESS [--workers N] [--worker-threads N] [--worker-gpus G]] [-q] [INPUTS ...]")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``bounce`` on the ``unbake`` subparsers ``sub``."""
    from plugin_bridge.bounce import DEFAULT_TEMPLATE
    p = sub.add_parser(
        "bounce", help="batch render for DAW scripts: stems + a sidecar JSON per input, resumable",
        usage=USAGE.replace("unbake bounce", "%(prog)s", 1),
        description="Separate many files through the engine daemon: stems (and the remix of a chain) "
                    "to OUT/MODEL[+CHAIN]/TEMPLATE and a sidecar JSON per input, written last. Inputs "
                    "already done with the same input, model, weights, chain and options are skipped; "
                    "a failed input does not stop the others; a summary table at the end; exit status 1 "
                    "if any input failed.")
    p.add_argument("inputs", nargs="*", metavar="INPUTS",
                   help="audio files, folders (searched recursively for wav, flac, mp3, ogg, aiff), globs, "
                        "or list files (.txt, .lst, .m3u: one path a line, or ';'-separated)")
    p.add_argument("--list", dest="lists", action="append", default=[], metavar="FILE",
                   help="a list file of inputs, whatever its name ('-': stdin); repeatable")
    p.add_argument("-n", "--name", dest="model", default=None,
                   help="model or preset name (default: the chain preset's model, else the engine's default)")
    p.add_argument("--chain", default=None, metavar="NAME",
                   help="a chain preset (`unbake chains`) or its .toml path: write the processed stems "
                        "and their remix")
    p.add_argument("-o", "--out", default="separated", help="output folder (default: ./separated)")
    p.add_argument("--filename", default=DEFAULT_TEMPLATE,
                   help="output path under OUT/MODEL; variables: track, trackext, stem, ext, parent "
                        "(default {track}/{stem}.{ext}; track is PARENT-NAME for inputs sharing a name)")
    add_format_args(p)  # the same output flags as `unbake separate`
    p.add_argument("--two-stems", default=None, metavar="STEM", help="write STEM and no_STEM only")
    p.add_argument("--segment", type=float, default=None, metavar="S", help="segment length in seconds")
    p.add_argument("--overlap", type=float, default=None, metavar="O", help="overlap between segments, fraction")
    p.add_argument("--shifts", type=int, default=0, metavar="N",
                   help="average N time-shifted passes (deterministic)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="inputs sent to the engine at once (default 1; threads, one connection each)")
    p.add_argument("--verify", action="store_true",
                   help="when deciding what is done, hash every output (default: size + mtime, else hash)")
    p.add_argument("--endpoint", default=None, metavar="ENDPOINT",
                   help="the engine's address (default: $UNBAKE_ENDPOINT, else the per-user socket; "
                        "started in the background if none answers)")
    p.add_argument("--repo", default=None, help="weights folder for this run's models, however the engine was "
                                                "started (an engine on an ipc:// socket)")
    p.add_argument("-d", "--device", default=None,
                   help="device, for an engine this command starts (a running one keeps its own: a warning says so)")
    p.add_argument("--fp16", action="store_true",
                   help="half precision on CUDA, for an engine this command starts (a running one keeps its "
                        "own: a warning says so)")
    p.add_argument("--timeout-s", type=float, default=10.0, metavar="S",
                   help="give up on the engine after S seconds without a reply (default 10)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="spread the inputs over the workers of a Ray cluster (HOST:PORT, auto, or local); "
                        "inputs and outputs must be on storage every node sees (needs unbake[ray])")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --ray: workers, each with its own engine (default: one per node)")
    p.add_argument("--worker-threads", type=int, default=1, metavar="N",
                   help="with --ray: CPUs (torch threads) per worker (default 1)")
    p.add_argument("--worker-gpus", type=float, default=0.0, metavar="G",
                   help="with --ray: GPUs per worker (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines (the summary table is printed)")
    p.set_defaults(func=cmd_bounce)
    return p


def settings_from_args(args) -> Settings:
    """Settings from parsed ``bounce`` arguments. Raises BadRequest (format, --jobs)."""
    from engine.errors import BadRequest
    from plugin_bridge.bounce import Settings
    if args.jobs < 1:
        raise BadRequest(f"--jobs must be >= 1, got {args.jobs}")
    if args.ray is None and (args.workers is not None or args.worker_threads != 1 or args.worker_gpus):
        raise BadRequest("--workers, --worker-threads and --worker-gpus go with --ray ADDRESS")
    if args.workers is not None and args.workers < 1 or args.worker_threads < 1 or args.worker_gpus < 0:
        raise BadRequest(f"--workers and --worker-threads must be >= 1 and --worker-gpus >= 0, got "
                         f"{args.workers}, {args.worker_threads}, {args.worker_gpus:g}")
    fmt = output_format(args)
    daemon_args = (["-d", args.device] if args.device else []) + (["--fp16"] if args.fp16 else [])
    return Settings(out_dir=Path(args.out), model=args.model, template=args.filename, fmt=fmt,
                    options={"segment_s": args.segment, "overlap": args.overlap, "shifts": args.shifts,
                             "two_stems": args.two_stems},
                    chain=args.chain, jobs=args.jobs, verify=args.verify, endpoint=args.endpoint,
                    daemon_args=daemon_args, timeout_s=args.timeout_s, repo=args.repo,
                    engine_flags={"device": args.device, "fp16": args.fp16})


def cmd_bounce(args) -> int:
    """``unbake bounce``: 0 when every input is ok or skipped, 1 when any failed (or nothing could
    start: one line on stderr), 130 on Ctrl-C."""
    from engine.errors import UnbakeError
    from plugin_bridge.bounce import format_summary, run
    def err(msg: str) -> None:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        settings = settings_from_args(args)
        warn = lambda line: print(f"warning: {line}", file=sys.stderr, flush=True)  # noqa: E731
        if args.ray is not None:
            from plugin_bridge.bounce_ray import run_ray
            results = run_ray(args.inputs, settings, args.ray, workers=args.workers, worker_gpus=args.worker_gpus,
                              threads=args.worker_threads, lists=args.lists, log=log, warn=warn)
        else:
            results = run(args.inputs, settings, lists=args.lists, log=log, warn=warn)
    except UnbakeError as e:
        err(str(e))
        return 1
    except OSError as e:
        err(f"no endpoint for the unbake engine ({e})")
        return 1
    for r in results:
        if r.status == "failed":
            err(f"{r.input}: {r.error}")
    print(format_summary(results, time.perf_counter() - t0), flush=True)
    return 1 if any(r.status == "failed" for r in results) else 0
