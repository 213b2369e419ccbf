"""``unbake serve``'s command line: its flags (``add_arguments``, shared with ``plugin_bridge.cli``),
the settings read from them and from the environment, and ``run``, which builds the ``Daemon`` with
the torch side (``engine.service.Service``, imported only once serving starts) and serves.
``python -m engine.daemon`` and ``python -m engine.serve_cli`` run ``main``. No torch at import time.
"""
from __future__ import annotations

import argparse
import sys

from . import endpoints
from . import protocol as P
from .daemon import DRAIN_S, Daemon
from .errors import BadRequest, UnbakeError
from .heap import tune_heap
from .listener import allow_any_local_user


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default=None,
                   help="ipc://PATH, or tcp://HOST:PORT with CURVE keys or --allow-any-local-user "
                        "(default: $UNBAKE_ENDPOINT or ipc://<user runtime dir>/unbake/engine.sock)")
    p.add_argument("-d", "--device", default=None, help="cpu, cuda, cuda:N, mps (default: cuda if available)")
    p.add_argument("--fp16", action="store_true", help="half precision (CUDA autocast)")
    p.add_argument("-j", "--jobs", type=int, default=None, help="CPU threads for the networks")
    p.add_argument("--cpu-runtime", choices=["torch", "onnx"], default=None,
                   help="onnx: HT-Demucs' network on onnxruntime on the CPU (pip install 'unbake[onnx]'; "
                        "built once per weights file, cached beside it); default torch, the faster here")
    p.add_argument("--repo", default=None, help="folder of model weights (default: $UNBAKE_REPO or the user cache)")
    p.add_argument("--preload", default="", metavar="MODEL,...",
                   help="models to load and warm up before reporting ready")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="segments per forward pass across sessions (default: 1 on CPU, 8 on GPU)")
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0, metavar="MS",
                   help="how long a segment may wait for a fuller batch (default 2)")
    p.add_argument("--memory-budget-gb", type=float, default=None, metavar="G",
                   help="unload idle models, least recently used first, to stay under this "
                        "(default: half the RAM, or 80%% of the GPU's memory)")
    p.add_argument("--idle-exit-s", type=float, default=None, metavar="S",
                   help="exit after S seconds with no session and no request (default: never)")
    p.add_argument("--session-ttl-s", type=float, default=P.Limits.session_ttl_s, metavar="S",
                   help=f"free a session untouched for S seconds (default {P.Limits.session_ttl_s:.0f})")
    p.add_argument("--max-sessions", type=int, default=P.Limits.max_sessions, metavar="N")
    p.add_argument("--max-sessions-per-client", type=int, default=P.Limits.max_sessions_per_client, metavar="N")
    p.add_argument("--drain-s", type=float, default=DRAIN_S, metavar="S",
                   help=f"on SIGTERM, how long requests in flight may take to finish (default {DRAIN_S:.0f})")
    p.add_argument("--curve-secret-key", default=None, metavar="FILE",
                   help="the daemon's CURVE certificate (zmq.auth format, with the secret key)")
    p.add_argument("--curve-allowed-keys", default=None, metavar="DIR",
                   help="folder of the public certificates of the clients allowed in")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the forward passes on model replicas on a Ray cluster: its address "
                        "(HOST:PORT as `ray start --head` prints it, or auto), or local to start one here "
                        "(needs pip install 'unbake[ray]'); sessions stay in this daemon")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="with --ray: model replicas, spread over the cluster's nodes (default 1)")
    p.add_argument("--replica-gpus", type=float, default=0, metavar="G",
                   help="with --ray: GPUs per replica (default 0: CPU replicas; 0.5: two share a GPU)")
    p.add_argument("--replica-threads", type=int, default=1, metavar="N",
                   help="with --ray: CPU threads (Ray CPUs) per replica (default 1)")
    p.add_argument("--allow-any-local-user", action="store_true", default=None,
                   help="serve a loopback tcp:// endpoint without CURVE: every local user may then use "
                        f"the engine (default: ${endpoints.ALLOW_ANY_LOCAL_USER_ENV}=1, else refused)")


def run(args: argparse.Namespace) -> int:
    """``unbake serve``: one line on stderr and status 1 for a bad endpoint, model name, CURVE
    setup or runtime folder (before anything is loaded); else ``Daemon.serve``'s status."""
    tune_heap()  # before any thread starts
    preload = [m for m in args.preload.split(",") if m]
    try:
        endpoint = endpoints.check_endpoint(args.endpoint or P.default_endpoint())
        for name in preload:
            P.check_model_name(name, "--preload")
        allow = allow_any_local_user(getattr(args, "allow_any_local_user", None))
        ray = getattr(args, "ray", None)
        if ray is not None:
            from .raycluster import import_ray
            import_ray()  # not installed: one line now, not after the endpoint is taken
        elif args.replicas != 1 or args.replica_gpus or args.replica_threads != 1:
            raise BadRequest("--replicas, --replica-gpus and --replica-threads go with --ray ADDRESS")
    except UnbakeError as e:
        print(f"unbake serve: {e}", file=sys.stderr)
        return 1
    limits = P.Limits(session_ttl_s=args.session_ttl_s, max_sessions=args.max_sessions,
                      max_sessions_per_client=args.max_sessions_per_client)

    def service_factory(emit):
        from .service import Service  # torch is imported here, not at module import
        return Service(emit, device=args.device, fp16=args.fp16, repo=args.repo, threads=args.jobs,
                       max_batch=args.max_batch, max_queue_delay_s=args.max_queue_delay_ms / 1000,
                       memory_budget_gb=args.memory_budget_gb, limits=limits, ray=ray,
                       replicas=args.replicas, replica_gpus=args.replica_gpus,
                       replica_threads=args.replica_threads, cpu_runtime=args.cpu_runtime)

    try:
        daemon = Daemon(endpoint, service_factory, limits=limits, idle_exit_s=args.idle_exit_s,
                        drain_s=args.drain_s, curve_secret_key=args.curve_secret_key,
                        curve_allowed_keys=args.curve_allowed_keys, preload=preload,
                        allow_any_local_user=allow)
    except UnbakeError as e:
        print(f"unbake serve: {e}", file=sys.stderr)
        return 1
    return daemon.serve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unbake serve", description="Serve separation models over ZeroMQ.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
