"""Model replicas on a Ray cluster (``unbake serve --ray ADDRESS``): the daemon keeps the sessions,
the segment grid and the overlap-add (cheap state, where the client connects); the forward passes
run on Ray actors that each load the model once, on a GPU when their node has one.

    scheduler batch --> run_jobs(jobs, forward=replicas.forward)
                          windows [batch, channels, w] (filled here) --> a replica (least busy)
                          <-- [batch, sources, channels, w]                 Replica.forward(recipe, windows)

A replica builds the network a runner uses from its ``recipe`` (engine.apply.Streamer: model name,
bag member, segment override, model options, dtype), from the same weights (the weights folder is on
storage every node sees), so the outputs are the local engine's. A replica that dies mid-batch: the
batch is sent again to another replica (and the dead one is restarted by Ray); no replica left: the
session gets EngineUnavailable-class errors, the daemon keeps serving.

Ray is optional (``pip install unbake[ray]``); without it ``--ray`` says how to get it in one line.
"""
from __future__ import annotations

import itertools
import os
import threading
import time

import numpy as np
import torch

from .errors import EngineUnavailable

RAY_MISSING = "--ray needs Ray: pip install 'unbake[ray]' (or: pip install ray)"
RETRIES = 3  # a batch is sent to this many replicas at most

# WIP (issue 14), found so far: with two local replicas, spleeter-2stems through TrackSeparator +
# run_jobs(forward=Replicas.forward) equals the local forward exactly (max |diff| 0). Still to do:
# the scheduler runs one batch at a time, so N replicas need N scheduler threads, each taking a batch
# of sessions that have none in flight (OverlapAdd.put wants a session's segments in grid order);
# serve_cli --ray/--replicas/--replica-gpus and Service wiring; `unbake status` rows; bounce --ray;
# tests on ray.cluster_utils.Cluster (2 nodes, custom resources to pin actors); the throughput bench.


def _ray():
    try:
        import ray
    except ImportError:
        raise EngineUnavailable(RAY_MISSING) from None
    return ray


class _Replica:
    """One model replica (a Ray actor): networks built from recipes, kept warm."""

    def __init__(self, repo: str | None, device: str | None, threads: int | None):
        if repo:
            os.environ["UNBAKE_REPO"] = repo
        if threads:
            torch.set_num_threads(int(threads))
        from .devices import pick_device
        self.device = pick_device(device)
        self.networks: dict[tuple, object] = {}
        self.served = 0

    def _network(self, recipe: tuple):
        net = self.networks.get(recipe)
        if net is None:
            import copy
            from .models.base import Bag
            from .registry import load_model
            name, member, segment, options, _dtype = recipe
            net = load_model(name)
            if isinstance(net, Bag):
                net = list(net.members)[member]
            if segment is not None and hasattr(net, "set_segment"):
                net = copy.copy(net)
                net.set_segment(segment)
            if options:
                net = net.with_options(**dict(options))
            net = net.to(self.device).eval()
            self.networks[recipe] = net
        return net

    def forward(self, recipe: tuple, windows: np.ndarray) -> np.ndarray:
        """windows: float32 [batch, channels, w] -> float32 [batch, sources, channels, w]."""
        net = self._network(recipe)
        dtype = recipe[4]
        x = torch.from_numpy(windows).to(self.device)
        with torch.inference_mode():
            if dtype and dtype != "torch.float32":
                with torch.autocast(device_type=self.device.type, dtype=getattr(torch, dtype.split(".")[-1])):
                    out = net(x)
            else:
                out = net(x)
        self.served += 1
        return out.float().cpu().numpy()

    def info(self) -> dict:
        import ray
        return {"node": ray.get_runtime_context().get_node_id(), "device": str(self.device),
                "served": self.served, "pid": os.getpid()}


class Replicas:
    """N replicas of the engine's networks on a Ray cluster, for ``run_jobs(..., forward=...)``.

    address: a Ray address, or "local" to start a cluster in this process. replicas: how many actors.
    replica_gpus: GPUs per actor (0: CPU). threads: torch threads per actor (None: Ray's default).
    """

    def __init__(self, address: str, *, replicas: int = 1, replica_gpus: float = 0, repo: str | None = None,
                 threads: int | None = None, device: str | None = None):
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=None if address == "local" else address, ignore_reinit_error=True,
                     include_dashboard=False, log_to_driver=False)
        actor = ray.remote(num_cpus=threads or 1, num_gpus=replica_gpus, max_restarts=-1,
                           max_task_retries=0)(_Replica)
        self.actors = [actor.remote(repo, device, threads) for _ in range(int(replicas))]
        self.busy = [0] * len(self.actors)
        self.lock = threading.Lock()
        self.order = itertools.count()

    def _pick(self, exclude: set[int]) -> int:
        with self.lock:
            free = [i for i in range(len(self.actors)) if i not in exclude]
            if not free:
                raise EngineUnavailable("no model replica answers on the Ray cluster; the engine keeps "
                                        "serving, try again when replicas are back")
            turn = next(self.order)  # ties go round the replicas
            i = min(free, key=lambda k: (self.busy[k], (k - turn) % len(self.actors)))
            self.busy[i] += 1
            return i

    def forward(self, runner, windows: torch.Tensor) -> torch.Tensor:
        """The forward pass of ``runner`` (engine.apply.OverlapAdd) on a replica, retried on another
        replica when one dies mid-batch."""
        ray = _ray()
        recipe = runner.recipe
        x = np.ascontiguousarray(windows.numpy(), dtype=np.float32)
        tried: set[int] = set()
        last = None
        for _ in range(min(RETRIES, len(self.actors))):
            i = self._pick(tried)
            try:
                out = ray.get(self.actors[i].forward.remote(recipe, x))
                return torch.from_numpy(out)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                tried.add(i)
                last = e
                time.sleep(0.05)
            finally:
                with self.lock:
                    self.busy[i] -= 1
        raise EngineUnavailable(f"model replicas on the Ray cluster failed this batch ({last})")

    def status(self) -> list[dict]:
        """One row per replica: node, device, served, and queue (batches in flight here)."""
        ray = _ray()
        rows = []
        for i, a in enumerate(self.actors):
            try:
                row = ray.get(a.info.remote(), timeout=5)
            except Exception as e:  # a replica being restarted
                row = {"node": None, "device": None, "served": None, "error": str(e).splitlines()[0]}
            row["queue"] = self.busy[i]
            rows.append(row)
        return rows
