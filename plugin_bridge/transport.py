"""The client's transport: one zmq DEALER socket to the daemon's ROUTER, CURVE keys, requests and
replies matched by id, timeouts and Lazy Pirate retries (part of ``plugin_bridge.client``).

``Transport`` is a mixin of ``plugin_bridge.client.Client``: its methods use the Client's
``endpoint``, ``timeout_s``, ``retries``, ``autostart``, ``_curve``, ``_ctx``, ``_sock``,
``_generation``, ``_next_id``, ``_queues`` and ``_closed``, and ``_socket`` starts a daemon through
``plugin_bridge.autostart.Autostart._ensure_daemon``. Torch-free (numpy, pyzmq, ``engine.protocol``).
"""
from __future__ import annotations

import math
import os
import time
from collections import deque

import numpy as np
import zmq

import engine
from engine import protocol
from engine.errors import BadRequest, EngineUnavailable, ProtocolError, from_code

CURVE_SERVER_KEY_ENV = "UNBAKE_CURVE_SERVER_KEY"
CURVE_CLIENT_CERT_ENV = "UNBAKE_CURVE_CLIENT_CERT"

RECV_QUEUE = 2             # replies zmq reads ahead of this process (ZMQ_RCVHWM); the rest wait
                           # in the daemon, which holds those stems anyway (zero-copy replies)
RETRY_PAUSE_S = 0.5        # before resending to a daemon that answered it is shutting down
_REPLY_LIMITS = protocol.Limits(max_header_bytes=16 * 2 ** 20)  # replies come from a trusted peer


def _z85_key(value, what: str) -> bytes:
    """A CURVE public key: z85 text (40 characters) or a path to a zmq certificate file."""
    if isinstance(value, str):
        raw = value.encode()
    elif isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    else:
        raise BadRequest(f"{what}: expected a z85 key or a certificate path, got {type(value).__name__}")
    if len(raw) == 40 and not os.path.exists(raw):
        return raw
    public, _ = _load_cert(raw.decode(errors="replace"), what)
    return public


def _load_cert(path: str, what: str) -> tuple[bytes, bytes | None]:
    import zmq.auth
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise BadRequest(f"{what}: cannot read the certificate {path}: {e}") from None
    if public is None:
        raise BadRequest(f"{what}: {path} holds no public key")
    return public, secret


def _curve_keys(server_key, client_cert) -> tuple[bytes, bytes, bytes] | None:
    """(server public, client public, client secret) or None (no CURVE)."""
    server_key = server_key if server_key is not None else os.environ.get(CURVE_SERVER_KEY_ENV) or None
    client_cert = client_cert if client_cert is not None else os.environ.get(CURVE_CLIENT_CERT_ENV) or None
    if server_key is None:
        if client_cert is not None:
            raise BadRequest(f"curve_secret_key {client_cert} given without curve_server_key "
                             f"(or ${CURVE_SERVER_KEY_ENV})")
        return None
    if not zmq.has("curve"):
        raise BadRequest("CURVE encryption requested but this libzmq was built without it")
    server = _z85_key(server_key, "curve_server_key")
    if client_cert is None:  # an ephemeral client key: encrypted, not authenticated by key
        public, secret = zmq.curve_keypair()
    else:
        public, secret = _load_cert(os.fspath(client_cert), "curve_secret_key")
        if secret is None:
            raise BadRequest(f"curve_secret_key: {client_cert} holds no secret key "
                             f"(pass the .key_secret file)")
    return server, public, secret


def _tries(retries: int) -> str:
    return f" (tried {retries + 1} times)" if retries else ""


class Transport:
    """Sockets, requests and replies of a ``Client`` (see the module)."""

    @staticmethod
    def _client_name() -> str:
        return f"plugin_bridge.client/{engine.__version__} pid {os.getpid()}"

    @staticmethod
    def _check_hello(header: dict) -> None:
        if header.get("kind") != protocol.K_HELLO:
            raise ProtocolError(f"hello: expected a 'hello' reply, got {header.get('kind')!r}")
        if header.get("protocol") != protocol.PROTOCOL_VERSION:
            raise ProtocolError(f"the engine speaks protocol {header.get('protocol')!r}, this client "
                                f"{protocol.PROTOCOL_VERSION}")

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _new_socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, RECV_QUEUE)
        if self._curve is not None:
            server, public, secret = self._curve
            sock.setsockopt(zmq.CURVE_SERVERKEY, server)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as e:
            sock.close()
            raise EngineUnavailable(f"cannot connect to {self.endpoint}: {e}") from None
        return sock

    def _socket(self) -> zmq.Socket:
        if self._closed:
            raise ValueError("the client is closed")
        if self._sock is None:
            if self.autostart:
                self._ensure_daemon()
            self._sock = self._new_socket()
        return self._sock

    def _reset(self) -> None:
        """Lazy Pirate: drop the socket (and every request and session in flight on it)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._queues.clear()
        self._generation += 1

    def _retry_pause(self, err: EngineUnavailable) -> None:
        """Before a Lazy Pirate retry: a fresh socket; if the daemon itself answered that it is
        shutting down (not a timeout), give it a moment to go so that autostart starts a new one."""
        self._reset()
        if not getattr(err, "timed_out", False):
            time.sleep(RETRY_PAUSE_S)

    def _send(self, op: str, pcm: list[np.ndarray] = (), **fields) -> int:
        sock = self._socket()
        rid = self._new_id()
        frames = protocol.request(op, rid, pcm, **protocol.to_plain(fields))
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise EngineUnavailable(f"cannot send {op} to {self.endpoint}: its send queue is full "
                                    f"(the engine does not read)") from None
        except zmq.ZMQError as e:
            raise EngineUnavailable(f"cannot send {op} to {self.endpoint}: {e}") from None
        self._queues[rid] = deque()
        return rid

    def _send_nowait(self, op: str, **fields) -> None:
        """Fire and forget (cancel on cleanup): no reply is waited for; errors are ignored."""
        if self._sock is None or self._closed:
            return
        try:
            self._sock.send_multipart(protocol.request(op, self._new_id(), **fields), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _next(self, rid: int, what: str) -> tuple[dict, list]:
        """The next reply to request ``rid`` (header, PCM frames); buffers replies to others."""
        queue = self._queues.get(rid)
        if queue is None:
            raise ProtocolError(f"{what}: request #{rid} is not in flight")
        if queue:
            return queue.popleft()
        sock = self._socket()
        deadline = time.monotonic() + self.timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                err = EngineUnavailable(f"no reply from the unbake engine at {self.endpoint} within "
                                        f"{self.timeout_s:g} s ({what})")
                err.timed_out = True
                raise err
            if not sock.poll(max(1, math.ceil(remaining * 1000)), zmq.POLLIN):
                continue
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            header = protocol.check_reply(protocol.unpack_header(frames[0].bytes, _REPLY_LIMITS))
            pcm = [f.buffer for f in frames[1:]]
            re = header.get("re")
            if re is None and header.get("kind") == protocol.K_ERROR:
                raise from_code(str(header.get("code")), str(header.get("message")))
            if not isinstance(re, int) or isinstance(re, bool):
                raise ProtocolError(f"reply {header.get('kind')!r} with 're' {re!r}")
            if re == rid:
                return header, pcm
            other = self._queues.get(re)
            if other is None:
                continue  # a reply to a request given up (cancelled session, earlier timeout)
            if header.get("kind") == protocol.K_PROGRESS and other and other[-1][0].get("kind") == protocol.K_PROGRESS:
                other[-1] = (header, pcm)  # keep the latest keep-alive only
            else:
                other.append((header, pcm))

    def _terminal(self, rid: int, what: str) -> tuple[dict, list]:
        """Wait for the terminal reply of a request without stems; error replies raise."""
        while True:
            header, pcm = self._next(rid, what)
            kind = header.get("kind")
            if kind == protocol.K_PROGRESS:
                continue
            if kind == protocol.K_ERROR:
                raise from_code(str(header.get("code")), str(header.get("message")))
            if kind not in protocol.TERMINAL:
                raise ProtocolError(f"{what}: unexpected {kind!r} reply")
            return header, pcm

    def _call_safe(self, op: str, **fields) -> dict:
        """A request safe to repeat, with Lazy Pirate retries; returns the terminal reply's header."""
        assert op in protocol.SAFE_TO_REPEAT, op
        last: EngineUnavailable | None = None
        for attempt in range(self.retries + 1):
            self._socket()  # an autostart that fails is not retried
            rid = self._send(op, **fields)
            try:
                header, _ = self._terminal(rid, op)
                return header
            except EngineUnavailable as e:  # a timeout, or the daemon is shutting down
                last = e
                self._retry_pause(e)
            finally:
                self._queues.pop(rid, None)
        raise EngineUnavailable(f"{last}{_tries(self.retries)}")
