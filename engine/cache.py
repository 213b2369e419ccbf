"""The warm model cache: each model is loaded once and shared by every session; models no session
uses are unloaded, least recently used first, to stay under a memory budget.

``acquire(name)`` loads (once, even when several threads ask at the same time) and pins a model;
``release(name)`` unpins it. A model's memory is the size of its parameters and buffers.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from . import registry
from .errors import QueueFull
from .heap import release_free_memory

GB = 1024 ** 3


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@dataclass
class Entry:
    name: str
    model: object = None
    bytes: int = 0
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loading: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class ModelCache:
    """name -> warm model. repo, device: as engine.registry.load_model.

    memory_budget_bytes: None for no limit. A model that would take the cache over the budget
    first unloads idle models (no users), oldest first; if that is not enough, ``acquire``
    raises QueueFull (retry when other sessions are done) rather than overcommit.
    warmup: called with each freshly loaded model (one dummy forward) before anyone gets it.
    """

    def __init__(self, repo=None, device="cpu", memory_budget_bytes: int | None = None, warmup=None):
        self.repo, self.device = repo, device
        self.budget = memory_budget_bytes
        self.warmup = warmup
        self.lock = threading.Lock()
        self.entries: dict[str, Entry] = {}
        self.loads = 0
        self.evictions = 0

    def resolve(self, name: str | None) -> str:
        return name or registry.default_model(self.repo)

    def acquire(self, name: str | None):
        """(name, model), loaded once and pinned until ``release(name)``.
        Raises UnknownModel, WeightsMissing, ChecksumMismatch, CheckpointError, QueueFull."""
        name = self.resolve(name)
        with self.lock:
            entry = self.entries.get(name)
            owner = entry is None
            if owner:
                entry = self.entries[name] = Entry(name)
            entry.users += 1
        if owner:
            try:
                model = registry.load_model(name, repo=self.repo, device=self.device)
                size = model_bytes(model)
                with self.lock:
                    self._make_room(size, name)
                if self.warmup is not None:
                    self.warmup(model)
                entry.model, entry.bytes = model, size
                self.loads += 1
                release_free_memory()  # the checkpoint's and the warm-up's temporaries
            except Exception as e:
                entry.error = e
                with self.lock:
                    self.entries.pop(name, None)
                raise
            finally:
                entry.loading.set()
        else:
            entry.loading.wait()
            if entry.error is not None:
                raise entry.error
        entry.last_used = time.monotonic()
        return name, entry.model

    def release(self, name: str) -> None:
        with self.lock:
            entry = self.entries.get(name)
            if entry is not None:
                entry.users = max(0, entry.users - 1)
                entry.last_used = time.monotonic()

    def _make_room(self, size: int, loading: str) -> None:
        if self.budget is None:
            return
        used = sum(e.bytes for e in self.entries.values())
        idle = sorted((e for e in self.entries.values() if e.users == 0 and e.model is not None),
                      key=lambda e: e.last_used)
        while used + size > self.budget and idle:
            victim = idle.pop(0)
            used -= victim.bytes
            del self.entries[victim.name]
            self.evictions += 1
            if torch.device(self.device).type == "cuda":
                torch.cuda.empty_cache()
        if used + size > self.budget:
            self.entries.pop(loading, None)
            raise QueueFull(f"{loading}: needs {size / GB:.2f} GB; {used / GB:.2f} GB of the "
                            f"{self.budget / GB:.2f} GB memory budget are held by models in use")

    def info(self) -> list[dict]:
        now = time.monotonic()
        with self.lock:
            return [{"name": e.name, "memory_mb": round(e.bytes / 2 ** 20, 1), "sessions": e.users,
                     "idle_s": round(now - e.last_used, 1), "loaded": e.model is not None}
                    for e in self.entries.values()]

    def loaded(self) -> list[str]:
        with self.lock:
            return [n for n, e in self.entries.items() if e.model is not None]
