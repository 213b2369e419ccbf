"""``unbake bounce --ray ADDRESS``: the inputs of one bounce spread over the workers of a Ray cluster.

    driver (this process)                          BounceWorker (a Ray actor, one per node by default)
    check_run, plan_run (as ``run``)               its own engine daemon on a private ipc:// socket,
    a job to each idle worker  ---- bounce(job) -> the model warm; bounce_one(job) -> Result
    [k/N] lines, the summary table  <-- Result     (the stems, the sidecar: written by the worker)

**Storage every node sees.** Inputs and outputs are paths, read and written by the workers: they must
be on storage every node mounts at the same path (NFS, a cluster file system, or one machine). Inputs
are expanded on the driver; a worker that cannot read one says so, naming its node, and that input
fails; a worker whose node cannot write the output folder stops the run before any input.

**Same outputs as a local bounce.** Each worker runs the same ``bounce_one`` through a daemon of the
same engine (``--jobs THREADS`` torch threads, the run's ``--device``/``--fp16``/``--repo``), so its
stems, sidecars, atomic writes and resume are those of ``unbake bounce``; every worker must report
the same model, weights sha256, chain and options as the first, else the run stops in one line.

**A worker killed mid-run** (its node lost, OOM, SIGKILL): its daemon dies with it (parent-death
signal; its private folder is deleted by the next worker that starts on the node), Ray restarts the actor (``max_restarts=-1``; tasks are never retried by Ray, we do it), and
its input goes back to the front of the queue for the next live worker, whose ``bounce_one`` first
deletes the dead worker's temporaries; the sidecar is written last, so nothing partial is vouched
for. An input that kills ``MAX_DEATHS`` workers fails; with no worker alive for ``no_worker_s`` the
remaining inputs fail (E_UNAVAILABLE).

Settings, Jobs and Results cross to the workers by Ray's own serialization (pickle, inside the
cluster); the engine's wire protocol never pickles anything. Ray is optional: without it ``--ray``
says in one line how to install it (``engine.raycluster.RAY_MISSING``).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable

from engine.errors import BadRequest, EngineUnavailable, UnbakeError, from_code

from .bounce import (Context, Job, Result, Settings, bounce_one, check_run, plan_run, prepare,
                     progress_line)

__all__ = ["BounceWorker", "run_ray", "START_S", "LATE_S", "NO_WORKER_S", "MAX_DEATHS"]

START_S = 300.0     # workers (their daemon started, the model loaded) must answer within this
NO_WORKER_S = 120.0  # with every worker gone this long, the inputs left fail
MAX_DEATHS = 3      # an input whose bounce took down this many workers fails
LATE_S = 10.0       # after the first worker answers, wait this long (at least) for the others
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # preexec_fn: SIGKILL when the worker process dies
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_DIR_PREFIX = "unbake-bounce-"  # + the worker's pid: its private folder (the daemon's socket, its log)


def _sweep_dead_workers_dirs() -> None:
    """Delete the private folders of this user's workers that were killed (their pid is gone)."""
    root = Path(tempfile.gettempdir())
    for d in root.glob(f"{_DIR_PREFIX}*-*"):
        pid = d.name[len(_DIR_PREFIX):].split("-")[0]
        try:
            if pid.isdigit() and d.lstat().st_uid == os.getuid() and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _ray_errors_to_stderr() -> None:
    """Ray's driver prints the cluster's error messages ("(raylet) A worker died ...") on stdout,
    where the summary table goes (scripts read it): send them to stderr. Ray's private API: when it
    moves, they stay on stdout, nothing else changes."""
    try:
        from ray._private import worker
        printer = worker.print_to_stdstream
        if getattr(printer, "_unbake", False):
            return

        def to_stderr(data, ignore_prefix):
            printer({**data, "is_err": True}, ignore_prefix)
        to_stderr._unbake = True
        worker.print_to_stdstream = to_stderr
    except (ImportError, AttributeError):
        pass


def _shared_probe(out: Path) -> Path:
    """The output folder, made, with a hidden marker file in it for the workers to look for (a node
    that does not see it does not share the storage). Raises OutputError."""
    from engine.errors import OutputError
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".unbake-ray-check.", dir=out)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"{out}: cannot write ({e.strerror or e})") from None
    return Path(name)


class BounceWorker:
    """One worker (wrapped by ``ray.remote`` in ``run_ray``): a private engine daemon on its node,
    kept warm, and ``bounce_one`` through it.

    settings: the run's Settings (jobs: inputs in flight on this worker, one Client per thread);
    threads (int): torch threads of its daemon (``--jobs``); env ({name: value}): extra environment
    for the daemon (the driver's UNBAKE_REPO); probe (Path or None): the driver's marker file in the
    output folder, which this node must see. Never raises from ``__init__``: a failure (output folder
    not shared with this node, daemon not starting, unknown model, bad chain) is kept and reported by
    ``info()`` as ``error``/``code``.
    """

    def __init__(self, settings: Settings, threads: int = 1, env: dict | None = None, probe: Path | None = None):
        import ray
        self.settings, self.threads, self.env = settings, int(threads), dict(env or {})
        self.node = ray.get_runtime_context().get_node_id()
        _sweep_dead_workers_dirs()
        self.dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        self.endpoint = f"ipc://{self.dir}/engine.sock"
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.local = threading.local()
        self.ctx: Context | None = None
        self.error: tuple[str, str] | None = None
        try:
            out = Path(settings.out_dir).resolve()
            if probe is not None and not (probe.exists() and os.access(out, os.W_OK | os.X_OK)):
                raise BadRequest(f"--ray: Ray node {self.node} does not see the output folder {out} (bounce "
                                 f"--ray needs inputs and outputs on storage every node sees)")
            self._start_daemon()
            self.ctx = prepare(self._client(), settings)
        except UnbakeError as e:
            self.error = (e.code, str(e))
        except Exception as e:  # e.g. a chain preset that does not load: one line, not a traceback
            self.error = ("E_INTERNAL", f"--ray: worker on node {self.node}: {type(e).__name__}: {e}")

    # -- the private daemon: built here, one per worker, dies with it
    def _start_daemon(self) -> None:
        """Spawn ``python -m engine.daemon`` on the private endpoint and wait until it answers.
        Raises EngineUnavailable (it exited, or did not answer within START_S)."""
        import engine
        from plugin_bridge.client import Client
        s = self.settings
        cmd = [sys.executable, "-m", "engine.daemon", "--endpoint", self.endpoint, "--idle-exit-s", "600",
               "--jobs", str(self.threads), *s.daemon_args, *(["--repo", s.repo] if s.repo else [])]
        env = dict(os.environ, **self.env)
        root = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        log = open(os.path.join(self.dir, "engine.log"), "ab")
        with log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         close_fds=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_S
        while True:
            try:
                with Client(self.endpoint, autostart=False, timeout_s=2, retries=0) as c:
                    c.hello()
                return
            except EngineUnavailable:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = Path(self.dir, "engine.log").read_text(errors="replace").strip().splitlines()[-1:]
                    raise EngineUnavailable(f"--ray: the engine on Ray node {self.node} did not start"
                                            + (f": {tail[0]}" if tail else "")) from None
                time.sleep(0.2)

    def _client(self):
        """This thread's Client of the private daemon (a zmq socket is not thread-safe)."""
        from plugin_bridge.client import Client
        if getattr(self.local, "client", None) is None:
            self.local.client = Client(self.endpoint, autostart=False, timeout_s=self.settings.timeout_s,
                                       repo=self.settings.repo)
        return self.local.client

    def info(self) -> dict:
        """What the driver needs: error/code (None when ready), identity, stems, engine_version,
        device, model_dir, remix (bool), node (Ray node id), pid (this worker's), daemon_pid."""
        ctx = self.ctx
        return {"error": self.error and self.error[1], "code": self.error and self.error[0],
                "node": self.node, "pid": os.getpid(), "daemon_pid": self.proc and self.proc.pid,
                **({} if ctx is None else {
                    "identity": ctx.identity, "stems": list(ctx.stems), "engine_version": ctx.engine_version,
                    "device": ctx.device, "model_dir": ctx.model_dir, "remix": ctx.preset is not None})}

    def bounce(self, job: Job) -> Result:
        """``bounce_one`` through this worker's daemon; an input this node cannot see fails with a line
        naming the node. EngineUnavailable: the input fails, the daemon is restarted if it died."""
        path = job.input.path
        if job.error is None and path is not None and not os.path.exists(path):
            return Result(job.input.source, "failed", 0.0, f"no such file on Ray node {self.node} (bounce --ray "
                          f"needs inputs on storage every node sees)", "E_BAD_AUDIO")
        client = self._client()
        try:
            return bounce_one(job, client, self.settings, self.ctx)
        except EngineUnavailable as e:
            client.close()
            self.local.client = None
            with self.lock:
                if self.proc is None or self.proc.poll() is not None:
                    try:
                        self._start_daemon()
                    except EngineUnavailable:
                        pass  # the next input says so
            return e.result

    def close(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL) and delete the private folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _same(a: dict, b: dict) -> bool:
    return a["identity"] == b["identity"] and a["stems"] == b["stems"] and a["model_dir"] == b["model_dir"]


def run_ray(args: Iterable[str], settings: Settings, address: str, *, workers: int | None = None,
            worker_gpus: float = 0.0, threads: int = 1, lists: Iterable[str] = (),
            log: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None,
            no_worker_s: float = NO_WORKER_S) -> list[Result]:
    """``run`` on the Ray cluster at ``address`` (``engine.raycluster.connect``: HOST:PORT, auto,
    local): one Result per input, in input order; ``log`` hears the same ``[k/N]`` lines, plus one
    ``ray:`` line per worker started, died or restarted; warn(line) of workers that did not start.

    workers: how many (None: one per alive node); worker_gpus: GPUs per worker (default 0);
    threads: CPUs per worker (torch threads of its daemon, default 1); ``settings.jobs``: inputs in
    flight per worker. Raises BadRequest (no Ray, no cluster, no inputs, bad template, workers that
    disagree on the model), and the first worker's start error (typed as in ``run``).
    """
    from engine.raycluster import connect, import_ray
    args, lists = check_run(args, settings, lists)
    import_ray()  # no Ray: its one line first
    ray = connect(address)
    _ray_errors_to_stderr()
    from ray.exceptions import ActorDiedError, RayActorError
    n = workers or sum(1 for node in ray.nodes() if node.get("Alive"))
    if n < 1 or threads < 1 or worker_gpus < 0:
        raise BadRequest(f"--workers {n}, --worker-threads {threads}, --worker-gpus {worker_gpus}: "
                         f"need at least one worker, one thread, no negative GPUs")
    env = {k: os.environ[k] for k in ("UNBAKE_REPO",) if os.environ.get(k)}
    probe = _shared_probe(Path(settings.out_dir).resolve())
    say = log or (lambda line: None)
    handles: list = []
    try:
        # -- the workers: actors spread over the nodes, restarted by Ray when they die
        actor = ray.remote(BounceWorker).options(
            num_cpus=threads, num_gpus=worker_gpus, max_restarts=-1, max_task_retries=0,
            max_concurrency=max(1, settings.jobs), scheduling_strategy="SPREAD")
        handles += [actor.remote(settings, threads, env, probe) for _ in range(n)]
        probes = {h.info.remote(): w for w, h in enumerate(handles)}
        t0 = time.monotonic()
        ready, pending = ray.wait(list(probes), num_returns=1, timeout=START_S)
        if not ready:
            raise EngineUnavailable(f"--ray {address}: no worker started within {START_S:g} s (each needs "
                                    f"{threads} CPU{'s' if threads > 1 else ''} and {worker_gpus:g} GPU)")
        grace_s = max(LATE_S, 2 * (time.monotonic() - t0))  # the others start about as fast, or lack room
        ready, pending = ray.wait(list(probes), num_returns=n, timeout=grace_s)
        if pending and warn is not None:
            warn(f"--ray: {len(pending)} of {n} workers not started after {time.monotonic() - t0:.0f} s "
                 f"(each needs {threads} CPU and {worker_gpus:g} GPU); they join when they start")
        infos: dict[int, dict] = {}
        for ref in sorted(ready, key=lambda r: probes[r]):
            w = probes[ref]
            try:
                info = ray.get(ref)
            except RayActorError as e:
                raise EngineUnavailable(f"--ray: worker {w} died while starting ({type(e).__name__})") from None
            if info["error"]:
                raise from_code(info["code"], info["error"])
            first = infos[min(infos)] if infos else info
            if not _same(first, info):
                raise BadRequest(f"--ray: the worker on node {info['node']} has {info['identity']['model']}, "
                                 f"the one on node {first['node']} {first['identity']['model']}: every node "
                                 f"needs the same weights")
            infos[w] = info
            say(f"ray: worker {w} on node {info['node']} (pid {info['pid']}, engine pid {info['daemon_pid']}, "
                f"device {info['device']})")
        ref_info = infos[min(infos)]
        jobs = plan_run(args, lists, settings, ref_info["model_dir"], ref_info["stems"], ref_info["remix"])
        # -- the dispatch loop: `slots` inputs per live worker, a dead worker's input first in line
        results: list[Result | None] = [None] * len(jobs)
        done = [0]

        def finish(i: int, r: Result) -> None:
            results[i] = r
            done[0] += 1
            say(progress_line(done[0], len(jobs), r))

        queue = deque()
        for i, job in enumerate(jobs):
            if job.error is not None:  # nothing to send: the input was not found, or its paths collide
                finish(i, bounce_one(job, None, settings, None))
            else:
                queue.append(i)
        slots = max(1, settings.jobs)
        nodes = {w: info["node"] for w, info in infos.items()}
        per_node: dict[str, int] = {}
        live, busy = set(infos), {w: 0 for w in infos}
        inflight: dict = {}   # ref -> (worker, job index)
        revive = {ref: probes[ref] for ref in pending}  # info ref -> worker not (or no longer) running
        deaths = {i: 0 for i in range(len(jobs))}
        none_since = None
        while queue or inflight:
            for w in sorted(live):
                while busy[w] < slots and queue:
                    i = queue.popleft()
                    inflight[handles[w].bounce.remote(jobs[i])] = (w, i)
                    busy[w] += 1
            if not inflight and queue:
                none_since = none_since or time.monotonic()
                if time.monotonic() - none_since > no_worker_s:
                    for i in queue:
                        finish(i, Result(jobs[i].input.source, "failed", 0.0, f"no Ray worker left (none came "
                                         f"back within {no_worker_s:g} s)", EngineUnavailable.code))
                    break
            else:
                none_since = None
            ready, _ = ray.wait([*inflight, *revive], num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in revive:
                    w = revive.pop(ref)
                    try:
                        info = ray.get(ref)
                    except ActorDiedError:
                        say(f"ray: worker {w} is gone for good")
                        continue
                    except RayActorError:
                        revive[handles[w].info.remote()] = w  # still restarting: ask again
                        continue
                    how = "restarted on" if w in nodes else "on"
                    if info["error"] or not _same(ref_info, info):
                        say(f"ray: worker {w} {how} node {info['node']} cannot be used: "
                            f"{info['error'] or 'another model or weights'}")
                        continue
                    live.add(w)
                    busy.setdefault(w, 0)
                    nodes[w] = info["node"]
                    say(f"ray: worker {w} {how} node {info['node']} (pid {info['pid']}, engine pid "
                        f"{info['daemon_pid']}, device {info['device']})")
                    continue
                w, i = inflight.pop(ref)
                busy[w] -= 1
                try:
                    r = ray.get(ref)
                except RayActorError as e:
                    deaths[i] += 1
                    if w in live:
                        live.discard(w)
                        revive[handles[w].info.remote()] = w
                        say(f"ray: worker {w} died ({type(e).__name__}); its inputs go to other workers")
                    if deaths[i] >= MAX_DEATHS:
                        finish(i, Result(jobs[i].input.source, "failed", 0.0, f"{MAX_DEATHS} Ray workers died "
                                         f"while bouncing it", EngineUnavailable.code))
                    else:
                        queue.appendleft(i)
                    continue
                per_node[nodes[w]] = per_node.get(nodes[w], 0) + 1
                finish(i, r)
        for node, count in per_node.items():
            say(f"ray: node {node}: {count} input{'s' if count != 1 else ''}")
        return [r for r in results if r is not None]
    finally:
        probe.unlink(missing_ok=True)
        # -- teardown: each daemon stopped by its worker, then the workers themselves
        try:
            ray.wait([h.close.remote() for h in handles], num_returns=len(handles), timeout=15)
        except Exception:
            pass
        for h in handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception:
                pass
