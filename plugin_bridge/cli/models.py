"""Models and weights on the command line: ``unbake presets``, ``unbake fetch``, ``unbake models``."""
from __future__ import annotations

import sys

from .common import EXIT_FAILED, _err


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


def add_parsers(sub) -> None:
    """Register ``presets``, ``fetch`` and ``models`` on the ``unbake`` subparsers ``sub``."""
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
