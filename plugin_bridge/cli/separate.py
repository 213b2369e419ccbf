"""``unbake separate``: through the engine daemon (started on demand), or ``--in-process``."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from plugin_bridge.flags import add_format_args, engine_flag_warnings
from plugin_bridge.flags import output_format as _output_format

from .chains import _load_chain_arg
from .common import (EXIT_FAILED, EXIT_USAGE, _add_model_args, _daemon_args, _endpoint_or_status, _err,
                     _load_track, _model_options, _warn)


def unusable_inputs(files: list[str]) -> dict[int, Exception]:
    """{index: BadAudio} for the inputs that cannot be separated at all, found before any model is
    loaded or engine contacted: missing, a folder, not audio, empty, truncated, more than 2 channels
    (``engine.inputs.open_input`` on each, header only). A folder is an error rather than searched:
    ``separate`` writes OUT/MODEL/TRACK/STEM, where the files of a folder tree sharing a name
    (``*/mixture.wav``) would overwrite each other; ``unbake bounce DIR`` searches folders and keeps
    such names apart (and resumes)."""
    from engine.errors import BadAudio, UnbakeError
    from engine.inputs import open_input
    out: dict[int, Exception] = {}
    for i, file in enumerate(files):
        path = Path(file)
        try:
            if path.is_dir():
                raise BadAudio(f"{path}: is a folder; `unbake separate` takes audio files "
                               f"(`unbake bounce {path}` separates every audio file in a folder)")
            open_input(path).close()
        except UnbakeError as e:
            out[i] = e
        except OSError as e:
            out[i] = BadAudio(f"{path}: cannot read ({e.strerror or e})")
    return out


def _separate_files(args, run_one, unusable: dict[int, Exception] | None = None) -> int:
    """The loop over the input files, shared by both paths: progress bar, one line per failure,
    clip warnings, summary. ``run_one(path, progress)`` returns a TrackReport or raises UnbakeError;
    it is not called for the inputs in ``unusable`` ({index: error}, ``unusable_inputs``), whose
    errors are reported in their place (``run_one`` may be None when every input is unusable)."""
    from engine.errors import UnbakeError
    show_bar = not args.quiet and sys.stderr.isatty()
    failed = 0
    unusable = unusable or {}
    for i, file in enumerate(args.files):
        path = Path(file)
        if i in unusable:
            failed += 1
            msg = str(unusable[i])
            _err(msg if msg.startswith(str(path)) else f"{path}: {msg}")
            continue
        bar = None
        try:
            if show_bar:
                from tqdm import tqdm
                bar = tqdm(total=1.0, desc=path.name, unit="track", bar_format="{desc}: {percentage:3.0f}%|"
                           "{bar}| [{elapsed}<{remaining}]", file=sys.stderr, leave=False)

                def progress(done, total, bar=bar):
                    bar.update(done / total - bar.n)
            else:
                progress = None
            t0 = time.perf_counter()
            report = run_one(path, progress)
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


def cmd_separate(args) -> int:
    if getattr(args, "chain", None):  # validated before any audio is read or any daemon contacted
        args.chain_preset = _load_chain_arg(args)
        if args.chain_preset is None:
            return EXIT_USAGE
        if args.in_process:
            _err("--chain runs through the engine daemon: drop --in-process")
            return EXIT_USAGE
        args.model = args.model or args.chain_preset.model
    unusable = unusable_inputs(args.files)
    if len(unusable) == len(args.files):  # nothing to separate: no model loaded, no engine contacted
        return _separate_files(args, None, unusable)
    return _separate_in_process(args, unusable) if args.in_process else _separate_via_daemon(args, unusable)


def _separate_in_process(args, unusable: dict[int, Exception] | None = None) -> int:
    from engine.errors import UnbakeError
    from engine.separate import stem_paths, write_track
    try:
        fmt = _output_format(args)
        name, open_track, device = _load_track(args)
        stems = open_track(44100, 2, "options").stems  # a bad stem or option: one line, before any audio
    except UnbakeError as e:
        _err(str(e))
        return EXIT_FAILED
    if not args.quiet:
        print(f"model {name} on {device} -> {Path(args.out) / name}", file=sys.stderr)

    def run_one(path, progress):
        dests = stem_paths(Path(args.out), name, path, stems, fmt, args.filename)
        return write_track(path, dests, fmt, open_track, progress=progress)

    return _separate_files(args, run_one, unusable)


def _separate_via_daemon(args, unusable: dict[int, Exception] | None = None) -> int:
    from engine.errors import EngineUnavailable, NotPermitted, UnbakeError
    from engine.stemfiles import stem_paths
    from plugin_bridge.client import Client
    from plugin_bridge.files import separate_file_via
    options = dict(segment_s=args.segment, overlap=args.overlap, shifts=args.shifts, two_stems=args.two_stems,
                   residual=args.residual or None, precision=getattr(args, "precision", None))
    options = {k: v for k, v in options.items() if v is not None}
    try:
        options.update(_model_options(args))
    except UnbakeError as e:
        _err(str(e))
        return EXIT_USAGE
    try:
        fmt = _output_format(args)
    except UnbakeError as e:
        _err(str(e))
        return EXIT_FAILED
    endpoint, status = _endpoint_or_status(args)
    if endpoint is None:
        return status

    def connect():
        return Client(endpoint, autostart=True, daemon_args=_daemon_args(args), repo=args.repo)

    try:
        clients = [connect()]
    except UnbakeError as e:
        _err(f"--repo {args.repo}: {e}" if args.repo else str(e))
        return EXIT_FAILED
    try:
        try:
            hello = clients[0].hello()
            device = hello.get("device", "?")
            for line in engine_flag_warnings(hello, endpoint, device=args.device, fp16=args.fp16, jobs=args.jobs,
                                             batch_segments=args.batch_segments, cpu_runtime=args.cpu_runtime):
                _warn(line)
            # One session opened and cancelled up front: the model is loaded, its name known, and a bad
            # model, stem or option is one line before any file is read (as in process).
            probe = clients[0].open(args.model, 44100, 2, **options)
            name, stems = probe.model, list(probe.stems)
            try:
                probe.cancel()
            except UnbakeError:
                pass
        except NotPermitted:
            _err(f"--repo {args.repo}: the engine at {endpoint} does not open folders its peers name (only "
                 f"peers of its own ipc:// socket may); use an engine on an ipc:// endpoint, or start one "
                 f"with `unbake serve --repo {args.repo}`")
            return EXIT_FAILED
        except UnbakeError as e:
            _err(str(e))
            return EXIT_FAILED
        preset = getattr(args, "chain_preset", None)
        if preset is not None:
            try:
                preset.check_stems(stems, name)
            except UnbakeError as e:
                _err(str(e))
                return EXIT_USAGE
        if not args.quiet:
            print(f"model {name}{f' from {clients[0].repo}' if args.repo else ''} on {device} (engine at "
                  f"{endpoint}) -> {Path(args.out) / name}", file=sys.stderr)

        def run_one(path, progress):
            def dests(model_name, stems):
                return stem_paths(Path(args.out), model_name, path, stems, fmt, args.filename)
            try:
                if preset is not None:  # --chain: the processed stems and their sum, `remix`
                    from plugin_bridge.chains import chain_file
                    return chain_file(clients[-1], preset, path, name, stems, dests(name, [*stems, "remix"]),
                                       fmt, progress, options)
                report, _ = separate_file_via(clients[-1], path, dests, fmt, model=name, progress=progress,
                                              **options)
            except EngineUnavailable:
                # The engine went away (or hangs): the next file gets a fresh connection, which starts
                # an engine again if none answers.
                clients[-1].close()
                clients.append(connect())
                raise
            return report

        return _separate_files(args, run_one, unusable)
    finally:
        clients[-1].close()


def add_parser(sub) -> None:
    """Register ``separate`` on the ``unbake`` subparsers ``sub``."""
    p = sub.add_parser(
        "separate", help="separate audio files into stems (demucs-style options)",
        description="Separate audio files into stems. By default through the unbake engine daemon at "
                    "--endpoint, started in the background if none answers there. --repo DIR applies to "
                    "this command's sessions however the engine was started (an engine on an ipc:// "
                    "socket). -d, --fp16, -j and --batch-segments (the engine's --max-batch) are settings "
                    "of the engine: they apply when this command starts it; an engine already running "
                    "keeps its own, and a warning says which of them it does not honour and how to get "
                    "them. --in-process loads the model in this process instead.")
    _add_model_args(p)
    p.add_argument("--endpoint", default=None, metavar="ENDPOINT",
                   help="the engine's address: ipc://PATH or tcp://HOST:PORT (default: $UNBAKE_ENDPOINT, "
                        "else the per-user socket ipc://$XDG_RUNTIME_DIR/unbake/engine.sock)")
    p.add_argument("--in-process", action="store_true",
                   help="load the model and separate in this process, without the engine daemon")
    p.add_argument("files", nargs="+", help="audio files (wav, flac, mp3, ogg, aiff; a folder is an error: "
                                            "`unbake bounce` searches folders)")
    p.add_argument("-o", "--out", default="separated", help="output folder (default: ./separated)")
    p.add_argument("--two-stems", default=None, metavar="STEM", help="write STEM and no_STEM only")
    p.add_argument("--residual", action="store_true",
                   help="stems sum exactly to the input: the input minus the other stems goes to the "
                        "complementary stem (accompaniment, instrumental, no_STEM, else other, else the last)")
    add_format_args(p)
    p.add_argument("--filename", default="{track}/{stem}.{ext}",
                   help="output path under OUT/MODEL; variables: track, trackext, stem, ext")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")
    p.add_argument("--chain", default=None, metavar="NAME_OR_PATH",
                   help="a chain preset (`unbake chains`): write the processed stems and their sum, remix")
    p.set_defaults(func=cmd_separate)
