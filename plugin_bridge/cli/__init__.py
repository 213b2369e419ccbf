"""``unbake`` command line. Subcommands: separate, serve, status, eval, fetch, models, chains, remix,
bounce (``plugin_bridge.bounce``).

``separate`` goes through the engine daemon (started on demand) unless ``--in-process``; ``serve``
runs the daemon; ``status`` asks a running one. This package imports no torch at import time, and the
daemon path (``separate``, ``status``) imports none at all: the engine's torch side is imported only
inside the commands that run models in this process (``separate --in-process``, ``eval``).
Every failure is one line on stderr naming the file and the problem; the other inputs are still
processed; the exit status is non-zero if anything failed.

One module per command group: ``separate``, ``chains`` (chains, remix, ``--chain``), ``bounce``
(its flags; the batch render is ``plugin_bridge.bounce``), ``serve`` (serve, status), ``evaluate``
(eval), ``models`` (presets, fetch, models); ``common`` holds what they share, and
``plugin_bridge.flags`` the flags shared with ``plugin_bridge.bounce``. Every name this package
defined as a single module stays importable from here (``plugin_bridge.cli.X``).
"""
from __future__ import annotations

import argparse
import sys

from plugin_bridge.flags import _device_honoured, add_format_args, engine_flag_warnings
from plugin_bridge.flags import output_format as _output_format

from . import bounce, chains, evaluate, models, separate, serve
from .bounce import cmd_bounce
from .chains import _load_chain_arg, cmd_chains, cmd_remix
from .common import (EXIT_FAILED, EXIT_USAGE, _add_model_args, _add_quality_args, _daemon_args, _endpoint,
                     _err, _load, _load_track, _model_options, _warn)
from .evaluate import cmd_eval
from .models import cmd_fetch, cmd_models, cmd_presets
from .separate import (_separate_files, _separate_in_process, _separate_via_daemon, cmd_separate,
                       unusable_inputs)
from .serve import _format_duration, cmd_serve, cmd_status, format_status

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "add_format_args", "build_parser", "cmd_bounce", "cmd_chains",
           "cmd_eval", "cmd_fetch", "cmd_models", "cmd_presets", "cmd_remix", "cmd_separate", "cmd_serve",
           "cmd_status", "engine_flag_warnings", "format_status", "main", "unusable_inputs"]

# Names imported above only so that they stay importable from here (plugin_bridge.cli.X), as they
# were when the command line was one module.
_MOVED = (_device_honoured, _output_format, _load_chain_arg, _add_model_args, _add_quality_args, _daemon_args,
          _endpoint, _load, _load_track, _model_options, _warn, _separate_files, _separate_in_process,
          _separate_via_daemon, _format_duration)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unbake", description="Take songs apart into stems.")
    sub = parser.add_subparsers(dest="command", required=True)
    separate.add_parser(sub)
    chains.add_parsers(sub)                # chains, remix
    bounce.add_parser(sub)                 # `unbake bounce` (plugin_bridge/bounce.py)
    serve.add_parsers(sub)                 # serve, status
    evaluate.add_parser(sub)               # eval
    models.add_parsers(sub)                # presets, fetch, models
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
