"""What the daemon asks of the torch side: device, the warm model cache, the scheduler, opening
sessions. The daemon (socket, validation, replies) imports this lazily and never torch itself.
"""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Callable

import torch

from . import devices, presets, protocol as P, registry, weights
from .cache import GB, ModelCache
from .errors import BadRequest
from .scheduler import Scheduler
from .ensemble import ResidualTrack, open_track
from .sessions import TrackSeparator

WARMUP_S = 1.0


def warmup(model) -> None:
    """One dummy forward on the model's own device (first-call allocations, kernel selection)."""
    members = list(getattr(model, "members", [])) or [model]
    for m in members:
        w = m.valid_length(min(m.segment_frames, int(WARMUP_S * m.sample_rate)))
        device = next(iter(m.parameters()), torch.empty(0)).device
        with torch.inference_mode():
            m(torch.zeros(1, m.audio_channels, w, device=device))


def default_memory_budget_bytes(device: torch.device) -> int:
    """Half the machine's RAM (CPU), or 80% of the GPU's memory."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.get_device_properties(device).total_memory)
    return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class Service:
    """device: a name for engine.devices.pick_device (None: best available). fp16: CUDA autocast.
    repo: the engine's own weights folder (None: $UNBAKE_REPO or the user cache). threads: CPU
    threads of the networks (None: torch's default). emit: the daemon's thread-safe reply function
    (identity, header, pcm).

    ray: a Ray cluster address (or "local"): the forward passes run on ``replicas`` model replicas
    there (engine.replicas), each with ``replica_threads`` CPU threads and ``replica_gpus`` GPUs;
    device and fp16 are then the replicas' (fp16 needs replica_gpus > 0), and this process keeps
    the sessions, the grid and the overlap-add, with the models on its CPU for their geometry.
    None: everything here.

    cpu_runtime: "onnx" runs HTDemucs' network on onnxruntime on the CPU (engine.models.onnx_core;
    not with ray); None or "torch": torch."""

    def __init__(self, emit: Callable, *, device: str | None = None, fp16: bool = False, repo=None,
                 threads: int | None = None, max_batch: int | None = None, max_queue_delay_s: float = 0.002,
                 memory_budget_gb: float | None = None, limits: P.Limits = P.Limits(),
                 ray: str | None = None, replicas: int = 1, replica_gpus: float = 0,
                 replica_threads: int | None = None, cpu_runtime: str | None = None):
        if cpu_runtime not in (None, "torch") and ray is not None:
            raise BadRequest("--cpu-runtime onnx is not available with --ray (the replicas run torch)")
        if threads or ray is not None:  # with --ray this process only fills windows and adds them up
            torch.set_num_threads(threads or 1)
        self.threads = torch.get_num_threads()
        self.repo = repo
        self.replicas = None
        if ray is None:
            self.device = devices.pick_device(device)
            self.dtype = devices.pick_dtype(self.device, fp16)
        else:
            from .replicas import Replicas
            if fp16 and not replica_gpus:
                raise BadRequest("--fp16 with --ray needs GPU replicas (--replica-gpus); CPU replicas "
                                 "compute in float32")
            if device not in (None, "", "auto", "cpu") and not replica_gpus:
                raise BadRequest(f"-d {device} with --ray needs GPU replicas (--replica-gpus)")
            self.device = torch.device("cpu")  # the front door's copy of each model: its geometry only
            self.dtype = torch.float16 if fp16 else None
            self.replicas = Replicas(ray, replicas=replicas, replica_gpus=replica_gpus, threads=replica_threads,
                                     device=device)
        budget = (default_memory_budget_bytes(self.device) if memory_budget_gb is None
                  else int(memory_budget_gb * GB))
        self.cpu_runtime = cpu_runtime or "torch"

        def prepare(model):
            if self.cpu_runtime != "torch":
                from .models.onnx_core import use_cpu_runtime
                use_cpu_runtime(model, self.device, self.cpu_runtime,
                                lambda msg: print(f"unbake serve: {msg}", file=sys.stderr, flush=True))
            warmup(model)
        self.cache = ModelCache(repo, self.device, budget, warmup=prepare if self.replicas is None else
                                (lambda m: self.replicas.warm(*m.loaded_as)))
        if max_batch is None:  # batching is slower on CPU (bench_htdemucs)
            max_batch = 8 if replica_gpus or self.device.type != "cpu" else 1
        self.scheduler = Scheduler(emit, max_batch=max_batch, max_queue_delay_s=max_queue_delay_s,
                                   max_pending=limits.max_pending_per_session,
                                   forward=None if self.replicas is None else self.replicas.forward,
                                   workers=1 if self.replicas is None else len(self.replicas.actors))

    def preload(self, name: str) -> str:
        """Load and warm a model so the first session finds it ready. Returns its name."""
        name, _ = self.cache.acquire(name)
        self.cache.release(name)
        return name

    def settings(self) -> dict:
        """What this engine computes with, as ``hello`` states it: device (str), fp16 (bool),
        threads (int), max_batch (int), cpu_runtime (str: torch or onnx); with --ray also ray (the address) and replicas (int), and
        device is "ray" (each replica's own device is in ``status``)."""
        if self.replicas is not None:
            return {"device": "ray", "fp16": self.dtype == torch.float16, "threads": self.threads,
                    "max_batch": self.scheduler.max_batch, "ray": self.replicas.address,
                    "replicas": len(self.replicas.actors)}
        return {"device": str(self.device), "fp16": self.dtype == torch.float16, "threads": self.threads,
                "max_batch": self.scheduler.max_batch, "cpu_runtime": self.cpu_runtime}

    def open(self, sid: str, model: str | None, sample_rate: int, channels: int, options: dict,
             repo: str | None = None) -> dict:
        """Load (or share) the model, start the session's track, register it with the scheduler.
        ``model`` may be a separation preset (engine.presets): its models are loaded, an ensemble
        is an engine.ensemble.EnsembleTrack. ``repo``: a weights folder for this session instead of
        the engine's own (None); its files are verified the same way, and its models are cached apart
        from same-named ones of other folders (engine.cache). The daemon decides whether the peer
        may name one. Returns the ``ready`` reply's fields.
        Raises ModelError, BadRequest, QueueFull."""
        if presets.is_preset(model):
            return self._open_preset(sid, model, sample_rate, channels, options, repo)
        name, net = self.cache.acquire(model, repo)
        try:
            opts = dict(options)
            two_stems = opts.pop("two_stems", None)
            residual = opts.pop("residual", False)
            dtype = self._dtype(opts.pop("precision", None), [net])
            try:
                track = TrackSeparator(net, sample_rate, channels, two_stems=two_stems,
                                       where=f"session {sid}", dtype=dtype, **opts)
            except ValueError as e:
                raise BadRequest(f"session {sid}: {e}") from None
            if residual:
                track = ResidualTrack(track, residual)
            self.scheduler.add(sid, track, name, on_removed=lambda: self.cache.release(name, repo))
        except BaseException:
            self.cache.release(name, repo)
            raise
        return {"session": sid, "model": name, "stems": track.stems, "sample_rate": sample_rate,
                "channels": channels, "model_sample_rate": net.sample_rate,
                "latency_samples": track.latency_samples, "options": options,
                "weights_sha256": registry.weights_sha256(name, self.repo if repo is None else repo),
                "repo": repo}

    def _dtype(self, precision: str | None, models: list) -> torch.dtype | None:
        """The session's dtype: the engine's (fp16 on CUDA, or None), or bf16 when the session asks
        and it is verified for its models and native on the device (engine.devices.precision_dtype)."""
        if precision in (None, "fp32"):
            return self.dtype
        if self.replicas is not None and precision == "bf16":  # the replicas' devices are not known here
            raise BadRequest("precision bf16 is not available with --ray (replicas compute in fp32 or --fp16)")
        return devices.precision_dtype(self.device, precision, models)

    def _open_preset(self, sid: str, preset: str, sample_rate: int, channels: int, options: dict,
                     repo: str | None = None) -> dict:
        folder = self.repo if repo is None else repo
        options = dict(options)
        precision = options.pop("precision", None)
        plan = presets.resolve(preset, options, folder)
        held: list[str] = []
        try:
            models = {}
            for m in dict.fromkeys(m.model for m in plan.members):
                name, models[m] = self.cache.acquire(m, repo)
                held.append(name)
            track = open_track(plan, models, sample_rate, channels, where=f"session {sid}",
                               dtype=self._dtype(precision, list(models.values())))

            def release() -> None:
                for name in held:
                    self.cache.release(name, repo)
            self.scheduler.add(sid, track, preset, on_removed=release)
        except BaseException:
            for name in held:
                self.cache.release(name, repo)
            raise
        names = list(models)
        sha = [registry.weights_sha256(m, folder) for m in names]
        return {"session": sid, "model": preset, "stems": track.stems, "sample_rate": sample_rate,
                "channels": channels, "model_sample_rate": models[names[0]].sample_rate,
                "latency_samples": track.latency_samples, "options": options, "repo": repo,
                "weights_sha256": sha[0] if len(sha) == 1 else (
                    None if None in sha else hashlib.sha256("".join(
                        f"{m} {h}\n" for m, h in zip(names, sha)).encode()).hexdigest())}

    def models(self) -> list[dict]:
        loaded = set(self.cache.loaded())
        return [{"name": name, "sources": list(spec.sources), "installed": weights.is_installed(spec, self.repo),
                 "loaded": name in loaded, "description": spec.description}
                for name, spec in weights.catalog().items()]

    def status(self) -> dict:
        return {**self.settings(), "models": self.cache.info(),
                "memory_budget_gb": None if self.cache.budget is None else round(self.cache.budget / GB, 2),
                "queue_depth": self.scheduler.queue_depth, "batches": self.scheduler.batches, "segments": self.scheduler.segments,
                **({} if self.replicas is None else {"replicas": self.replicas.status(),
                                                     "ray_namespace": self.replicas.namespace})}

    def stop(self, timeout_s: float = 5.0) -> None:
        self.scheduler.stop(timeout_s)
        if self.replicas is not None:
            self.replicas.close()
