"""The warm model cache: each model is loaded once and shared by every session; models no session
uses are unloaded, least recently used first, to stay under a memory budget.

``acquire(name, repo)`` loads (once, even when several threads ask at the same time) and pins a
model; ``release(name, repo)`` unpins it. A model's memory is the size of its parameters and buffers.

Entries are keyed by (weights folder, name), the folder resolved to a canonical absolute path
(``repo_key``): a model of the same name from another folder (``unbake separate --repo DIR`` against
a running engine) is a different entry, never the one already loaded; the same folder named two
ways (a symlink, a trailing slash, the engine's own folder given explicitly) is one entry.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from . import registry, weights
from .errors import QueueFull
from .protocol import check_model_name
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
    repo: str = ""           # the canonical weights folder (repo_key)
    model: object = None
    bytes: int = 0
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loading: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


def repo_key(repo) -> str:
    """The canonical absolute path (str) of a weights folder (``engine.weights.repo_dir(repo)``:
    ``repo`` > $UNBAKE_REPO > the user cache), symlinks resolved; the folder need not exist."""
    return str(weights.repo_dir(repo).resolve())


class ModelCache:
    """(weights folder, name) -> warm model. repo: the engine's own weights folder (None: $UNBAKE_REPO
    or the user cache), used when ``acquire`` is given none; device: as engine.registry.load_model.

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
        self.entries: dict[tuple[str, str], Entry] = {}
        self.loads = 0
        self.evictions = 0

    def resolve(self, name: str | None, repo=None) -> str:
        """The model name: ``name``, or the default model of the folder (engine.registry.default_model)."""
        return name or registry.default_model(self.repo if repo is None else repo)

    def acquire(self, name: str | None, repo=None):
        """(name, model), loaded once per (folder, name) and pinned until ``release(name, repo)``.
        repo: a weights folder (str or path) for this model instead of the engine's own (None).
        Its files are verified as in the engine's own folder (engine.registry.load_model).
        Raises BadRequest (``name`` is not a name: ``protocol.check_model_name``; checked before any
        entry is made or file looked at), UnknownModel, WeightsMissing, ChecksumMismatch,
        CheckpointError, QueueFull."""
        repo = self.repo if repo is None else repo
        name = check_model_name(self.resolve(name, repo))
        key = (repo_key(repo), name)
        with self.lock:
            entry = self.entries.get(key)
            owner = entry is None
            if owner:
                entry = self.entries[key] = Entry(name, key[0])
            entry.users += 1
        if owner:
            try:
                model = registry.load_model(name, repo=repo, device=self.device)
                # How it was loaded, so that another process can load the same network (engine.replicas).
                model.loaded_as = (name, str(weights.repo_dir(repo)))
                size = model_bytes(model)
                with self.lock:
                    self._make_room(size, key)
                if self.warmup is not None:
                    self.warmup(model)
                entry.model, entry.bytes = model, size
                self.loads += 1
                release_free_memory()  # the checkpoint's and the warm-up's temporaries
            except Exception as e:
                entry.error = e
                with self.lock:
                    self.entries.pop(key, None)
                raise
            finally:
                entry.loading.set()
        else:
            entry.loading.wait()
            if entry.error is not None:
                raise entry.error
        entry.last_used = time.monotonic()
        return name, entry.model

    def release(self, name: str, repo=None) -> None:
        """Unpin what ``acquire(name, repo)`` returned (``name`` as it returned it)."""
        key = (repo_key(self.repo if repo is None else repo), name)
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                entry.users = max(0, entry.users - 1)
                entry.last_used = time.monotonic()

    def _make_room(self, size: int, loading: tuple[str, str]) -> None:
        if self.budget is None:
            return
        used = sum(e.bytes for e in self.entries.values())
        idle = sorted((e for e in self.entries.values() if e.users == 0 and e.model is not None),
                      key=lambda e: e.last_used)
        while used + size > self.budget and idle:
            victim = idle.pop(0)
            used -= victim.bytes
            del self.entries[(victim.repo, victim.name)]
            self.evictions += 1
            if torch.device(self.device).type == "cuda":
                torch.cuda.empty_cache()
        if used + size > self.budget:
            self.entries.pop(loading, None)
            raise QueueFull(f"{loading[1]}: needs {size / GB:.2f} GB; {used / GB:.2f} GB of the "
                            f"{self.budget / GB:.2f} GB memory budget are held by models in use")

    def info(self) -> list[dict]:
        """One dict per entry: name, memory_mb, sessions, idle_s, loaded, and repo: the folder it
        came from when that is not the engine's own (else None)."""
        now = time.monotonic()
        own = repo_key(self.repo)
        with self.lock:
            return [{"name": e.name, "memory_mb": round(e.bytes / 2 ** 20, 1), "sessions": e.users,
                     "idle_s": round(now - e.last_used, 1), "loaded": e.model is not None,
                     "repo": None if e.repo == own else e.repo}
                    for e in self.entries.values()]

    def loaded(self) -> list[str]:
        """Names of the models loaded from the engine's own folder."""
        own = repo_key(self.repo)
        with self.lock:
            return [e.name for e in self.entries.values() if e.model is not None and e.repo == own]
