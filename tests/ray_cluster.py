"""A real two-node Ray cluster on this machine, for the ``--ray`` tests (serve and bounce).

``ray.cluster_utils.Cluster``: a head node and a second node, one CPU each, each with a small object
store (a node otherwise claims ~7 GB of /dev/shm) and a custom resource (``node_a``, ``node_b``:
both nodes share one IP, so ``node:<ip>`` cannot tell them apart). The Ray temp folder is a short
path (Unix socket paths) given through RAY_TMPDIR (Cluster ignores ``temp_dir`` for its address
file). The dashboard is off, so no fixed port is taken. ``shutdown`` stops only this cluster's
processes (never ``ray stop``, which stops every Ray process on the machine).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

import pytest

OBJECT_STORE_BYTES = 256 * 2 ** 20


@contextmanager
def two_node_cluster(cpus_per_node: int = 1):
    """Yields the cluster's address (``host:port``) for ``unbake serve --ray ADDRESS``."""
    try:
        from ray.cluster_utils import Cluster
    except ImportError:
        pytest.skip("needs Ray (pip install 'unbake[ray]'; the test extra includes it)")
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    os.makedirs(os.path.join(tmp, "ray"), exist_ok=True)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": cpus_per_node, "object_store_memory": OBJECT_STORE_BYTES,
            "resources": {"node_a": 1}, "include_dashboard": False})
        cluster.add_node(num_cpus=cpus_per_node, object_store_memory=OBJECT_STORE_BYTES,
                         resources={"node_b": 1})
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        if cluster is not None:
            cluster.shutdown()
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def ray_env(address: str) -> dict:
    """Environment for a process that joins the cluster (the daemon, the bounce driver)."""
    return {"RAY_TMPDIR": os.environ.get("RAY_TMPDIR", ""), "RAY_ADDRESS": address}
