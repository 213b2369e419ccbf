"""The engine daemon on the command line: ``unbake serve`` (forwarded to ``engine.serve_cli``) and
``unbake status``."""
from __future__ import annotations

import argparse
import os

from .common import EXIT_FAILED, _endpoint_or_status, _err


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
    replicas = st.get("replicas")
    if replicas is not None:  # unbake serve --ray: where the forward passes run
        lines.append(f"model replicas on the Ray cluster at {st.get('ray', '?')}:")
        lines.append(f"  {'replica':<18} {'node':<12} {'device':<8} {'pid':>7} {'queue':>5} {'served':>7} {'failed':>6}")
        for r in replicas:
            node = (r.get("node") or "(starting)")[:12]
            lines.append(f"  {r.get('name', '?'):<18} {node:<12} {r.get('device') or '-':<8} {r.get('pid') or '-':>7} "
                         f"{r.get('queue', 0):>5} {r.get('served', 0):>7} {r.get('failed', 0):>6}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    import json
    from engine.errors import EngineUnavailable, UnbakeError
    from plugin_bridge.client import Client
    endpoint, status = _endpoint_or_status(args)
    if endpoint is None:
        return status
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


def add_parsers(sub) -> None:
    """Register ``serve`` and ``status`` on the ``unbake`` subparsers ``sub``."""
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
