"""Command-line flags shared by ``unbake separate`` (``plugin_bridge.cli``) and ``unbake bounce``
(``plugin_bridge.bounce``, ``plugin_bridge.cli.bounce``): the output format flags, and the check of
the engine flags (``-d``, ``--fp16``, ``-j``, ``--batch-segments``) against a running engine.
Standard library only at import time (no torch, no zmq).
"""
from __future__ import annotations

import argparse


def add_format_args(p: argparse.ArgumentParser) -> None:
    """The output format flags of `separate` and `bounce` (read back by ``output_format``)."""
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--float32", action="store_true", help="32-bit float WAV (keeps peaks above 0 dBFS)")
    depth.add_argument("--int24", action="store_true", help="24-bit integer output")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--flac", action="store_true", help="FLAC output")
    fmt.add_argument("--mp3", action="store_true", help="MP3 output")
    p.add_argument("--mp3-bitrate", type=int, default=320, help="MP3 bitrate in kbps (default 320)")


def output_format(args):
    """The ``engine.stemfiles.OutputFormat`` the ``add_format_args`` flags in ``args`` ask for."""
    from engine.stemfiles import OutputFormat
    return OutputFormat(ext="flac" if args.flac else "mp3" if args.mp3 else "wav",
                        bit_depth=32 if args.float32 else 24 if args.int24 else 16,
                        mp3_bitrate_kbps=args.mp3_bitrate)


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
                         jobs: int | None = None, batch_segments: int | None = None,
                         cpu_runtime: str | None = None) -> list[str]:
    """One line (without the ``warning: `` prefix) per engine flag given that the engine which
    answered ``hello`` at ``endpoint`` does not honour: ``-d`` (device), ``--fp16``, ``-j`` (CPU
    threads), ``--batch-segments`` (its ``--max-batch``), ``--cpu-runtime``. Each says what the engine uses and how to get
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
    if cpu_runtime:
        used = hello.get("cpu_runtime")
        checks.append((used == cpu_runtime or (cpu_runtime == "torch" and used is None),
                       f"the {used} CPU runtime" if isinstance(used, str) else "an unstated CPU runtime",
                       cpu_runtime, f"--cpu-runtime {cpu_runtime}", f"--cpu-runtime {cpu_runtime}"))
    return [f"the running engine at {endpoint} uses {used}, not {asked} ({flag}); stop it ({stop}) so that "
            f"this command starts one with {flag}, or start one with `unbake serve {serve_flag} --endpoint "
            f"ENDPOINT` and pass --endpoint ENDPOINT"
            for ok, used, asked, flag, serve_flag in checks if not ok]
