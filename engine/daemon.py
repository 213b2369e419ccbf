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
import collections
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
PROBE_S = 3.0          # after a disconnect event, how long to look for the client that left
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


@dataclass
class Conn:
    """One connection (a client's DEALER, by its routing identity). ``peer``: its peer identity
    (``protocol.peer_identity``); ``pid``: its process on ipc (None elsewhere); ``backlog``: replies
    zmq could not take (it holds SEND_QUEUE_MESSAGES per connection), oldest first, as
    (frames, bytes); ``paused``: its sessions' forward passes wait until it reads."""
    peer: str
    pid: int | None = None
    backlog: collections.deque = field(default_factory=collections.deque)
    unread_bytes: int = 0
    queued_samples: int = 0
    paused: bool = False


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
        self.conns: dict[bytes, Conn] = {}            # flow control and quotas per connection
        self.peer_unread: collections.Counter = collections.Counter()   # bytes held, per peer identity
        self.peer_queued: collections.Counter = collections.Counter()   # push samples in flight, per peer
        self.monitor = None        # the ROUTER's disconnect events (serve)
        self.probe_until = 0.0     # look for clients that left until then
        self.cut_off = 0           # clients cut off for not reading
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
        """Send a reply, or keep it (in order) for a client whose zmq queue is full; a client that
        is gone (EHOSTUNREACH) is forgotten with its sessions (``_client_left``)."""
        kind, re = header.get("kind"), header.get("re")
        frames = P.reply(kind, re, list(pcm), **{k: P.to_plain(v) for k, v in header.items()
                                                 if k not in ("kind", "re")})
        conn = self.conns.get(identity)
        if conn is not None and conn.backlog:
            self._hold(identity, conn, frames)
        else:
            try:
                self.router.send_multipart([identity, *frames], copy=False)
            except zmq.Again:  # its queue is full (SNDHWM): keep the reply, counted
                if conn is None:
                    conn = self.conns[identity] = Conn("addr:?")
                self._hold(identity, conn, frames)
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                self._client_left(identity, "its connection is gone")
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
            conn = self.conns.get(identity)
            if conn is not None:
                conn.queued_samples -= entry.samples
                self.peer_queued[conn.peer] -= entry.samples
                if self.peer_queued[conn.peer] <= 0:
                    del self.peer_queued[conn.peer]
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
                conn = self.conns.get(identity)
                if conn is not None and conn.paused:
                    self.service.scheduler.pause(entry.sid)
            else:
                del self.sessions[entry.sid]
        elif not self.service.scheduler.has(entry.sid):  # closed, or ended by an error
            del self.sessions[entry.sid]

    # -- flow control (this thread) ---------------------------------------------------------------
    def _hold(self, identity: bytes, conn: Conn, frames: list) -> None:
        size = sum(len(f) for f in frames)
        conn.backlog.append((frames, size))
        conn.unread_bytes += size
        self.peer_unread[conn.peer] += size
        if len(conn.backlog) > self.limits.max_unread_replies_per_client:
            self._cut_off(identity, conn)
        else:
            self._update_pause(identity, conn)

    def _flush_backlogs(self) -> None:
        """Hand kept replies to zmq, oldest first, as far as each client's queue takes them."""
        for identity, conn in list(self.conns.items()):
            if not conn.backlog:
                continue
            while conn.backlog:
                frames, size = conn.backlog[0]
                try:
                    self.router.send_multipart([identity, *frames], copy=False)
                except zmq.Again:
                    break
                except zmq.ZMQError as e:
                    if e.errno != zmq.EHOSTUNREACH:
                        raise
                    self._client_left(identity, "its connection is gone")
                    break
                conn.backlog.popleft()
                conn.unread_bytes -= size
                self._unread(conn.peer, -size)
            if self.conns.get(identity) is conn:
                self._update_pause(identity, conn)

    def _unread(self, peer: str, delta: int) -> None:
        self.peer_unread[peer] += delta
        if self.peer_unread[peer] <= 0:
            del self.peer_unread[peer]

    def _update_pause(self, identity: bytes, conn: Conn) -> None:
        """Pause the forward passes of a client's sessions while it has more than
        PAUSE_UNREAD_BYTES_PER_CLIENT unread (or any, once its peer identity has more than
        max_unread_bytes_per_peer); resume them once it has read."""
        paused = conn.unread_bytes > P.PAUSE_UNREAD_BYTES_PER_CLIENT or (
            conn.unread_bytes > 0 and self.peer_unread.get(conn.peer, 0) > self.limits.max_unread_bytes_per_peer)
        if paused == conn.paused:
            return
        conn.paused = paused
        for sid, info in self.sessions.items():
            if info.owner == identity and info.ready:
                self.service.scheduler.pause(sid, paused)

    def _drop_backlog(self, conn: Conn) -> int:
        dropped = len(conn.backlog)
        self._unread(conn.peer, -conn.unread_bytes)
        conn.backlog.clear()
        conn.unread_bytes = 0
        return dropped

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

    def _cut_off(self, identity: bytes, conn: Conn) -> None:
        """A client with more than max_unread_replies_per_client replies unread: its sessions end,
        what it has not read is dropped, and the log says so (never silently)."""
        size = conn.unread_bytes
        dropped = self._drop_backlog(conn)
        ended = self._end_sessions(identity, QueueFull(
            "this client did not read its replies: cut off, its sessions ended"))
        self._drop_backlog(conn)  # the errors just queued for it: nobody reads them either
        conn.paused = False
        self.cut_off += 1
        self.log(f"client {identity.hex()} ({conn.peer}): {dropped} replies ({size / 2 ** 20:.1f} MB) "
                 f"unread; cut off: {ended} session(s) ended, those replies dropped")

    def _client_left(self, identity: bytes, why: str) -> None:
        """The client is gone (its process ended, its connection closed): free its sessions now."""
        conn = self.conns.pop(identity, None)
        if conn is not None:
            self._drop_backlog(conn)
        ended = self._end_sessions(identity, UnknownSession(f"the client left ({why})"))
        if conn is not None and conn.queued_samples:
            self.peer_queued[conn.peer] -= conn.queued_samples
            if self.peer_queued[conn.peer] <= 0:
                del self.peer_queued[conn.peer]
        if ended:
            self.log(f"client {identity.hex()} left ({why}): {ended} session(s) freed")

    def _conn(self, identity: bytes, frame) -> Conn:
        conn = self.conns.get(identity)
        if conn is None:
            address = user = None
            try:
                address = frame.get("Peer-Address")
            except (zmq.ZMQError, AttributeError):
                pass
            if getattr(self, "curve_keys", None) is not None or self.curve_secret_key:
                try:
                    user = frame.get("User-Id")
                except (zmq.ZMQError, AttributeError):
                    pass
            ipc = self.endpoint.startswith("ipc://")
            conn = self.conns[identity] = Conn(P.peer_identity(address, user, ipc=ipc),
                                               P.peer_pid(address, ipc))
        return conn

    def _on_disconnect(self) -> None:
        """A connection closed (zmq monitor): look for the client that left for a few seconds."""
        try:
            while self.monitor.poll(0):
                self.monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.probe_until = time.monotonic() + PROBE_S

    def _probe(self) -> None:
        """Which clients with sessions are gone? ipc: its process has ended (pid from the socket's
        credentials). TCP: a ``progress`` naming its session's ``open`` (already answered; clients
        ignore it) cannot be routed any more (EHOSTUNREACH)."""
        busy = {k[0] for k in self.pending}
        owners = {}
        for sid, info in self.sessions.items():
            if info.ready:
                owners.setdefault(info.owner, (sid, info))
        for identity, (sid, info) in owners.items():
            conn = self.conns.get(identity)
            if conn is None:
                continue
            if conn.pid is not None:
                if not _process_alive(conn.pid):
                    self._client_left(identity, f"process {conn.pid} ended")
            elif identity not in busy and not conn.backlog:
                self._send(identity, {"kind": P.K_PROGRESS, "re": info.open_re, "session": sid, "state": "idle"})

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
        self._conn(identity, header_frame)
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
        if req.get("repo") is not None and not self.peers_may_name_paths:
            raise NotPermitted(f"open #{req['id']}: this engine listens on {self.endpoint}, whose peers may not "
                               f"name folders on its machine ('repo' is for peers of its own ipc:// socket); "
                               f"start it with `unbake serve --repo DIR` instead")
        peer = self.conns[identity].peer
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
        conn = self.conns[identity]
        if conn.queued_samples + samples > self.limits.max_queued_samples_per_client:
            raise QueueFull(f"push #{req['id']}: slow down: this client has {conn.queued_samples} samples "
                            f"of audio queued, the limit is {self.limits.max_queued_samples_per_client}; "
                            f"wait for the replies to earlier pushes")
        if self.peer_queued[conn.peer] + samples > self.limits.max_queued_samples_per_peer:
            raise QueueFull(f"push #{req['id']}: slow down: {conn.peer} has {self.peer_queued[conn.peer]} "
                            f"samples of audio queued, the limit per peer is "
                            f"{self.limits.max_queued_samples_per_peer}; wait for the replies")
        block = P.pcm_array(pcm[0].buffer, req["channels"], req["frames"], where=f"push #{req['id']}",
                            first_frame=info.frames_in, sample_rate=info.sample_rate)
        self.service.scheduler.submit(req["session"], identity, req["id"], P.PUSH, block)
        info.frames_in += req["frames"]
        now = time.monotonic()  # audio pushed keeps the session (SESSION_TTL_S_PER_AUDIO_S per second)
        info.deadline = min(now + self.limits.session_ttl_s,
                            info.deadline + req["frames"] / info.sample_rate * P.SESSION_TTL_S_PER_AUDIO_S)
        self._track(identity, req, req["session"], samples)
        conn.queued_samples += samples
        self.peer_queued[conn.peer] += samples

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
                "clients_paused": sum(1 for c in self.conns.values() if c.paused),
                "unread_mb": round(sum(self.peer_unread.values()) / 2 ** 20, 1), "clients_cut_off": self.cut_off,
                "rss_mb": round(rss_bytes() / 2 ** 20, 1),
                "peak_rss_mb": round(peak_rss_bytes() / 2 ** 20, 1),
                "idle_exit_s": self.idle_exit_s, "session_ttl_s": self.limits.session_ttl_s,
                "stopping": self.stopping_since is not None, **self.service.status()}

    def _tick(self) -> None:
        now = time.monotonic()
        for (identity, re), entry in list(self.pending.items()):
            conn = self.conns.get(identity)
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
        if now < self.probe_until:
            self._probe()
        if len(self.conns) > 64:  # forget connections with nothing open, queued or held
            owners = {info.owner for info in self.sessions.values()} | {k[0] for k in self.pending}
            for identity in [i for i, c in self.conns.items() if i not in owners and not c.backlog]:
                del self.conns[identity]
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
                raise BadRequest(f"--curve-secret-key {secret_file}: "
                                 f"{'not a file' if os.path.exists(secret_file) else 'no such file'}")
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
        self.router.setsockopt(zmq.SNDHWM, P.SEND_QUEUE_MESSAGES)  # the rest is kept and counted (_send)
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
        self.monitor = self.router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller.register(self.monitor, zmq.POLLIN)
        self.log(f"ready on {self.endpoint} (device {self.service.device}, pid {os.getpid()})")
        next_tick = time.monotonic() + TICK_S
        try:
            while True:
                held = any(c.backlog for c in self.conns.values())  # retry them soon: zmq says nothing
                events = dict(poller.poll(1 if held else TICK_S * 1000))
                if self.monitor in events:
                    self._on_disconnect()
                if self.router in events:
                    for _ in range(256):  # a burst, then replies get their turn
                        try:
                            frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.handle(frames)
                self._flush_backlogs()
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
        if self.monitor is not None:
            try:
                self.router.disable_monitor()
            except zmq.ZMQError:
                pass
            self.monitor.close(0)
            self.monitor = None
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
            self._flush_backlogs()
            held = any(c.backlog for c in self.conns.values())
            now = time.monotonic()
            if got:
                quiet_since = now
            elif now - quiet_since >= QUIET_S and not held:
                return
            self.router.poll(1 if held else 10)
        held = [(i, c) for i, c in self.conns.items() if c.backlog]
        if held:
            self.log(f"exiting with {sum(len(c.backlog) for _, c in held)} replies unread by {len(held)} "
                     f"client(s) that did not read them within {FINAL_ANSWER_S:.0f} s: dropped")

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


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
