"""``unbake serve``: the engine daemon. A ZeroMQ ROUTER socket, a poll loop, validate-or-reject.

    clients (DEALER) ──▶ ROUTER ──▶ validate (engine.protocol; limits before any allocation)
                                    ├─ hello / status / models: answered here
                                    ├─ open: a loader thread loads or shares the model -> ready
                                    └─ push / close / cancel -> engine.scheduler (worker thread)
    replies from any thread ──▶ outbox + wake-up pipe ──▶ this loop ──▶ engine.clients ──▶ ROUTER ──▶ client

Who reaches the engine, the endpoint's lock and the bind: ``engine.listener`` (checked before
anything is changed or loaded; the socket is bound after the preload). Connections, flow control
for clients that do not read, queued-audio quotas and clients that leave: ``engine.clients``.

Every request gets exactly one terminal reply; a request still waiting gets a ``progress``
keep-alive every second, so a client's timeout means the daemon is gone, not busy. A bad message
gets an ``error`` reply (``re`` None when its id is unreadable) and the loop goes on.

This module imports no torch: the torch side (engine.service) is imported when serving starts.
"""
from __future__ import annotations

import os
import queue
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import zmq

from . import __version__
from . import protocol as P
from .clients import Clients
from .heap import peak_rss_bytes, release_free_memory, rss_bytes
from .errors import (BadAudio, EngineUnavailable, LimitExceeded, NotPermitted, ProtocolError, QueueFull,
                     UnbakeError, UnknownSession)
from .listener import Listener

KEEPALIVE_S = 1.0
FINAL_ANSWER_S = 5.0   # at exit: how long to answer what is still in the socket and flush replies
QUIET_S = 0.3          # ... and how long the socket must stay quiet before the engine exits
TRIM_IDLE_S = 2.0
TICK_S = 0.2
DRAIN_S = 10.0
EXIT_IN_USE = 3


@dataclass
class SessionInfo:
    """A session as the daemon sees it. ``deadline`` (time.monotonic) is when it expires while no
    request of it is in flight (``protocol.SESSION_TTL_S_PER_AUDIO_S``); ``in_flight`` counts its
    requests not yet answered, ``busy_since`` when the first of them came; ``open_re`` is the id of
    the ``open`` that made it (a disconnect probe names it)."""
    owner: bytes
    channels: int = 0
    sample_rate: int = 0
    frames_in: int = 0
    ready: bool = False
    peer: str = ""
    open_re: int = 0
    deadline: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    busy_since: float = 0.0


@dataclass
class Pending:
    op: str
    sid: str | None
    last_reply: float = field(default_factory=time.monotonic)
    samples: int = 0       # audio of a push, counted against its client's and peer's queued quota


class Daemon:
    """endpoint: where to bind (``ipc://PATH`` or ``tcp://HOST:PORT``, ``endpoints.check_endpoint``).
    service_factory(emit) builds the torch side (engine.service.Service).
    idle_exit_s: exit after this long with no session and no request (None: never).
    curve_secret_key (a zmq certificate file with the secret key), curve_allowed_keys (a folder of
    the allowed clients' public certificates): both or neither. allow_any_local_user (bool, default
    False): a loopback tcp:// endpoint without CURVE is allowed (every local user may use the
    engine); refused otherwise. The endpoint, the CURVE files and the socket path are checked here
    (``listener.Listener``), before anything is created: raises BadRequest (a bad endpoint or CURVE
    file, TCP without CURVE) or NotPrivate (something other than a socket of this user at the ipc
    path)."""

    def __init__(self, endpoint: str, service_factory, *, limits: P.Limits = P.Limits(),
                 idle_exit_s: float | None = None, drain_s: float = DRAIN_S,
                 curve_secret_key: str | None = None, curve_allowed_keys: str | None = None,
                 preload: list[str] = (), log=None, allow_any_local_user: bool = False):
        self.listener = Listener(endpoint, curve_secret_key=curve_secret_key,  # raises before anything is made
                                 curve_allowed_keys=curve_allowed_keys, allow_any_local_user=allow_any_local_user)
        self.endpoint = self.listener.endpoint
        self.router = None  # bound in serve
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
        self.clients = Clients(  # flow control and quotas per connection
            limits, self.log, ipc=self.endpoint.startswith("ipc://"),
            curve=bool(self.listener.curve_keys is not None or curve_secret_key), sessions=self.sessions,
            pending=self.pending, end_sessions=self._end_sessions, reply=self._send,
            pause_session=lambda sid, paused: self.service.scheduler.pause(sid, paused))
        self.served = 0
        self.started = time.monotonic()
        self.last_activity = time.monotonic()
        self.stop_requested = False
        self.trimmed = True
        self.stopping_since: float | None = None

    # -- replies (any thread) ---------------------------------------------------------------------
    def emit(self, identity: bytes, header: dict, pcm: list) -> None:
        self.outbox.put((identity, header, pcm))
        try:
            os.write(self.wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is already awake

    def _send(self, identity: bytes, header: dict, pcm: list = ()) -> None:
        """Send a reply, or have it kept (in order) for a client whose zmq queue is full; a client
        that is gone is forgotten with its sessions (``Clients.send``)."""
        kind, re = header.get("kind"), header.get("re")
        frames = P.reply(kind, re, list(pcm), **{k: P.to_plain(v) for k, v in header.items()
                                                 if k not in ("kind", "re")})
        self.clients.send(identity, frames)
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
            self._release(identity, entry)
            self._finished(identity, entry, kind, header)

    def _release(self, identity: bytes, entry: Pending) -> None:
        """A request is answered: its audio no longer counts against the queued quotas."""
        if entry.samples:
            self.clients.answered(identity, entry.samples)
        info = self.sessions.get(entry.sid) if entry.sid else None
        if info is not None and info.in_flight > 0:
            info.in_flight -= 1
            if info.in_flight == 0:  # time spent queued or running does not count against the TTL
                now = time.monotonic()
                info.deadline = min(now + self.limits.session_ttl_s, info.deadline + (now - info.busy_since))

    def _finished(self, identity: bytes, entry: Pending, kind: str, header: dict) -> None:
        info = self.sessions.get(entry.sid) if entry.sid else None
        if info is None:
            return
        if entry.op == P.OPEN:
            if kind == P.K_READY:
                info.ready = True
                info.deadline = time.monotonic() + self.limits.session_ttl_s
                if self.clients.paused(identity):
                    self.service.scheduler.pause(entry.sid)
            else:
                del self.sessions[entry.sid]
        elif not self.service.scheduler.has(entry.sid):  # closed, or ended by an error
            del self.sessions[entry.sid]

    # -- sessions of a client that is cut off or gone (engine.clients) ---------------------------
    def _end_sessions(self, identity: bytes, reason) -> int:
        """End every session of a client (their requests get ``reason``), forget its requests."""
        ended = 0
        for sid, info in list(self.sessions.items()):
            if info.owner == identity:
                self.service.scheduler.cancel(sid, reason)
                del self.sessions[sid]
                ended += 1
        for key in [k for k in self.pending if k[0] == identity]:
            entry = self.pending.pop(key)
            self._release(identity, entry)
        return ended

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
        self.clients.conn(identity, header_frame)
        re = None
        try:
            if len(header_frame) > self.limits.max_header_bytes:
                raise LimitExceeded(f"header: {len(header_frame)} bytes, the limit is {self.limits.max_header_bytes}")
            header = P.unpack_header(header_frame.bytes, self.limits)
            re = P.request_id(header)  # every error below names the request
            if len(pcm) > self.limits.max_frames:  # counted, none of them looked at
                raise LimitExceeded(f"{len(pcm)} PCM frames in one message, the limit is {self.limits.max_frames}")
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
        if req.get("repo") is not None and not self.listener.peers_may_name_paths:
            raise NotPermitted(f"open #{req['id']}: this engine listens on {self.endpoint}, whose peers may not "
                               f"name folders on its machine ('repo' is for peers of its own ipc:// socket); "
                               f"start it with `unbake serve --repo DIR` instead")
        peer = self.clients.conns[identity].peer
        mine = sum(1 for s in self.sessions.values() if s.owner == identity)
        if mine >= self.limits.max_sessions_per_client:
            raise QueueFull(f"this client has {mine} sessions open, the limit is "
                            f"{self.limits.max_sessions_per_client}; close some first")
        ours = sum(1 for s in self.sessions.values() if s.peer == peer)
        per_peer = min(self.limits.max_sessions_per_peer, max(1, self.limits.max_sessions // 2))
        if ours >= per_peer:  # another peer can always open one
            raise QueueFull(f"{peer} has {ours} sessions open (over all its connections), the limit per "
                            f"peer is {per_peer}; close some first")
        if len(self.sessions) >= self.limits.max_sessions:
            raise QueueFull(f"{len(self.sessions)} sessions open, the daemon's limit is {self.limits.max_sessions}")
        sid = os.urandom(8).hex()  # not `secrets`: it pulls OpenSSL into every torch-free CLI
        self.sessions[sid] = SessionInfo(identity, req["channels"], req["sample_rate"], peer=peer,
                                         open_re=req["id"])
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
        return info  # a request alone does not keep a session (SessionInfo.deadline)

    def _op_push(self, identity, req, pcm):
        info = self._session(identity, req)
        if req["channels"] != info.channels:
            raise BadAudio(f"push #{req['id']}: {req['channels']} channels, session {req['session']} was "
                           f"opened with {info.channels}")
        if info.in_flight >= self.limits.max_pending_per_session:  # before the audio is looked at
            raise QueueFull(f"push #{req['id']}: slow down: session {req['session']} has {info.in_flight} "
                            f"requests queued, the limit is {self.limits.max_pending_per_session}; wait for "
                            f"their replies")
        samples = req["channels"] * req["frames"]
        self.clients.check_push(identity, req["id"], samples)
        block = P.pcm_array(pcm[0].buffer, req["channels"], req["frames"], where=f"push #{req['id']}",
                            first_frame=info.frames_in, sample_rate=info.sample_rate)
        self.service.scheduler.submit(req["session"], identity, req["id"], P.PUSH, block)
        info.frames_in += req["frames"]
        now = time.monotonic()  # audio pushed keeps the session (SESSION_TTL_S_PER_AUDIO_S per second)
        info.deadline = min(now + self.limits.session_ttl_s,
                            info.deadline + req["frames"] / info.sample_rate * P.SESSION_TTL_S_PER_AUDIO_S)
        self._track(identity, req, req["session"], samples)
        self.clients.queued(identity, samples)

    def _op_close(self, identity, req, pcm):
        self._session(identity, req)
        self.service.scheduler.submit(req["session"], identity, req["id"], P.CLOSE)
        self._track(identity, req, req["session"])

    def _op_cancel(self, identity, req, pcm):
        self._session(identity, req)
        self.service.scheduler.cancel(req["session"])
        self.sessions.pop(req["session"], None)
        self._send(identity, {"kind": P.K_DONE, "re": req["id"], "session": req["session"], "final": True})
        for key in [k for k, e in self.pending.items() if e.sid == req["session"]]:
            self._release(identity, self.pending.pop(key))  # its pushes' errors come from the scheduler

    def _track(self, identity: bytes, req: dict, sid: str | None, samples: int = 0) -> None:
        self.pending[(identity, req["id"])] = Pending(req["op"], sid, samples=samples)
        info = self.sessions.get(sid) if sid else None
        if info is not None:
            if info.in_flight == 0:
                info.busy_since = time.monotonic()
            info.in_flight += 1

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
                **self.clients.status(),
                "rss_mb": round(rss_bytes() / 2 ** 20, 1),
                "peak_rss_mb": round(peak_rss_bytes() / 2 ** 20, 1),
                "idle_exit_s": self.idle_exit_s, "session_ttl_s": self.limits.session_ttl_s,
                "stopping": self.stopping_since is not None, **self.service.status()}

    def _tick(self) -> None:
        now = time.monotonic()
        for (identity, re), entry in list(self.pending.items()):
            conn = self.clients.conns.get(identity)
            if conn is not None and conn.backlog:
                continue  # it has replies to read first; a keep-alive would only add to them
            if now - entry.last_reply >= KEEPALIVE_S and (identity, re) in self.pending:
                self._send(identity, {"kind": P.K_PROGRESS, "re": re, "session": entry.sid,
                                      "state": "working" if entry.op != P.PUSH else "queued"})
        for sid, info in list(self.sessions.items()):
            if info.ready and info.in_flight == 0 and now > info.deadline:
                self.log(f"session {sid}: idle for {self.limits.session_ttl_s:.0f} s (no request, too little "
                         f"audio pushed), freed")
                self.service.scheduler.drop(sid)
                del self.sessions[sid]
        self.clients.probe(now)
        self.clients.forget_idle()
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
    def serve(self) -> int:
        """Lock the endpoint, bind, preload, serve until SIGTERM/SIGINT or idle exit. Returns the
        exit status: 0, EXIT_IN_USE (another engine serves the endpoint), 1 (one line logged: the
        socket, the lock, a model that cannot be preloaded)."""
        try:
            self.listener.lock()
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
            self.router = self.clients.router = self.listener.bind(ctx, self.limits.max_message_bytes)
            if self.endpoint.startswith("tcp://") and self.listener.curve_keys is None:
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
        monitor = self.clients.watch(self.router)
        poller.register(monitor, zmq.POLLIN)
        where = self.service.settings()
        self.log(f"ready on {self.endpoint} (device {where['device']}"
                 + (f": {where['replicas']} replica(s) on the Ray cluster at {where['ray']}" if "ray" in where else "")
                 + f", pid {os.getpid()})")
        next_tick = time.monotonic() + TICK_S
        try:
            while True:
                held = self.clients.held()  # retry them soon: zmq says nothing
                events = dict(poller.poll(1 if held else TICK_S * 1000))
                if monitor in events:
                    self.clients.on_disconnect()
                if self.router in events:
                    for _ in range(256):  # a burst, then replies get their turn
                        try:
                            frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.handle(frames)
                self.clients.flush()
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
            self.service.stop()  # requests still in flight get "the engine is shutting down"
            self._drain_outbox()
            self._answer_the_rest()
            self._cleanup(ctx)
        self.log("stopped")
        return 0

    def _answer_the_rest(self) -> None:
        """Before exit: answer every request still in the socket (hello and status as usual, the
        rest "the engine is shutting down") until it has been quiet for QUIET_S, and hand every
        reply kept for slow readers to zmq, for at most FINAL_ANSWER_S; the log says what could
        not be delivered."""
        self.stop_requested = True
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
        self.clients.unwatch()
        deadline = time.monotonic() + FINAL_ANSWER_S
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            got = 0
            for _ in range(256):
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.handle(frames)
                got += 1
            self._drain_outbox()
            self.clients.flush()
            held = self.clients.held()
            now = time.monotonic()
            if got:
                quiet_since = now
            elif now - quiet_since >= QUIET_S and not held:
                return
            self.router.poll(1 if held else 10)
        replies, clients = self.clients.unread()
        if replies:
            self.log(f"exiting with {replies} replies unread by {clients} "
                     f"client(s) that did not read them within {FINAL_ANSWER_S:.0f} s: dropped")

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def _cleanup(self, ctx: zmq.Context) -> None:
        self.listener.close()  # the ROUTER, CURVE's authenticator, the socket file it bound
        self.loader.shutdown(wait=False, cancel_futures=True)
        ctx.term()
        self.listener.unlock()


if __name__ == "__main__":  # `python -m engine.daemon`: the command line is engine.serve_cli's
    from .serve_cli import main
    sys.exit(main())
