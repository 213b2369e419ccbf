"""What the ``unbake`` subcommands share: exit codes, the one-line error and warning printers, the
model flags, in-process model loading (torch imported only when called), the engine's endpoint and
the settings of an engine a command starts."""
from __future__ import annotations

import argparse
import sys

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
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="bf16: bfloat16 autocast where verified (spleeter-2stems) and native (CPUs with "
                        "avx512_bf16/amx, recent GPUs); refused otherwise (default fp32)")
    p.add_argument("-j", "--jobs", type=int, default=None, help="CPU threads for the network")
    p.add_argument("--cpu-runtime", choices=["torch", "onnx"], default=None,
                   help="onnx: HT-Demucs' network on onnxruntime on the CPU (pip install 'unbake[onnx]'; "
                        "built once per weights file, cached beside it; default torch)")
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
    _tune_heap()
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
    _cpu_runtime(args, model, device)
    dtype = devices.precision_dtype(device, getattr(args, "precision", None), [model]) or dtype
    options = dict(segment_s=args.segment, overlap=args.overlap, shifts=args.shifts or 0,
                   batch_segments=args.batch_segments or 1, dtype=dtype, **_model_options(args))
    return name, model, options, device


def _load_track(args):
    """In process, for a model or separation preset name (engine.presets): (name, open_track(rate,
    channels, where) -> a TrackSeparator-like track, device); raises UnbakeError."""
    _tune_heap()
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
    for model in models.values():
        _cpu_runtime(args, model, device)
    dtype = devices.precision_dtype(device, getattr(args, "precision", None), list(models.values())) or dtype

    def make(sample_rate, channels, where):
        return open_track(plan, models, sample_rate, channels, where=where, dtype=dtype,
                          batch_segments=args.batch_segments or 1)
    return name, make, device


def _tune_heap() -> None:
    """The models run in this process: the daemon's heap policy (engine.heap.tune_heap), before torch
    starts its threads. Under glibc's defaults every large temporary of every segment was unmapped at
    free and faulted in again (HT-Demucs, 30 s: 2.2 M minor faults, 5-8 s of system time); with it,
    the whole ``separate --in-process`` took 0.79-0.87 of demucs' time instead of 0.961
    (tests/bench/bench_process.py)."""
    from engine.heap import tune_heap
    tune_heap()


def _cpu_runtime(args, model, device) -> None:
    """--cpu-runtime onnx in process (engine.models.onnx_core); problems are one warning line."""
    runtime = getattr(args, "cpu_runtime", None)
    if runtime not in (None, "torch"):
        from engine.models.onnx_core import use_cpu_runtime
        use_cpu_runtime(model, device, runtime, _warn)


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
    if getattr(args, "cpu_runtime", None):
        out += ["--cpu-runtime", args.cpu_runtime]
    return out


def _endpoint(args) -> str:
    """--endpoint, else $UNBAKE_ENDPOINT, else the per-user socket; checked (ipc:// or tcp:// only).
    Raises BadRequest (a bad endpoint), NotPrivate (the runtime folder is not this user's alone)."""
    from engine.protocol import check_endpoint, default_endpoint
    return check_endpoint(args.endpoint or default_endpoint())


def _endpoint_or_status(args) -> tuple[str | None, int]:
    """(``_endpoint(args)``, 0), or (None, EXIT_FAILED) after one line on stderr saying why."""
    from engine.errors import UnbakeError
    try:
        return _endpoint(args), 0
    except OSError as e:
        _err(f"no endpoint for the unbake engine ({e})")
    except UnbakeError as e:
        _err(str(e))
    return None, EXIT_FAILED
