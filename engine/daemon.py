"""``unbake serve``: the engine daemon. A ZeroMQ ROUTER socket, a poll loop, validate-or-reject.

    clients (DEALER) ──▶ ROUTER ──▶ validate (engine.protocol; limits before any allocation)
                                    ├─ hello / status / models: answered here
                                    ├─ open: a loader thread loads or shares the model -> ready
                                    └─ push / close / cancel -> engine.scheduler (worker thread)
    replies from any thread ──▶ outbox + wake-up pipe ──▶ this loop ──▶ ROUTER ──▶ client

Who reaches the engine (``engine.endpoints``): ``ipc://PATH`` only its own user (the socket file is
0600, in the 0700 runtime folder by default); ``tcp://`` needs CURVE keys (``--curve-secret-key``,
``--curve-allowed-keys``), loopback included, unless ``--allow-any-local-user``
(``UNBAKE_ALLOW_ANY_LOCAL_USER=1``) says that every local user may use it (loopback only: a TCP
endpoint that other machines reach always needs CURVE). Start-up checks everything it can before it
changes or loads anything, so that a bad endpoint, a CURVE file that is missing or has no secret
key, a file in the way of the socket or a runtime folder that is not private is one line and exit
status 1 within a second, whatever ``--preload`` asks; the socket itself is bound after the preload
(a client that finds it gets answers), where only a TCP port in use can still fail.

A peer may name a weights folder for its session (``open.repo``, ``unbake separate --repo DIR``)
only where the daemon listens on a private ipc:// socket (``protocol.ipc_is_private``: ``bind``
creates the socket file 0600, in the 0700 runtime folder by default, so the peer is the engine's
own user or root): the daemon knows its one bound
endpoint, so every peer of a tcp:// engine (loopback: any local user; CURVE: another machine) gets
``E_NOT_PERMITTED`` instead, before anything is opened. The folder's files are verified like the
engine's own (catalog sha256, SHA8 of ``SIG-SHA8.th``).

Every request gets exactly one terminal reply; a request still waiting gets a ``progress``
keep-alive every second, so a client's timeout means the daemon is gone, not busy. A bad message
gets an ``error`` reply (``re`` None when its id is unreadable) and the loop goes on.

This module imports no torch: the torch side (engine.service) is imported when serving starts.
"""
from __future__ import annotations

import argparse
import fcntl
import ipaddress
import os
import queue
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import zmq
import zmq.auth

from . import __version__
from . import endpoints
from . import protocol as P
from .endpoints import is_loopback  # noqa: F401  (the daemon's rule, kept importable from here)
from .heap import peak_rss_bytes, release_free_memory, rss_bytes, tune_heap
from .errors import (BadAudio, BadRequest, EngineUnavailable, LimitExceeded, NotPermitted, NotPrivate,
                     ProtocolError, QueueFull, UnbakeError, UnknownSession)

KEEPALIVE_S = 1.0
TRIM_IDLE_S = 2.0
TICK_S = 0.2
DRAIN_S = 10.0
EXIT_IN_USE = 3


@dataclass
class SessionInfo:
    owner: bytes
    channels: int = 0
    sample_rate: int = 0
    frames_in: int = 0
    ready: bool = False
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class Pending:
    op: str
    sid: str | None
    last_reply: float = field(default_factory=time.monotonic)


class Daemon:
    """endpoint: where to bind (``ipc://PATH`` or ``tcp://HOST:PORT``, ``endpoints.check_endpoint``).
    service_factory(emit) builds the torch side (engine.service.Service).
    idle_exit_s: exit after this long with no session and no request (None: never).
    curve_secret_key (a zmq certificate file with the secret key), curve_allowed_keys (a folder of
    the allowed clients' public certificates): both or neither. allow_any_local_user (bool, default
    False): a loopback tcp:// endpoint without CURVE is allowed (every local user may use the
    engine); refused otherwise. The endpoint, the CURVE files and the socket path are checked here,
    before anything is created: raises BadRequest (a bad endpoint or CURVE file, TCP without CURVE)
    or NotPrivate (something other than a socket of this user at the ipc path)."""

    def __init__(self, endpoint: str, service_factory, *, limits: P.Limits = P.Limits(),
                 idle_exit_s: float | None = None, drain_s: float = DRAIN_S,
                 curve_secret_key: str | None = None, curve_allowed_keys: str | None = None,
                 preload: list[str] = (), log=None, allow_any_local_user: bool = False):
        self.endpoint = endpoints.check_endpoint(endpoint)
        self.curve_secret_key, self.curve_allowed_keys = curve_secret_key, curve_allowed_keys
        self.allow_any_local_user = bool(allow_any_local_user)
        self.curve_keys = self._check_access()  # (public, secret) or None; raises before anything is made
        self.socket_file: tuple[int, int] | None = None  # (st_dev, st_ino) of the ipc socket we bound
        self.peers_may_name_paths = P.ipc_is_private(endpoint)  # open.repo: see the module docstring
        self.limits = limits
        self.idle_exit_s = idle_exit_s
        self.drain_s = drain_s
        self.preload = list(preload)
        self.log = log or (lambda msg: print(f"unbake serve: {msg}", file=sys.stderr, flush=True))
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.service_factory = service_factory
        self.service = None  # built once the endpoint's lock is ours
        self.loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="unbake-load")
        self.sessions: dict[str, SessionInfo] = {}
        self.pending: dict[tuple[bytes, int], Pending] = {}
        self.served = 0
        self.started = time.monotonic()
        self.last_activity = time.monotonic()
        self.stop_requested = False
        self.trimmed = True
        self.stopping_since: float | None = None
        self.lock_fd: int | None = None
        self.auth = None

    # -- replies (any thread) ---------------------------------------------------------------------
    def emit(self, identity: bytes, header: dict, pcm: list) -> None:
        self.outbox.put((identity, header, pcm))
        try:
            os.write(self.wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is already awake

    def _send(self, identity: bytes, header: dict, pcm: list = ()) -> None:
        kind, re = header.get("kind"), header.get("re")
        frames = P.reply(kind, re, list(pcm), **{k: P.to_plain(v) for k, v in header.items()
                                                 if k not in ("kind", "re")})
        try:
            self.router.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY) or its queue is full: drop
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
        if kind in P.TERMINAL:
            self.served += 1
        if re is None:
            return
        key = (identity, re)
        entry = self.pending.get(key)
        if entry is None:
            return
        entry.last_reply = time.monotonic()
        if kind in P.TERMINAL:
            del self.pending[key]
            self._finished(identity, entry, kind, header)

    def _finished(self, identity: bytes, entry: Pending, kind: str, header: dict) -> None:
        info = self.sessions.get(entry.sid) if entry.sid else None
        if info is None:
            return
        info.last_seen = time.monotonic()
        if entry.op == P.OPEN:
            if kind == P.K_READY:
                info.ready = True
            else:
                del self.sessions[entry.sid]
        elif not self.service.scheduler.has(entry.sid):  # closed, or ended by an error
            del self.sessions[entry.sid]

    def _error(self, identity: bytes, re: int | None, err: Exception) -> None:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        self._send(identity, {"kind": P.K_ERROR, "re": re, "code": getattr(err, "code", "E_INTERNAL"),
                              "message": message[:1000]})

    # -- requests (this thread) -------------------------------------------------------------------
    def handle(self, frames: list) -> None:
        if len(frames) < 2:
            return  # no identity or no header: nobody to answer
        identity, header_frame, pcm = frames[0].bytes, frames[1], frames[2:]
        self.last_activity = time.monotonic()
        self.trimmed = False
        re = None
        try:
            if len(pcm) > self.limits.max_frames:  # before looking at any of them
                raise LimitExceeded(f"{len(pcm)} PCM frames in one message, the limit is {self.limits.max_frames}")
            if len(header_frame) > self.limits.max_header_bytes:
                raise LimitExceeded(f"header: {len(header_frame)} bytes, the limit is {self.limits.max_header_bytes}")
            header = P.unpack_header(header_frame.bytes, self.limits)
            re = P.request_id(header)
            req = P.check_request(header, len(pcm), self.limits)
            if (identity, re) in self.pending:
                raise ProtocolError(f"request id {re} is already in use by a request still running")
            if self.stopping_since is not None and req["op"] not in (P.HELLO, P.STATUS):
                raise EngineUnavailable("the engine is shutting down")
            getattr(self, f"_op_{req['op']}")(identity, req, pcm)
        except UnbakeError as e:
            self._error(identity, re, e)
        except Exception as e:  # a bug must not take the daemon down
            self.log(f"internal error on a request: {e!r}")
            self._error(identity, re, UnbakeError(f"internal error: {e!r}"))

    def _op_hello(self, identity, req, pcm):
        self._send(identity, {"kind": P.K_HELLO, "re": req["id"], "protocol": P.PROTOCOL_VERSION,
                              "engine_version": __version__, **self.service.settings(), "pid": os.getpid(),
                              "endpoint": self.endpoint, "limits": self.limits.to_wire()})

    def _op_status(self, identity, req, pcm):
        self._send(identity, {"kind": P.K_STATUS, "re": req["id"], **self.status()})

    def _op_models(self, identity, req, pcm):
        self._track(identity, req, None)
        self.loader.submit(self._run_job, identity, req["id"],
                           lambda: {"kind": P.K_MODELS, "models": self.service.models()})

    def _op_open(self, identity, req, pcm):
        if req.get("repo") is not None and not self.peers_may_name_paths:
            raise NotPermitted(f"open #{req['id']}: this engine listens on {self.endpoint}, whose peers may not "
                               f"name folders on its machine ('repo' is for peers of its own ipc:// socket); "
                               f"start it with `unbake serve --repo DIR` instead")
        mine = sum(1 for s in self.sessions.values() if s.owner == identity)
        if mine >= self.limits.max_sessions_per_client:
            raise QueueFull(f"this client has {mine} sessions open, the limit is "
                            f"{self.limits.max_sessions_per_client}; close some first")
        if len(self.sessions) >= self.limits.max_sessions:
            raise QueueFull(f"{len(self.sessions)} sessions open, the daemon's limit is {self.limits.max_sessions}")
        sid = os.urandom(8).hex()  # not `secrets`: it pulls OpenSSL into every torch-free CLI
        self.sessions[sid] = SessionInfo(identity, req["channels"], req["sample_rate"])
        self._track(identity, req, sid)
        self.loader.submit(self._run_job, identity, req["id"],
                           lambda: {"kind": P.K_READY, **self.service.open(
                               sid, req["model"], req["sample_rate"], req["channels"], req["options"],
                               req.get("repo"))})

    def _session(self, identity: bytes, req: dict) -> SessionInfo:
        info = self.sessions.get(req["session"])
        if info is None or info.owner != identity or not info.ready:
            raise UnknownSession(f"session {req['session']}: not open (closed, cancelled, expired, or "
                                 f"opened by another client)")
        info.last_seen = time.monotonic()
        return info

    def _op_push(self, identity, req, pcm):
        info = self._session(identity, req)
        if req["channels"] != info.channels:
            raise BadAudio(f"push #{req['id']}: {req['channels']} channels, session {req['session']} was "
                           f"opened with {info.channels}")
        block = P.pcm_array(pcm[0].buffer, req["channels"], req["frames"], where=f"push #{req['id']}",
                            first_frame=info.frames_in, sample_rate=info.sample_rate)
        self.service.scheduler.submit(req["session"], identity, req["id"], P.PUSH, block)
        info.frames_in += req["frames"]
        self._track(identity, req, req["session"])

    def _op_close(self, identity, req, pcm):
        self._session(identity, req)
        self.service.scheduler.submit(req["session"], identity, req["id"], P.CLOSE)
        self._track(identity, req, req["session"])

    def _op_cancel(self, identity, req, pcm):
        self._session(identity, req)
        self.service.scheduler.cancel(req["session"])
        self.sessions.pop(req["session"], None)
        self._send(identity, {"kind": P.K_DONE, "re": req["id"], "session": req["session"], "final": True})

    def _track(self, identity: bytes, req: dict, sid: str | None) -> None:
        self.pending[(identity, req["id"])] = Pending(req["op"], sid)

    def _run_job(self, identity: bytes, re: int, job) -> None:
        try:
            self.emit(identity, {"re": re, **job()}, [])
        except UnbakeError as e:
            self.emit(identity, {"kind": P.K_ERROR, "re": re, "code": e.code, "message": str(e)}, [])
        except Exception as e:
            self.log(f"internal error: {e!r}")
            self.emit(identity, {"kind": P.K_ERROR, "re": re, "code": UnbakeError.code,
                                 "message": f"internal error: {e!r}"}, [])

    # -- housekeeping -----------------------------------------------------------------------------
    def status(self) -> dict:
        return {"endpoint": self.endpoint, "pid": os.getpid(), "engine_version": __version__,
                "protocol": P.PROTOCOL_VERSION, "uptime_s": round(time.monotonic() - self.started, 1),
                "sessions": len(self.sessions), "pending_requests": len(self.pending), "served": self.served,
                "rss_mb": round(rss_bytes() / 2 ** 20, 1),
                "peak_rss_mb": round(peak_rss_bytes() / 2 ** 20, 1),
                "idle_exit_s": self.idle_exit_s, "session_ttl_s": self.limits.session_ttl_s,
                "stopping": self.stopping_since is not None, **self.service.status()}

    def _tick(self) -> None:
        now = time.monotonic()
        for (identity, re), entry in list(self.pending.items()):
            if now - entry.last_reply >= KEEPALIVE_S:
                self._send(identity, {"kind": P.K_PROGRESS, "re": re, "session": entry.sid,
                                      "state": "working" if entry.op != P.PUSH else "queued"})
        busy = {e.sid for e in self.pending.values() if e.sid}
        for sid, info in list(self.sessions.items()):
            if sid not in busy and info.ready and now - info.last_seen > self.limits.session_ttl_s:
                self.log(f"session {sid}: idle for {self.limits.session_ttl_s:.0f} s, freed")
                self.service.scheduler.drop(sid)
                del self.sessions[sid]
        if not self.trimmed and not self.pending and now - self.last_activity > TRIM_IDLE_S:
            self.trimmed = True
            release_free_memory()
        if (self.idle_exit_s is not None and not self.sessions and not self.pending
                and now - self.last_activity > self.idle_exit_s and self.stopping_since is None):
            self.log(f"no client for {self.idle_exit_s:.0f} s, exiting")
            self.stop_requested = True

    def _drain_outbox(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                identity, header, pcm = self.outbox.get_nowait()
            except queue.Empty:
                return
            self._send(identity, header, pcm)

    # -- lifecycle --------------------------------------------------------------------------------
    def _check_access(self) -> tuple[bytes, bytes] | None:
        """Who may reach this endpoint, checked before anything is created or loaded: the CURVE
        files (read here: the keys are returned), TCP without CURVE, the ipc socket's path (absent
        or a socket of this user). Raises BadRequest, NotPrivate."""
        secret_file, allowed = self.curve_secret_key, self.curve_allowed_keys
        keys = None
        if secret_file or allowed:
            if not (secret_file and allowed):
                raise BadRequest("CURVE needs both --curve-secret-key FILE and --curve-allowed-keys DIR")
            if not os.path.isfile(secret_file):
                raise BadRequest(f"--curve-secret-key {secret_file}: no such file")
            try:
                public, secret = zmq.auth.load_certificate(secret_file)
            except (OSError, ValueError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split(":")[0]
                raise BadRequest(f"--curve-secret-key {secret_file}: not a readable CURVE certificate "
                                 f"({why})") from None
            if secret is None:
                raise BadRequest(f"--curve-secret-key {secret_file}: no secret key in this certificate file "
                                 f"(give the .key_secret file)")
            if not os.path.isdir(allowed):
                raise BadRequest(f"--curve-allowed-keys {allowed}: not a folder of allowed public keys")
            try:
                zmq.auth.load_certificates(allowed)
            except (OSError, ValueError) as e:
                raise BadRequest(f"--curve-allowed-keys {allowed}: {str(e).splitlines()[0]}") from None
            keys = (public, secret)
        if self.endpoint.startswith("tcp://") and keys is None:
            if not is_loopback(self.endpoint):
                raise BadRequest(f"{self.endpoint} is reachable from other machines: refused without CURVE keys "
                                 f"(--curve-secret-key FILE --curve-allowed-keys DIR); use ipc:// or "
                                 f"tcp://127.0.0.1:PORT with CURVE")
            if not self.allow_any_local_user:
                raise BadRequest(f"{self.endpoint}: every local user can connect to a TCP port, loopback "
                                 f"included: refused without CURVE keys (--curve-secret-key FILE "
                                 f"--curve-allowed-keys DIR); use ipc:// (private to you), or pass "
                                 f"--allow-any-local-user ({endpoints.ALLOW_ANY_LOCAL_USER_ENV}=1) to let "
                                 f"every local user use this engine")
        path = endpoints.ipc_path(self.endpoint)
        if path is not None:
            endpoints.check_socket_path(path)
        return keys

    def _lock(self) -> None:
        """Take the endpoint's lock (``protocol.lock_path``, opened by ``endpoints.open_lock``: never
        through a symlink). Raises EngineUnavailable (another engine holds it), NotPrivate."""
        path = P.lock_path(self.endpoint)
        if endpoints.ipc_path(self.endpoint) is not None:
            folder = os.path.dirname(path) or "."
            try:
                os.makedirs(folder, mode=0o700, exist_ok=True)
            except OSError as e:
                raise NotPrivate(f"{folder}: cannot create the socket's folder ({e.strerror})") from None
        fd = endpoints.open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EngineUnavailable(f"another unbake engine already serves {self.endpoint}") from None
        self.lock_fd = fd

    def bind(self, ctx: zmq.Context) -> None:
        """Bind the ROUTER (CURVE server when keys were given). ipc: only a stale socket of this
        user is replaced (``endpoints.clear_stale_socket``); the socket file is made 0600 and
        remembered, so that only it is removed at exit. Raises NotPrivate, EngineUnavailable (the
        address is in use), BadRequest (libzmq refuses the address)."""
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.SNDTIMEO, 0)
        self.router.setsockopt(zmq.LINGER, 1000)
        self.router.setsockopt(zmq.RCVHWM, 1000)
        self.router.setsockopt(zmq.SNDHWM, 10000)
        if self.curve_keys is not None:
            from zmq.auth.thread import ThreadAuthenticator
            self.auth = ThreadAuthenticator(ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=self.curve_allowed_keys)
            self.router.curve_server = True
            self.router.curve_publickey, self.router.curve_secretkey = self.curve_keys
        path = endpoints.ipc_path(self.endpoint)
        try:
            if path is None:
                self.router.bind(self.endpoint)
                return
            endpoints.clear_stale_socket(path)  # we hold the endpoint's lock: no unbake engine serves it
            old = os.umask(0o077)  # the socket file is created 0600
            try:
                self.router.bind(self.endpoint)
            finally:
                os.umask(old)
        except zmq.ZMQError as e:
            if e.errno == zmq.EADDRINUSE:
                raise EngineUnavailable(f"cannot listen on {self.endpoint}: the address is in use") from None
            raise BadRequest(f"cannot listen on {self.endpoint}: {e.strerror}") from None
        self.socket_file = endpoints.socket_identity(path)
        if self.socket_file is None:
            raise NotPrivate(f"{path}: no socket there after binding (removed or replaced meanwhile)")
        os.chmod(path, 0o600)

    def serve(self) -> int:
        """Lock the endpoint, bind, preload, serve until SIGTERM/SIGINT or idle exit. Returns the
        exit status: 0, EXIT_IN_USE (another engine serves the endpoint), 1 (one line logged: the
        socket, the lock, a model that cannot be preloaded)."""
        try:
            self._lock()
        except EngineUnavailable as e:
            self.log(str(e))
            return EXIT_IN_USE
        except UnbakeError as e:
            self.log(str(e))
            return 1
        ctx = zmq.Context()
        try:
            # Everything that can be checked without binding was checked in __init__ (endpoint, CURVE
            # files, TCP without CURVE, the socket's path). The socket comes last: a client that finds
            # it gets answers (it does not wait out a model's preload).
            self.service = self.service_factory(self.emit)
            for name in self.preload:
                t0 = time.monotonic()
                name = self.service.preload(name)
                self.log(f"{name} loaded and warmed up in {time.monotonic() - t0:.1f} s")
            self.bind(ctx)
            if self.endpoint.startswith("tcp://") and self.curve_keys is None:
                self.log(f"{self.endpoint}: without CURVE, every local user may use this engine "
                         f"(--allow-any-local-user)")
        except UnbakeError as e:
            self.log(str(e))
            self._cleanup(ctx)
            return 1
        except BaseException:
            self._cleanup(ctx)
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        self.log(f"ready on {self.endpoint} (device {self.service.device}, pid {os.getpid()})")
        next_tick = time.monotonic() + TICK_S
        try:
            while True:
                events = dict(poller.poll(TICK_S * 1000))
                if self.router in events:
                    for _ in range(256):  # a burst, then replies get their turn
                        try:
                            frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.handle(frames)
                self._drain_outbox()
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK_S
                    self._tick()
                if self.stop_requested and self.stopping_since is None:
                    self.stopping_since = now
                    self.log("stopping: no new work; finishing requests in flight")
                if self.stopping_since is not None and (
                        not self.pending or now - self.stopping_since > self.drain_s):
                    break
        finally:
            self.service.stop()
            self._drain_outbox()
            self._cleanup(ctx)
        self.log("stopped")
        return 0

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def _cleanup(self, ctx: zmq.Context) -> None:
        router = getattr(self, "router", None)
        if router is not None:
            router.close(linger=500)
        if self.auth is not None:
            self.auth.stop()
        path = endpoints.ipc_path(self.endpoint)
        if path is not None and self.socket_file is not None and endpoints.socket_identity(path) == self.socket_file:
            try:
                os.unlink(path)  # the socket this daemon bound, and nothing else
            except FileNotFoundError:
                pass
        self.loader.shutdown(wait=False, cancel_futures=True)
        ctx.term()
        if self.lock_fd is not None:
            os.close(self.lock_fd)


# -- command line ---------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default=None,
                   help="ipc://PATH, or tcp://HOST:PORT with CURVE keys or --allow-any-local-user "
                        "(default: $UNBAKE_ENDPOINT or ipc://<user runtime dir>/unbake/engine.sock)")
    p.add_argument("-d", "--device", default=None, help="cpu, cuda, cuda:N, mps (default: cuda if available)")
    p.add_argument("--fp16", action="store_true", help="half precision (CUDA autocast)")
    p.add_argument("-j", "--jobs", type=int, default=None, help="CPU threads for the networks")
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
    p.add_argument("--allow-any-local-user", action="store_true", default=None,
                   help="serve a loopback tcp:// endpoint without CURVE: every local user may then use "
                        f"the engine (default: ${endpoints.ALLOW_ANY_LOCAL_USER_ENV}=1, else refused)")


def allow_any_local_user(flag: bool | None) -> bool:
    """``--allow-any-local-user`` (True), else ``$UNBAKE_ALLOW_ANY_LOCAL_USER``: "1" yes, unset, ""
    or "0" no. Raises BadRequest for another value (a setting with this meaning is never guessed)."""
    if flag:
        return True
    value = os.environ.get(endpoints.ALLOW_ANY_LOCAL_USER_ENV, "")
    if value not in ("", "0", "1"):
        raise BadRequest(f"{endpoints.ALLOW_ANY_LOCAL_USER_ENV}={value[:40]!r}: must be 1 (every local user "
                         f"may use the engine) or 0")
    return value == "1"


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
    except UnbakeError as e:
        print(f"unbake serve: {e}", file=sys.stderr)
        return 1
    limits = P.Limits(session_ttl_s=args.session_ttl_s, max_sessions=args.max_sessions,
                      max_sessions_per_client=args.max_sessions_per_client)

    def service_factory(emit):
        from .service import Service  # torch is imported here, not at module import
        return Service(emit, device=args.device, fp16=args.fp16, repo=args.repo, threads=args.jobs,
                       max_batch=args.max_batch, max_queue_delay_s=args.max_queue_delay_ms / 1000,
                       memory_budget_gb=args.memory_budget_gb, limits=limits)

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
