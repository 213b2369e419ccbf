"""``unbake`` command line. Subcommands: separate, serve, status, eval, fetch, models, chains, remix,
bounce (``plugin_bridge.bounce``).

``separate`` goes through the engine daemon (started on demand) unless ``--in-process``; ``serve``
runs the daemon; ``status`` asks a running one. This module imports no torch at import time, and the
daemon path (``separate``, ``status``) imports none at all: the engine's torch side is imported only
inside the commands that run models in this process (``separate --in-process``, ``eval``).
Every failure is one line on stderr naming the file and the problem; the other inputs are still
processed; the exit status is non-zero if anything failed.
"""
from __future__ import annotations

import argparse
import os
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
                   help="model or separation preset name (`unbake models`, `unbake presets`; default: "
                        "htdemucs if installed, else spleeter-2stems)")
    p.add_argument("--repo", default=None, help="folder of model weights (default: $UNBAKE_REPO or the "
                                                "user cache dir)")
    p.add_argument("--segment", type=float, default=None, metavar="S", help="segment length in seconds")
    p.add_argument("--overlap", type=float, default=None, metavar="O",
                   help="overlap between segments, fraction (default: the model's, 0.25 for demucs)")
    p.add_argument("--shifts", type=int, default=None, metavar="N",
                   help="average N randomly time-shifted passes (deterministic, seed 0; default 0)")
    _add_quality_args(p)
    p.add_argument("-d", "--device", default=None, help="cpu, cuda, cuda:N, mps (default: cuda if available)")
    p.add_argument("--fp16", action="store_true", help="half precision on CUDA")
    p.add_argument("-j", "--jobs", type=int, default=None, help="CPU threads for the network")
    p.add_argument("--batch-segments", type=int, default=None, metavar="N",
                   help="segments per forward pass (GPU: more is faster; default 1 in process, the "
                        "engine's --max-batch through the daemon)")


def _add_quality_args(p: argparse.ArgumentParser) -> None:
    """The model's own options (spleeter-2stems; see tests/bench/bench_quality.py)."""
    p.add_argument("--full-band", action="store_true", default=None,
                   help="spleeter: extend the masks above 11 kHz (stems sum to the mix)")
    p.add_argument("--mask-exponent", type=float, default=None, metavar="P",
                   help="spleeter: power of the ratio masks (default 2; 1 with --wiener-iterations)")
    p.add_argument("--wiener-iterations", type=int, default=None, metavar="N",
                   help="spleeter: multichannel Wiener filter, N EM iterations per segment (default 0)")
    p.add_argument("--tta", default=None, metavar="LIST",
                   help="spleeter: test-time augmentations averaged, comma-separated: swap, polarity")


def _model_options(args) -> dict:
    """The model options given on the command line, validated (BadRequest)."""
    from engine.protocol import check_options
    tta = getattr(args, "tta", None)
    options = dict(full_band=getattr(args, "full_band", None), mask_exponent=getattr(args, "mask_exponent", None),
                   wiener_iterations=getattr(args, "wiener_iterations", None),
                   tta=None if tta is None else [t.strip() for t in tta.split(",") if t.strip()])
    return check_options({k: v for k, v in options.items() if v is not None}, "options")


def _load(args):
    """(model, options) from the common arguments; raises UnbakeError."""
    import torch
    from engine import devices, presets, registry
    from engine.errors import BadRequest
    if args.jobs:
        torch.set_num_threads(args.jobs)
    name = args.model or registry.default_model(args.repo)
    device = devices.pick_device(args.device)
    dtype = devices.pick_dtype(device, args.fp16)
    if presets.is_preset(name):
        raise BadRequest(f"{name} is a separation preset: `unbake eval` takes a model name")
    model = registry.load_model(name, repo=args.repo, device=device)
    options = dict(segment_s=args.segment, overlap=args.overlap, shifts=args.shifts or 0,
                   batch_segments=args.batch_segments or 1, dtype=dtype, **_model_options(args))
    return name, model, options, device


def _load_track(args):
    """In process, for a model or separation preset name (engine.presets): (name, open_track(rate,
    channels, where) -> a TrackSeparator-like track, device); raises UnbakeError."""
    import torch
    from engine import devices, presets, registry
    from engine.ensemble import open_track
    if args.jobs:
        torch.set_num_threads(args.jobs)
    name = args.model or registry.default_model(args.repo)
    device = devices.pick_device(args.device)
    dtype = devices.pick_dtype(device, args.fp16)
    caller = dict(segment_s=args.segment, overlap=args.overlap, shifts=args.shifts,
                  two_stems=getattr(args, "two_stems", None), residual=getattr(args, "residual", None) or None,
                  **_model_options(args))
    plan = presets.resolve(name, caller, args.repo)
    models = {m: registry.load_model(m, repo=args.repo, device=device)
              for m in dict.fromkeys(m.model for m in plan.members)}

    def make(sample_rate, channels, where):
        return open_track(plan, models, sample_rate, channels, where=where, dtype=dtype,
                          batch_segments=args.batch_segments or 1)
    return name, make, device


def add_format_args(p: argparse.ArgumentParser) -> None:
    """The output format flags of `separate` and `bounce` (read back by ``_output_format``)."""
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--float32", action="store_true", help="32-bit float WAV (keeps peaks above 0 dBFS)")
    depth.add_argument("--int24", action="store_true", help="24-bit integer output")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--flac", action="store_true", help="FLAC output")
    fmt.add_argument("--mp3", action="store_true", help="MP3 output")
    p.add_argument("--mp3-bitrate", type=int, default=320, help="MP3 bitrate in kbps (default 320)")


def _output_format(args):
    from engine.stemfiles import OutputFormat
    return OutputFormat(ext="flac" if args.flac else "mp3" if args.mp3 else "wav",
                        bit_depth=32 if args.float32 else 24 if args.int24 else 16,
                        mp3_bitrate_kbps=args.mp3_bitrate)


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


def _daemon_args(args) -> list[str]:
    """The engine settings of ``separate`` for a daemon the client has to start. Not ``--repo``:
    that travels with each session (``Client(repo=...)``), so that an engine started by this command,
    which outlives it by IDLE_EXIT_S, does not give the folder to the commands after it."""
    out = []
    if args.device:
        out += ["-d", args.device]
    if getattr(args, "fp16", False):
        out.append("--fp16")
    if getattr(args, "jobs", None):
        out += ["-j", str(args.jobs)]
    if getattr(args, "batch_segments", None):
        out += ["--max-batch", str(args.batch_segments)]
    return out


def _device_honoured(asked: str, used: str) -> bool:
    """Does an engine on device ``used`` (``str(torch.device)``: cpu, cuda, cuda:1, mps) do what
    ``-d asked`` asks? ``cuda`` is any CUDA device; ``cuda:N`` that one (``cuda`` counts as
    ``cuda:0``); ``auto`` anything."""
    if asked in ("", "auto"):
        return True
    a_type, _, a_index = asked.strip().lower().partition(":")
    u_type, _, u_index = used.partition(":")
    if a_type != u_type:
        return False
    return not a_index or a_index == (u_index or "0")


def engine_flag_warnings(hello: dict, endpoint: str, *, device: str | None = None, fp16: bool = False,
                         jobs: int | None = None, batch_segments: int | None = None) -> list[str]:
    """One line (without the ``warning: `` prefix) per engine flag given that the engine which
    answered ``hello`` at ``endpoint`` does not honour: ``-d`` (device), ``--fp16``, ``-j`` (CPU
    threads), ``--batch-segments`` (its ``--max-batch``). Each says what the engine uses and how to get
    what was asked. Flags not given (None / False) are not checked. An engine that does not state a
    setting in ``hello`` (older ones state the device only) counts as not honouring it."""
    pid = hello.get("pid")
    stop = f"kill {pid}" if isinstance(pid, int) else "`unbake status` shows its pid"
    checks = []
    if device:
        used = hello.get("device")
        checks.append((isinstance(used, str) and _device_honoured(device, used),
                       used if isinstance(used, str) else "an unstated device", device, f"-d {device}",
                       f"-d {device}"))
    if fp16:
        used = hello.get("fp16")
        checks.append((used is True, "float32" if used is False else "an unstated precision", "float16",
                       "--fp16", "--fp16"))
    if jobs:
        used = hello.get("threads")
        checks.append((used == jobs, f"{used} CPU threads" if isinstance(used, int) else "unstated CPU threads",
                       f"{jobs}", f"-j {jobs}", f"-j {jobs}"))
    if batch_segments:
        used = hello.get("max_batch")
        checks.append((used == batch_segments, f"{used} segment(s) per forward pass" if isinstance(used, int)
                       else "an unstated batch size", f"{batch_segments}", f"--batch-segments {batch_segments}",
                       f"--max-batch {batch_segments}"))
    return [f"the running engine at {endpoint} uses {used}, not {asked} ({flag}); stop it ({stop}) so that "
            f"this command starts one with {flag}, or start one with `unbake serve {serve_flag} --endpoint "
            f"ENDPOINT` and pass --endpoint ENDPOINT"
            for ok, used, asked, flag, serve_flag in checks if not ok]


def _endpoint(args) -> str:
    """--endpoint, else $UNBAKE_ENDPOINT, else the per-user socket; checked (ipc:// or tcp:// only).
    Raises BadRequest (a bad endpoint), NotPrivate (the runtime folder is not this user's alone)."""
    from engine.protocol import check_endpoint, default_endpoint
    return check_endpoint(args.endpoint or default_endpoint())


def _separate_via_daemon(args, unusable: dict[int, Exception] | None = None) -> int:
    from engine.errors import EngineUnavailable, NotPermitted, UnbakeError
    from engine.stemfiles import stem_paths
    from plugin_bridge.client import Client
    from plugin_bridge.files import separate_file_via
    options = dict(segment_s=args.segment, overlap=args.overlap, shifts=args.shifts, two_stems=args.two_stems,
                   residual=args.residual or None)
    options = {k: v for k, v in options.items() if v is not None}
    try:
        options.update(_model_options(args))
    except UnbakeError as e:
        _err(str(e))
        return EXIT_USAGE
    try:
        fmt = _output_format(args)
        endpoint = _endpoint(args)
    except OSError as e:
        _err(f"no endpoint for the unbake engine ({e})")
        return EXIT_FAILED
    except UnbakeError as e:
        _err(str(e))
        return EXIT_FAILED

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
                                             batch_segments=args.batch_segments):
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


def cmd_serve(args) -> int:
    from engine import serve_cli
    return serve_cli.run(args)


def _format_duration(secs: float) -> str:
    secs = int(secs)
    if secs < 60:
        return f"{secs} s"
    if secs < 3600:
        return f"{secs // 60} min {secs % 60:02d} s"
    return f"{secs // 3600} h {secs % 3600 // 60:02d} min"


def format_status(st: dict) -> str:
    """A few lines for people from a ``status`` reply."""
    lines = [f"unbake engine {st.get('engine_version', '?')} (protocol {st.get('protocol', '?')}) at "
             f"{st.get('endpoint', '?')}, pid {st.get('pid', '?')}, up {_format_duration(st.get('uptime_s', 0))}"]
    rss = st.get("rss_mb")
    budget = st.get("memory_budget_gb")
    lines.append(f"device {st.get('device', '?')}" + (f", {rss:.0f} MB resident" if rss is not None else "")
                 + (f", model memory budget {budget:g} GB" if budget else ""))
    models = st.get("models") or []
    if models:
        lines.append("models loaded:")
        for m in models:
            mem = m.get("memory_mb")
            idle = m.get("idle_s")
            lines.append(f"  {m.get('name', '?'):<18} " + (f"{mem:>6.0f} MB  " if mem is not None else "")
                         + f"{m.get('sessions', 0)} session(s)"
                         + (f", idle {_format_duration(idle)}" if idle is not None else "")
                         + (f", from {m['repo']}" if m.get("repo") else ""))
    else:
        lines.append("models loaded: none")
    lines.append(f"{st.get('sessions', 0)} session(s) open, queue depth {st.get('queue_depth', 0)}, "
                 f"{st.get('served', 0)} request(s) served")
    return "\n".join(lines)


def cmd_status(args) -> int:
    import json
    from engine.errors import EngineUnavailable, UnbakeError
    from plugin_bridge.client import Client
    try:
        endpoint = _endpoint(args)
    except OSError as e:
        _err(f"no endpoint for the unbake engine ({e})")
        return EXIT_FAILED
    except UnbakeError as e:
        _err(str(e))
        return EXIT_FAILED
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[len("ipc://"):]):
        _err(f"no unbake engine at {endpoint} (no socket at {endpoint[len('ipc://'):]})")
        return EXIT_FAILED
    try:  # --timeout-s is how long to wait, all in all: no retry
        with Client(endpoint, autostart=False, timeout_s=args.timeout_s, retries=0) as client:
            st = client.status()
    except EngineUnavailable as e:
        _err(f"no unbake engine at {endpoint} ({e})")
        return EXIT_FAILED
    except UnbakeError as e:
        _err(f"{endpoint}: {e}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True, default=str))
    else:
        print(format_status(st))
    return 0


def cmd_eval(args) -> int:
    from engine.errors import UnbakeError
    from engine.evaluate import evaluate, format_table, song_dirs, write_json
    root = Path(args.dir)
    if not root.is_dir() or not song_dirs(root):
        _err(f"{root}: no song folders with a mixture.wav")
        return EXIT_FAILED
    from engine import presets
    try:
        if args.model and presets.is_preset(args.model):  # a preset (an ensemble, options): its tracks
            name, make, _ = _load_track(args)
            result = evaluate(None, root, log=lambda s: print(s, file=sys.stderr), open_track=make)
            options = {"preset": name}
        else:
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
    from engine import presets
    failed = 0
    names = []
    for name in args.names:  # a preset name: the models it would use (the first candidate's)
        try:
            names += [m for m, _ in presets.missing_files(name, args.repo)] if presets.is_preset(name) else [name]
        except UnbakeError as e:
            failed += 1
            _err(str(e))
    for name in dict.fromkeys(names):
        try:
            paths = weights.fetch(name, args.repo, log=lambda s: print(s, file=sys.stderr))
            print(f"{name}: installed in {paths[0].parent}")
        except UnbakeError as e:
            failed += 1
            _err(str(e))
    return EXIT_FAILED if failed else 0


def cmd_presets(args) -> int:
    """Every separation preset: installed yes/no, its models, and what `unbake fetch` would download."""
    from engine import presets, weights
    from engine.errors import UnbakeError
    catalog = weights.catalog()
    try:
        found = presets.list_presets()
        rows = []
        for p in found:
            missing = presets.missing_files(p, args.repo)
            rows.append({"name": p.name, "installed": presets.installed(p, args.repo),
                         "description": p.description, "kind": "candidates" if p.candidates else
                         (p.algorithm and f"ensemble {p.algorithm}") or "model",
                         "models": list(p.candidates or p.models), "path": str(p.path),
                         "fetch": [{"model": m, "bytes": b} for m, b in missing]})
    except UnbakeError as e:
        _err(str(e))
        return EXIT_FAILED
    if args.json:
        import json
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:<15} installed {'yes' if r['installed'] else 'no ':<4} {r['description']}")
        uses = "first installed of" if r["kind"] == "candidates" else r["kind"]
        line = f"{'':<15} {uses}: {', '.join(r['models'])}"
        unknown = [m for m in r["models"] if r["kind"] != "candidates" and m not in catalog
                   and not presets._model_installed(m, args.repo)]
        if unknown:
            line += f"; not in the catalog: {', '.join(unknown)}"
        if r["fetch"]:
            total = sum(f["bytes"] for f in r["fetch"])
            line += (f"; `unbake fetch {r['name']}` downloads "
                     + ", ".join(f"{f['model']} ({f['bytes'] / 1e6:.0f} MB)" for f in r["fetch"])
                     + f", {total / 1e6:.0f} MB")
        print(line)
    return 0


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


# -- chain presets (plugin_bridge/chains.py): `chains`, `remix`, `separate --chain` --------------

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unbake", description="Take songs apart into stems.")
    sub = parser.add_subparsers(dest="command", required=True)

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

    from plugin_bridge.bounce import add_parser as add_bounce_parser  # `unbake bounce` (plugin_bridge/bounce.py)
    add_bounce_parser(sub)

    p = sub.add_parser("serve", help="run the engine daemon in the foreground (see `unbake serve -h`)",
                       description="Run the unbake engine daemon: it keeps models warm and serves "
                                   "`unbake separate`, the Python client and plugins over ZeroMQ.")
    try:
        from engine import serve_cli  # torch-free at import time: the engine's torch side loads in serve_cli.run
    except ImportError as e:  # a broken install must not take the other subcommands down with it
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=lambda args, e=e: _err(f"the engine daemon cannot be imported ({e})") or EXIT_FAILED)
    else:
        serve_cli.add_arguments(p)
        p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="ask a running engine daemon how it is doing")
    p.add_argument("--endpoint", default=None, metavar="ENDPOINT",
                   help="the engine's address (default: $UNBAKE_ENDPOINT, else the per-user socket)")
    p.add_argument("--json", action="store_true", help="print the daemon's status reply as JSON")
    p.add_argument("--timeout-s", type=float, default=5.0, metavar="S",
                   help="how long to wait for an answer (default 5)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("eval", help="SDR of a model or preset on song folders (mixture.wav + stem files)")
    _add_model_args(p)
    p.add_argument("--preset", dest="model", metavar="NAME", help="a separation preset (`unbake presets`); "
                                                                  "the same as -n NAME")
    p.add_argument("dir", help="folder of song folders")
    p.add_argument("--json", default=None, help="where to write the JSON (default: ./eval-MODEL.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("presets", help="list the separation presets (presets/separation, "
                                       "$UNBAKE_SEPARATION_PRESETS), installed or not")
    p.add_argument("--repo", default=None)
    p.add_argument("--json", action="store_true", help="print the presets as JSON")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("fetch", help="download and verify model weights (model or preset names)")
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
