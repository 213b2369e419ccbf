"""Joining a Ray cluster (``--ray ADDRESS`` of ``unbake serve`` and ``unbake bounce``): Ray is an
optional extra, so every use goes through ``import_ray`` (one line on how to get it) and ``connect``.

ADDRESS is a Ray cluster address (``HOST:PORT`` of the head node's GCS, as ``ray start --head``
prints it, or ``auto`` for the cluster this machine belongs to), or ``local`` to start a cluster
inside this process (one machine, for trying it out).
"""
from __future__ import annotations

import os
import socket

from .errors import BadRequest

RAY_MISSING = "--ray needs Ray, an optional extra: pip install 'unbake[ray]'"


def import_ray():
    """The ``ray`` module. Raises BadRequest (RAY_MISSING) when it is not installed."""
    try:
        import ray
    except ImportError:
        raise BadRequest(RAY_MISSING) from None
    return ray


def connect(address: str):
    """Join the cluster at ``address`` (or start one: ``local``) once per process; returns ``ray``.
    Raises BadRequest (no Ray; no cluster at that address, in one line)."""
    ray = import_ray()
    if not ray.is_initialized():
        check_reachable(address)
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise BadRequest(f"--ray {address}: cannot join a Ray cluster there "
                             f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; "
                             f"a cluster with token authentication also needs RAY_AUTH_MODE=token here)") from None
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT address (or ``auto`` with $RAY_ADDRESS set) must accept a TCP connection:
    ``ray.init`` retries a dead address for minutes, logging as it goes. Raises BadRequest."""
    target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "://" in target:
        return  # `local`, plain `auto`, ray:// client addresses: Ray says what is wrong, quickly
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise BadRequest(f"--ray {address}: cannot join a Ray cluster there (nothing answers at {target}: "
                         f"{e.strerror or type(e).__name__})") from None
