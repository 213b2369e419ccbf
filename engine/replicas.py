"""Model replicas on a Ray cluster (``unbake serve --ray ADDRESS``): the daemon stays the front door
and keeps the sessions, the segment grid and the overlap-add (cheap state, where the client
connects); the forward passes run on Ray actors that each load the model once, on a GPU when their
node has one and ``--replica-gpus`` gives them one.

    scheduler worker (one per replica)          Ray actor _Replica (spread over the nodes)
    run_jobs(batch, forward=Replicas.forward)
      windows float32 [batch, channels, w]  ──▶  forward(recipe, windows)
        (filled from the session's track)          network for the recipe (loaded once, warm)
      ◀── float32 [batch, sources, channels, w]    the same torch forward as engine.apply.OverlapAdd
    put back in grid order (engine.apply)

A replica builds a runner's network from its ``recipe`` (engine.apply.Streamer: model name,
weights folder, bag member, segment override, model options, dtype) out of the same weights
(verified by sha256 as everywhere; the weights folder is a path every node sees), and runs the
forward as ``OverlapAdd.forward`` does, so the outputs are the local engine's (tests: max |diff| 0).

Batching: the scheduler forms the batches (``--max-batch``, ``--max-queue-delay-ms``, fair between
sessions) and has one batch in flight per replica; a replica gets the next batch when it is done
(least busy first). A replica that dies mid-batch (killed, its node lost): the batch is sent again to
another replica, and Ray restarts the dead one; no replica answers: that batch's sessions get
E_UNAVAILABLE with one line saying so, and the daemon keeps serving (the next session tries again).

Windows travel as numpy arrays through Ray's object store (Ray's own serialization, inside Ray; the
engine's wire protocol is unchanged and never pickles).
"""
from __future__ import annotations

import copy
import itertools
import os
import threading
import time

import numpy as np
import torch

from .errors import BadRequest, EngineUnavailable, UnbakeError
from .raycluster import connect

CALL_TIMEOUT_S = 600.0  # one batch on one replica, at most (a hung replica: the batch goes elsewhere)
START_TIMEOUT_S = 120.0  # for every replica to be placed and started
STATUS_WAIT_S = 0.5  # how long ``status`` waits for replicas to say where they are


class _Replica:
    """One model replica (a Ray actor): models loaded once, networks built from recipes, kept warm."""

    def __init__(self, device: str | None, threads: int | None):
        if threads:
            torch.set_num_threads(int(threads))
        from .devices import pick_device
        self.device = pick_device(device)
        self.models: dict[tuple, object] = {}  # (name, weights folder) -> Separator or Bag
        self.networks: dict[tuple, object] = {}  # recipe -> the member network, as the front door's
        self.served = 0

    def warm(self, name: str, repo: str | None) -> None:
        """Load (and verify) a model before the first batch needs it."""
        self._model(name, repo)

    def _model(self, name: str, repo: str | None):
        model = self.models.get((name, repo))
        if model is None:
            from .registry import load_model
            model = self.models[(name, repo)] = load_model(name, repo=repo, device=self.device).eval()
        return model

    def _network(self, recipe: tuple):
        net = self.networks.get(recipe)
        if net is None:
            from .models.base import Bag
            name, repo, member, segment, options, _dtype = recipe
            net = self._model(name, repo)
            if isinstance(net, Bag):
                net = list(net.members)[member]
            if segment is not None and hasattr(net, "set_segment"):  # as engine.apply.Streamer
                net = copy.copy(net)
                net.set_segment(segment)
            if options:
                net = net.with_options(**dict(options))
            self.networks[recipe] = net
        return net

    def forward(self, recipe: tuple, windows: np.ndarray) -> np.ndarray:
        """windows: float32 [batch, channels, w] -> float32 [batch, sources, channels, w]."""
        net = self._network(recipe)
        dtype = recipe[5]
        x = torch.from_numpy(windows).to(self.device)
        with torch.inference_mode():
            if dtype is not None and dtype != str(torch.float32):
                with torch.autocast(device_type=self.device.type, dtype=getattr(torch, dtype.split(".")[-1])):
                    out = net(x)
            else:
                out = net(x)
        self.served += 1
        return out.float().cpu().numpy()

    def info(self) -> dict:
        import ray
        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "device": str(self.device), "pid": os.getpid(),
                "threads": torch.get_num_threads()}


class Replicas:
    """``replicas`` actors on the Ray cluster at ``address`` (``local``: start one in process), for
    ``run_jobs(..., forward=self.forward)``.

    replica_gpus: GPUs per replica (float, 0: CPU replicas; a fraction shares a GPU). threads: torch
    threads (and Ray CPUs) per replica (None: 1). device: the replicas' device name (None: cuda when
    the replica was given a GPU, else cpu). Replicas are spread over the nodes (Ray's SPREAD) and
    named ``unbake-replica-N`` in the Ray namespace ``self.namespace``.
    Raises BadRequest (no Ray, no cluster at ``address``, a bad count).
    """

    def __init__(self, address: str, *, replicas: int = 1, replica_gpus: float = 0, threads: int | None = None,
                 device: str | None = None):
        if int(replicas) < 1:
            raise BadRequest(f"--replicas {replicas}: at least 1")
        if replica_gpus < 0:
            raise BadRequest(f"--replica-gpus {replica_gpus}: 0 or more")
        self.ray = ray = connect(address)
        self.address = address
        self.namespace = ray.get_runtime_context().namespace
        threads = int(threads or 1)
        actor = ray.remote(num_cpus=threads, num_gpus=replica_gpus, max_restarts=-1, max_task_retries=0,
                           scheduling_strategy="SPREAD")(_Replica)
        self.actors = [actor.options(name=f"unbake-replica-{i}").remote(device, threads)
                       for i in range(int(replicas))]
        self.busy = [0] * len(self.actors)  # batches in flight from this daemon
        self.served = [0] * len(self.actors)
        self.failed = [0] * len(self.actors)
        self.info: list[dict] = [{} for _ in self.actors]
        self.info_refs = [a.info.remote() for a in self.actors]
        self.lock = threading.Lock()
        self.turn = itertools.count()
        ready, _ = ray.wait(list(self.info_refs), num_returns=len(self.actors), timeout=START_TIMEOUT_S)
        if len(ready) < len(self.actors):  # the cluster has no room for them: say so, do not hang
            free = ray.available_resources()
            self.close()
            raise BadRequest(f"--ray {address}: {len(self.actors) - len(ready)} of {len(self.actors)} model replicas "
                             f"did not start within {START_TIMEOUT_S:.0f} s; each asks for {threads} CPU(s)"
                             f" and {replica_gpus:g} GPU(s), the cluster has {free.get('CPU', 0):g} CPU(s) and "
                             f"{free.get('GPU', 0):g} GPU(s) free")

    def warm(self, name: str, repo: str | None, timeout_s: float = 600.0) -> None:
        """Every replica loads ``name`` from ``repo`` (the front door's model, engine.cache). Raises
        EngineUnavailable when none could."""
        refs = [a.warm.remote(name, repo) for a in self.actors]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        errors = []
        for r in ready:
            try:
                self.ray.get(r)
            except Exception as e:  # noqa: BLE001 - a replica's own failure, reported below
                errors.append(e)
        if len(errors) == len(refs) or not ready:
            raise EngineUnavailable(f"no model replica could load {name} on the Ray cluster "
                                    f"({_line(errors[0]) if errors else 'timed out'})")

    def _pick(self, tried: set[int]) -> int:
        with self.lock:
            free = [i for i in range(len(self.actors)) if i not in tried]
            if not free:
                return -1
            turn = next(self.turn)  # ties go round the replicas
            i = min(free, key=lambda k: (self.busy[k], (k - turn) % len(self.actors)))
            self.busy[i] += 1
            return i

    def forward(self, runner, windows: torch.Tensor) -> torch.Tensor:
        """``runner.forward(windows)`` (engine.apply.OverlapAdd) on a replica: float32 [batch,
        channels, w] -> float32 [batch, sources, channels, w]. A replica that fails the batch (died,
        restarting, timed out) is left out and the batch goes to the next; every replica tried and
        each try fails twice over: EngineUnavailable."""
        ray = self.ray
        b, c, w = windows.shape
        x = np.ascontiguousarray(windows.numpy(), dtype=np.float32)
        last: Exception | None = None
        for attempt in range(2):  # a replica being restarted by Ray comes back for the second round
            tried: set[int] = set()
            while True:
                i = self._pick(tried)
                if i < 0:
                    break
                try:
                    out = ray.get(self.actors[i].forward.remote(runner.recipe, x), timeout=CALL_TIMEOUT_S)
                    with self.lock:
                        self.served[i] += 1
                    out = torch.from_numpy(out)
                    assert out.shape == (b, runner.n_sources, c, w), out.shape  # [batch, sources, channels, w]
                    return out
                except ray.exceptions.RayTaskError as e:  # the replica's own error (weights missing there...)
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, UnbakeError):
                        raise type(cause)(f"model replica unbake-replica-{i}: {_line(cause)}") from None
                    raise UnbakeError(f"model replica unbake-replica-{i}: {_line(cause or e)}") from None
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.GetTimeoutError) as e:
                    tried.add(i)
                    last = e
                    with self.lock:
                        self.failed[i] += 1
                        self.info_refs[i] = self.actors[i].info.remote()  # where it comes back
                finally:
                    with self.lock:
                        self.busy[i] -= 1
            time.sleep(1.0 + attempt)
        raise EngineUnavailable(f"no model replica on the Ray cluster answers ({_line(last)}); the engine "
                                f"keeps serving: try again when the replicas are back")

    def status(self) -> list[dict]:
        """One row per replica: name, node (Ray node id), device, pid, threads, served (batches),
        failed (batches it failed, sent elsewhere), queue (batches in flight from this daemon);
        node/device/pid None while a replica is starting or restarting."""
        refs = [r for r in self.info_refs if r is not None]
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=STATUS_WAIT_S)
        rows = []
        for i, ref in enumerate(self.info_refs):
            if ref is not None:
                ready, _ = self.ray.wait([ref], timeout=0)
                if ready:
                    try:
                        self.info[i] = self.ray.get(ref)
                    except Exception:  # noqa: BLE001 - still restarting: asked again later
                        self.info[i] = {}
                        self.info_refs[i] = self.actors[i].info.remote()
                    else:
                        self.info_refs[i] = None
            info = self.info[i]
            rows.append({"name": f"unbake-replica-{i}", "node": info.get("node"), "device": info.get("device"),
                         "pid": info.get("pid"), "threads": info.get("threads"), "served": self.served[i],
                         "failed": self.failed[i], "queue": self.busy[i]})
        return rows

    def close(self) -> None:
        """Stop the replicas (and leave the cluster if this process started it)."""
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.ray.shutdown()


def _line(e: BaseException | None) -> str:
    text = str(e).strip() if e is not None else ""
    return text.splitlines()[0] if text else type(e).__name__
