"""The daemon's connections (``engine.daemon``): per-connection state, flow control, queued-audio
quotas, and clients that leave.

    reply frames ──▶ Clients.send ──▶ ROUTER (zmq holds SEND_QUEUE_MESSAGES per connection)
                          └─ queue full: kept in the connection's backlog, in order, counted per
                             connection and per peer identity; flush() hands them on as it reads
    unread > PAUSE_UNREAD_BYTES_PER_CLIENT (or its peer over max_unread_bytes_per_peer)
                          ──▶ its sessions' forward passes pause until it reads
    backlog > max_unread_replies_per_client ──▶ cut off: its sessions end, its replies are dropped
    a disconnect event ──▶ for PROBE_S: ipc: its process ended? tcp: a progress it cannot be sent?
                          ──▶ the client left: its sessions end now

Sessions and requests stay the daemon's (``Daemon.sessions``, ``Daemon.pending``): this module
reads them, and ends a client's sessions through the daemon (``end_sessions``). Everything here runs
on the daemon's loop thread.
"""
from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field

import zmq

from . import protocol as P
from .errors import QueueFull, UnknownSession

PROBE_S = 3.0          # after a disconnect event, how long to look for the client that left


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


class Clients:
    """The connections of one daemon, by routing identity (``conns``), with the unread bytes
    (``peer_unread``) and queued push samples (``peer_queued``) of each peer identity.

    limits: ``protocol.Limits``; log(str); ipc / curve: how peers are told apart
    (``protocol.peer_identity``); sessions, pending: the daemon's tables (read only);
    end_sessions(identity, reason) -> sessions ended (the daemon forgets them and their requests);
    pause_session(sid, paused) (the scheduler's); reply(identity, header) (the daemon's ``_send``,
    for a probe's ``progress``). ``router`` is set once bound."""

    def __init__(self, limits: P.Limits, log, *, ipc: bool, curve: bool, sessions: dict, pending: dict,
                 end_sessions, pause_session, reply):
        self.limits, self.log = limits, log
        self.ipc, self.curve = ipc, curve
        self.sessions, self.pending = sessions, pending
        self._end_sessions, self._pause_session, self._reply = end_sessions, pause_session, reply
        self.router = None
        self.conns: dict[bytes, Conn] = {}            # flow control and quotas per connection
        self.peer_unread: collections.Counter = collections.Counter()   # bytes held, per peer identity
        self.peer_queued: collections.Counter = collections.Counter()   # push samples in flight, per peer
        self.monitor = None        # the ROUTER's disconnect events (watch)
        self.probe_until = 0.0     # look for clients that left until then
        self.cut_off = 0           # clients cut off for not reading

    # -- connections ------------------------------------------------------------------------------
    def conn(self, identity: bytes, frame) -> Conn:
        """The connection of ``identity``, made on its first message (``frame``: its peer's
        address and CURVE user come from it)."""
        conn = self.conns.get(identity)
        if conn is None:
            address = user = None
            try:
                address = frame.get("Peer-Address")
            except (zmq.ZMQError, AttributeError):
                pass
            if self.curve:
                try:
                    user = frame.get("User-Id")
                except (zmq.ZMQError, AttributeError):
                    pass
            conn = self.conns[identity] = Conn(P.peer_identity(address, user, ipc=self.ipc),
                                               P.peer_pid(address, self.ipc))
        return conn

    def paused(self, identity: bytes) -> bool:
        conn = self.conns.get(identity)
        return conn is not None and conn.paused

    def held(self) -> bool:
        """Whether any reply is kept for a slow reader (zmq says nothing when it could take it)."""
        return any(c.backlog for c in self.conns.values())

    def forget_idle(self) -> None:
        """Forget connections with nothing open, queued or held, once there are more than 64."""
        if len(self.conns) > 64:
            owners = {info.owner for info in self.sessions.values()} | {k[0] for k in self.pending}
            for identity in [i for i, c in self.conns.items() if i not in owners and not c.backlog]:
                del self.conns[identity]

    def status(self) -> dict:
        return {"clients_paused": sum(1 for c in self.conns.values() if c.paused),
                "unread_mb": round(sum(self.peer_unread.values()) / 2 ** 20, 1), "clients_cut_off": self.cut_off}

    # -- queued audio -----------------------------------------------------------------------------
    def check_push(self, identity: bytes, re: int, samples: int) -> None:
        """Raises QueueFull when ``samples`` more would take the client or its peer over its queued
        audio quota (``max_queued_samples_per_client``, ``max_queued_samples_per_peer``)."""
        conn = self.conns[identity]
        if conn.queued_samples + samples > self.limits.max_queued_samples_per_client:
            raise QueueFull(f"push #{re}: slow down: this client has {conn.queued_samples} samples "
                            f"of audio queued, the limit is {self.limits.max_queued_samples_per_client}; "
                            f"wait for the replies to earlier pushes")
        if self.peer_queued[conn.peer] + samples > self.limits.max_queued_samples_per_peer:
            raise QueueFull(f"push #{re}: slow down: {conn.peer} has {self.peer_queued[conn.peer]} "
                            f"samples of audio queued, the limit per peer is "
                            f"{self.limits.max_queued_samples_per_peer}; wait for the replies")

    def queued(self, identity: bytes, samples: int) -> None:
        """A push was accepted: its audio counts against the quotas until it is answered."""
        conn = self.conns[identity]
        conn.queued_samples += samples
        self.peer_queued[conn.peer] += samples

    def answered(self, identity: bytes, samples: int) -> None:
        """A push was answered: its audio no longer counts against the queued quotas."""
        conn = self.conns.get(identity)
        if conn is not None:
            conn.queued_samples -= samples
            self._unqueue(conn.peer, samples)

    def _unqueue(self, peer: str, samples: int) -> None:
        self.peer_queued[peer] -= samples
        if self.peer_queued[peer] <= 0:
            del self.peer_queued[peer]

    # -- flow control -----------------------------------------------------------------------------
    def send(self, identity: bytes, frames: list) -> None:
        """Send a reply, or keep it (in order) for a client whose zmq queue is full; a client that
        is gone (EHOSTUNREACH) is forgotten with its sessions (``client_left``)."""
        conn = self.conns.get(identity)
        if conn is not None and conn.backlog:
            self._hold(identity, conn, frames)
            return
        try:
            self.router.send_multipart([identity, *frames], copy=False)
        except zmq.Again:  # its queue is full (SNDHWM): keep the reply, counted
            if conn is None:
                conn = self.conns[identity] = Conn("addr:?")
            self._hold(identity, conn, frames)
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.client_left(identity, "its connection is gone")

    def _hold(self, identity: bytes, conn: Conn, frames: list) -> None:
        size = sum(len(f) for f in frames)
        conn.backlog.append((frames, size))
        conn.unread_bytes += size
        self.peer_unread[conn.peer] += size
        if len(conn.backlog) > self.limits.max_unread_replies_per_client:
            self._cut_off(identity, conn)
        else:
            self._update_pause(identity, conn)

    def flush(self) -> None:
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
                    self.client_left(identity, "its connection is gone")
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
                self._pause_session(sid, paused)

    def _drop_backlog(self, conn: Conn) -> int:
        dropped = len(conn.backlog)
        self._unread(conn.peer, -conn.unread_bytes)
        conn.backlog.clear()
        conn.unread_bytes = 0
        return dropped

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

    def unread(self) -> tuple[int, int]:
        """(replies kept for slow readers, clients they are kept for)."""
        held = [c for c in self.conns.values() if c.backlog]
        return sum(len(c.backlog) for c in held), len(held)

    # -- clients that leave -----------------------------------------------------------------------
    def client_left(self, identity: bytes, why: str) -> None:
        """The client is gone (its process ended, its connection closed): free its sessions now."""
        conn = self.conns.pop(identity, None)
        if conn is not None:
            self._drop_backlog(conn)
        ended = self._end_sessions(identity, UnknownSession(f"the client left ({why})"))
        if conn is not None and conn.queued_samples:
            self._unqueue(conn.peer, conn.queued_samples)
        if ended:
            self.log(f"client {identity.hex()} left ({why}): {ended} session(s) freed")

    def watch(self, router) -> zmq.Socket:
        """Watch ``router``'s disconnect events; returns the monitor socket to poll."""
        self.monitor = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        return self.monitor

    def unwatch(self) -> None:
        if self.monitor is not None:
            try:
                self.router.disable_monitor()
            except zmq.ZMQError:
                pass
            self.monitor.close(0)
            self.monitor = None

    def on_disconnect(self) -> None:
        """A connection closed (zmq monitor): look for the client that left for a few seconds."""
        try:
            while self.monitor.poll(0):
                self.monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.probe_until = time.monotonic() + PROBE_S

    def probe(self, now: float) -> None:
        """Within PROBE_S of a disconnect event: which clients with sessions are gone? ipc: its
        process has ended (pid from the socket's credentials). TCP: a ``progress`` naming its
        session's ``open`` (already answered; clients ignore it) cannot be routed any more
        (EHOSTUNREACH)."""
        if now >= self.probe_until:
            return
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
                    self.client_left(identity, f"process {conn.pid} ended")
            elif identity not in busy and not conn.backlog:
                self._reply(identity, {"kind": P.K_PROGRESS, "re": info.open_re, "session": sid, "state": "idle"})


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
