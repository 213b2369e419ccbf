"""The engine's listening socket (``engine.daemon``): who may reach it, the endpoint's lock, the bind,
and what is removed at exit. Syntax of endpoints and the private runtime folder: ``engine.endpoints``.

Who reaches the engine: ``ipc://PATH`` only its own user (the socket file is 0600, in the 0700
runtime folder by default); ``tcp://`` needs CURVE keys (``--curve-secret-key``,
``--curve-allowed-keys``), loopback included, unless ``--allow-any-local-user``
(``UNBAKE_ALLOW_ANY_LOCAL_USER=1``) says that every local user may use it (loopback only: a TCP
endpoint that other machines reach always needs CURVE). ``Listener(...)`` checks everything it can
before anything is changed or loaded, so that a bad CURVE file (missing, or without a secret key),
TCP without CURVE, or a file in the way of the socket is one line and exit status 1 within a second,
whatever ``--preload`` asks; the socket itself is bound after the preload (a client that finds it
gets answers), where only a TCP port in use can still fail.

A peer may name a weights folder for its session (``open.repo``, ``unbake separate --repo DIR``)
only where the daemon listens on a private ipc:// socket (``Listener.peers_may_name_paths``,
``protocol.ipc_is_private``: ``bind`` creates the socket file 0600, in the 0700 runtime folder by
default, so the peer is the engine's own user or root): the daemon knows its one bound endpoint, so
every peer of a tcp:// engine (loopback: any local user; CURVE: another machine) gets
``E_NOT_PERMITTED`` instead, before anything is opened. The folder's files are verified like the
engine's own (catalog sha256, SHA8 of ``SIG-SHA8.th``).
"""
from __future__ import annotations

import fcntl
import os

import zmq
import zmq.auth

from . import endpoints
from . import protocol as P
from .endpoints import is_loopback
from .errors import BadRequest, EngineUnavailable, NotPrivate


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


class Listener:
    """endpoint: where to bind (``ipc://PATH`` or ``tcp://HOST:PORT``, ``endpoints.check_endpoint``).
    curve_secret_key (a zmq certificate file with the secret key), curve_allowed_keys (a folder of
    the allowed clients' public certificates): both or neither. allow_any_local_user (bool): a
    loopback tcp:// endpoint without CURVE is allowed (every local user may use the engine); refused
    otherwise. Checked here, before anything is created: raises BadRequest (a bad endpoint or CURVE
    file, TCP without CURVE) or NotPrivate (something other than a socket of this user at the ipc
    path). Then ``lock``, ``bind``; at exit ``close`` and, once the zmq context is gone, ``unlock``."""

    def __init__(self, endpoint: str, *, curve_secret_key: str | None = None,
                 curve_allowed_keys: str | None = None, allow_any_local_user: bool = False):
        self.endpoint = endpoints.check_endpoint(endpoint)
        self.curve_secret_key, self.curve_allowed_keys = curve_secret_key, curve_allowed_keys
        self.allow_any_local_user = bool(allow_any_local_user)
        self.curve_keys = self._check_access()  # (public, secret) or None; raises before anything is made
        self.peers_may_name_paths = P.ipc_is_private(endpoint)  # open.repo: see the module docstring
        self.socket_file: tuple[int, int] | None = None  # (st_dev, st_ino) of the ipc socket we bound
        self.lock_fd: int | None = None
        self.router = None
        self.auth = None

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

    def lock(self) -> None:
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

    def bind(self, ctx: zmq.Context, max_message_bytes: int) -> zmq.Socket:
        """Bind the ROUTER (CURVE server when keys were given) and return it. ipc: only a stale
        socket of this user is replaced (``endpoints.clear_stale_socket``); the socket file is made
        0600 and remembered, so that only it is removed at exit. Raises NotPrivate,
        EngineUnavailable (the address is in use), BadRequest (libzmq refuses the address); the
        socket is closed by ``close`` either way."""
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.SNDTIMEO, 0)
        self.router.setsockopt(zmq.LINGER, 1000)
        self.router.setsockopt(zmq.RCVHWM, 1000)
        self.router.setsockopt(zmq.SNDHWM, P.SEND_QUEUE_MESSAGES)  # the rest is kept and counted (engine.clients)
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
                return self.router
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
        return self.router

    def close(self) -> None:
        """Close the ROUTER, stop CURVE's authenticator, remove the socket file this listener bound
        (and nothing else)."""
        if self.router is not None:
            self.router.close(linger=500)
        if self.auth is not None:
            self.auth.stop()
        path = endpoints.ipc_path(self.endpoint)
        if path is not None and self.socket_file is not None and endpoints.socket_identity(path) == self.socket_file:
            try:
                os.unlink(path)  # the socket this daemon bound, and nothing else
            except FileNotFoundError:
                pass

    def unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
