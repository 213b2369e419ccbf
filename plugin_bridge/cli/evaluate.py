"""``unbake eval``: SDR of a model or separation preset on song folders, in this process."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import EXIT_FAILED, _add_model_args, _err, _load, _load_track


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


def add_parser(sub) -> None:
    """Register ``eval`` on the ``unbake`` subparsers ``sub``."""
    p = sub.add_parser("eval", help="SDR of a model or preset on song folders (mixture.wav + stem files)")
    _add_model_args(p)
    p.add_argument("--preset", dest="model", metavar="NAME", help="a separation preset (`unbake presets`); "
                                                                  "the same as -n NAME")
    p.add_argument("dir", help="folder of song folders")
    p.add_argument("--json", default=None, help="where to write the JSON (default: ./eval-MODEL.json)")
    p.set_defaults(func=cmd_eval)
