"""The torch-free client of the unbake engine: ``Client``, ``Session``, ``Stems``, ``StemStream``.

Imports numpy, pyzmq, msgpack, the standard library, ``engine.protocol`` and ``engine.errors``
only, never torch (a test checks it). One ``Client`` owns one zmq DEALER socket to the daemon's
ROUTER; it is not thread-safe (use one Client per thread).

This module is the facade (``Client``: its public requests and ``separate``); the rest lives in
``plugin_bridge.transport`` (the socket, CURVE keys, send/receive, timeouts, Lazy Pirate retries),
``plugin_bridge.autostart`` (probe, daemon lock, start lock, spawn, log tail) and
``plugin_bridge.sessions`` (``Stems``, ``Session``, ``StemStream``); every name they define that this
module defined before is still importable from here.

How the client maps to the wire protocol (``engine.protocol``, version 1)::

    Client(endpoint=None)  . . . . . . . . .  autostart: hello probe (0.5 s); if nobody answers, take
                                              flock(<lock_path>.start), probe again, spawn
                                              `python -m engine.daemon --endpoint E --idle-exit-s 600`
                                              and poll hello until it answers
    .hello() / .status() / .models()  ---->   hello | status | models   --> one terminal reply
                                              (Lazy Pirate: timeout -> new socket, resend, `retries` times)
    .open(model, rate, channels)  -------->   open {model, sample_rate, channels, options, repo?}
                                         <--  progress* ... ready {session, stems, latency_samples, ...}
        Session.push(block)  ------------->   push {session, channels, frames} + 1 PCM frame
                                         <--  progress* stems* done     (stems.start checked, no gaps)
        Session.close()  ----------------->   close {session}  <-- progress* stems* done   (the tail)
        Session.cancel()  ---------------->   cancel {session} <-- done
    .separate(audio, rate)  -------------->   open, push x ceil(frames / chunk) with 3 pushes in flight,
                                              close  ==> Stems  (redone from scratch on a timeout)
    .stream(model, rate, channels)  ------>   open  ==> StemStream
        StemStream.process(block)  ------->   push; a delay line of latency_samples frames per stem
        StemStream.flush()  -------------->   close; the rest of the delay line

Every reply carries ``re``, the id of the request it answers; replies to other requests in flight on
the same Client are buffered, so several sessions may be used at once. Waiting for a reply gives up
after ``timeout_s`` seconds without any reply to that request (the daemon sends ``progress``
keep-alives while a request is queued or running) and raises ``EngineUnavailable``; error replies
raise the engine's typed errors (``engine.errors.from_code``), with the daemon's ``code``.

Latency and streaming, next to pedalboard: a pedalboard plugin with latency, used as a stream
(``plugin.process(block, sample_rate, reset=False)`` block after block), returns for every block
exactly as many frames as it was given, delayed by the plugin's reported latency; the first
``latency`` output frames are silence and the tail is obtained by feeding more (silent) input.
``StemStream.process(block)`` does the same per stem: it returns exactly ``block.shape[1]`` frames of
every stem, delayed by ``StemStream.latency_samples`` (zeros first, then stem frame 0, 1, ...); unlike
pedalboard the tail is not obtained by feeding silence but by ``flush()``, which returns the remaining
frames, so that everything ``process()`` and ``flush()`` returned has ``frames pushed +
latency_samples`` frames, and dropping its first ``latency_samples`` frames gives exactly the offline
result (``Client.separate``) of the same audio. ``Session`` is the raw, undelayed form: its stems come
as soon as they are final, at most ``latency_samples`` frames behind the input. ``Stems`` (offline) are
already compensated: same length and alignment as the input, ``latency_samples == 0``.
"""
from __future__ import annotations

import operator
import os
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from engine import protocol
from engine.errors import BadAudio, BadRequest, EngineUnavailable, ProtocolError

from .autostart import IDLE_EXIT_S, PROBE_TIMEOUT_S, _SPAWNED, Autostart, _tail
from .sessions import Session, StemStream, Stems, _checked, _concat
from .transport import (CURVE_CLIENT_CERT_ENV, CURVE_SERVER_KEY_ENV, RECV_QUEUE, RETRY_PAUSE_S,
                        _REPLY_LIMITS, Transport, _curve_keys, _load_cert, _tries, _z85_key)

__all__ = ["Client", "Session", "Stems", "StemStream"]

PIPELINE = 3               # pushes separate() keeps in flight

# Names imported above only so that they stay importable from here (plugin_bridge.client.X), as before
# they moved to plugin_bridge.transport, .autostart and .sessions.
_MOVED = (CURVE_CLIENT_CERT_ENV, CURVE_SERVER_KEY_ENV, RECV_QUEUE, RETRY_PAUSE_S, _REPLY_LIMITS, _load_cert,
          _z85_key, IDLE_EXIT_S, PROBE_TIMEOUT_S, _SPAWNED, _tail, _concat)


# -- helpers ----------------------------------------------------------------------------------------

def _repo_path(repo) -> str | None:
    """A weights folder as ``open.repo`` carries it: absolute (``~`` expanded, relative to this
    process's working folder), checked by ``protocol.check_repo_path``; None stays None."""
    if repo is None:
        return None
    path = os.path.abspath(os.path.expanduser(os.fspath(repo)))
    return protocol.check_repo_path(path, "repo")


def _rate(sample_rate) -> int:
    """A sample rate as an int (44100, np.int64(44100) or 44100.0); else BadRequest."""
    if isinstance(sample_rate, bool):
        raise BadRequest(f"sample_rate must be a whole number of Hz, got {sample_rate!r}")
    try:
        return operator.index(sample_rate)
    except TypeError:
        pass
    if isinstance(sample_rate, (float, np.floating)) and float(sample_rate).is_integer():
        return int(sample_rate)
    raise BadRequest(f"sample_rate must be a whole number of Hz, got {sample_rate!r}")


# -- the client -------------------------------------------------------------------------------------

class Client(Autostart, Transport):
    """A connection to the unbake engine daemon (torch-free; not thread-safe).

    endpoint: zmq endpoint, e.g. ``ipc:///run/user/1000/unbake/engine.sock`` or ``tcp://host:5555``
        (``engine.endpoints.check_endpoint``: ipc:// or tcp:// only, checked here: BadRequest).
        None (default): ``$UNBAKE_ENDPOINT``, else ``ipc://<runtime_dir>/engine.sock``, and autostart
        (NotPrivate, code E_NOT_PRIVATE, when the runtime folder is not this user's alone: a
        symlink, another owner, open to others; nothing is changed then). An autostarted engine on
        a loopback tcp:// endpoint without CURVE needs ``UNBAKE_ALLOW_ANY_LOCAL_USER=1`` in this
        process's environment (``unbake serve --allow-any-local-user``), else it refuses to start.
    timeout_s: seconds to wait for the next reply to a request (any reply to it, ``progress``
        keep-alives included, restarts the wait) before giving up with EngineUnavailable. Default 10.
    retries: how many times a request that is safe to repeat (hello, status, models, a whole
        ``separate``) is sent again on a fresh socket after a timeout (Lazy Pirate). Default 2.
    autostart: start a daemon (``python -m engine.daemon``, detached, exits after 600 s idle) when
        none answers. Default: True when ``endpoint`` is None, else False.
    start_timeout_s: how long to wait for a started daemon to answer (and for another process's
        start to finish). Default 120.
    curve_server_key: the daemon's CURVE public key (z85, 40 characters, str or bytes) or the path
        of its certificate file; default ``$UNBAKE_CURVE_SERVER_KEY``. None: no encryption.
    curve_secret_key: the path of this client's secret certificate file (zmq ``.key_secret``);
        default ``$UNBAKE_CURVE_CLIENT_CERT``; None with a server key: an ephemeral key pair.
    daemon_args: extra arguments for an autostarted daemon (e.g. ``["-d", "cuda"]``).
    repo: a weights folder (str or path; ``~`` and relative paths are made absolute here) that the
        sessions of this client take their models from instead of the engine's own, however the
        engine was started (``open``'s ``repo`` overrides it per session). Default None: the engine's.
        Only an engine on a private ipc:// socket accepts it (NotPermitted, code E_NOT_PERMITTED,
        from any other); its files are verified as in the engine's own folder.

    Errors: EngineUnavailable (no daemon answered in time, it could not be started, or it is
    shutting down), the daemon's typed errors (``engine.errors``: BadAudio, BadRequest, QueueFull,
    ModelError and subclasses, ProtocolError, LimitExceeded, ...), BadRequest for a bad CURVE setup.
    Usable as a context manager (closes on exit).
    """

    def __init__(self, endpoint: str | None = None, *, timeout_s: float = 10.0, retries: int = 2,
                 autostart: bool | None = None, start_timeout_s: float = 120.0,
                 curve_server_key: bytes | str | None = None, curve_secret_key: str | None = None,
                 daemon_args: list[str] = (), repo: str | os.PathLike | None = None):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if int(retries) < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        self.endpoint: str = protocol.check_endpoint(endpoint if endpoint is not None
                                                     else protocol.default_endpoint())
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.autostart = (endpoint is None) if autostart is None else bool(autostart)
        self.start_timeout_s = float(start_timeout_s)
        self.daemon_args = [os.fspath(a) for a in daemon_args]
        self.repo: str | None = _repo_path(repo)
        self._curve = _curve_keys(curve_server_key, curve_secret_key)
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._generation = 0              # bumped at every socket reset: sessions of older ones are lost
        self._next_id = 0
        self._queues: dict[int, deque] = {}  # request id -> replies received while waiting for another
        self._hello: dict | None = None
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self._closed = False

    def __repr__(self) -> str:
        return f"Client({self.endpoint!r}, timeout_s={self.timeout_s:g}, autostart={self.autostart})"

    # -- public requests

    def hello(self) -> dict:
        """The daemon's ``hello`` reply header: ``protocol`` (int), ``engine_version`` (str),
        ``device`` (str), ``limits`` (dict, ``engine.protocol.Limits`` fields), plus ``v``, ``kind``,
        ``re``. Retried; raises EngineUnavailable, ProtocolError (another protocol version)."""
        header = self._call_safe(protocol.HELLO, client=self._client_name())
        self._check_hello(header)
        self._hello = header
        return header

    def status(self) -> dict:
        """The daemon's ``status`` reply header (``uptime_s``, ``device``, ``models``,
        ``queue_depth``, ``sessions``, ``served``, ...). Retried; raises EngineUnavailable."""
        return self._call_safe(protocol.STATUS)

    def models(self) -> list[dict]:
        """The models the daemon knows: ``[{name, sources, installed, loaded}, ...]``. Retried."""
        models = self._call_safe(protocol.MODELS).get("models")
        if not isinstance(models, list):
            raise ProtocolError(f"models reply: 'models' must be a list, got {type(models).__name__}")
        return models

    def open(self, model: str | None, sample_rate: int, channels: int, *,
             repo: str | os.PathLike | None = None, **options) -> Session:
        """Open a session: a track at ``sample_rate`` Hz with ``channels`` (1 or 2) channels, fed with
        ``Session.push``. ``model``: a name (``Client.models()``) or None for the daemon's default.
        ``repo``: a weights folder for this session (default: the Client's ``repo``, else the
        engine's own). ``options``: segment_s, overlap, shifts, seed, two_stems, transition_power
        (None: default). Not retried. Raises the daemon's errors (UnknownModel, WeightsMissing,
        ChecksumMismatch, QueueFull, NotPermitted for ``repo`` on a TCP engine, ...), BadRequest
        for a ``repo`` that is not a usable path."""
        rate = _rate(sample_rate)
        repo = self.repo if repo is None else _repo_path(repo)
        if isinstance(channels, bool):
            raise BadAudio(f"channels must be 1 or 2, got {channels!r}")
        channels = operator.index(channels)
        opts = protocol.check_options(protocol.to_plain(options), "open")
        limits = self._limits()
        fields: dict[str, Any] = {"sample_rate": rate, "channels": channels, "options": opts}
        if model is not None:
            fields["model"] = model
        if repo is not None:
            fields[protocol.REPO_FIELD] = repo
        rid = self._send(protocol.OPEN, **fields)
        generation = self._generation
        try:
            header, _ = self._terminal(rid, f"open of {model or 'the default model'}")
        finally:
            self._queues.pop(rid, None)
        if header.get("kind") != protocol.K_READY:
            raise ProtocolError(f"open: expected a 'ready' reply, got {header.get('kind')!r}")
        session = Session(self, header, generation,
                          limits.get("max_chunk_samples", protocol.Limits.max_chunk_samples))
        self._sessions.add(session)
        return session

    def stream(self, model: str | None, sample_rate: int, channels: int, **options) -> StemStream:
        """``open`` a session wrapped as a ``StemStream`` (plugin-like, delayed by its latency);
        ``options`` as ``open`` takes them (``repo`` included)."""
        return StemStream(self.open(model, sample_rate, channels, **options))

    def separate(self, audio, sample_rate: int, model: str | None = None, *,
                 progress: Callable[[float], Any] | None = None, chunk_s: float = 10.0,
                 repo: str | os.PathLike | None = None, **options) -> Stems:
        """Separate a whole track.

        audio: float [channels, frames] (1 or 2 channels; a 1-D array is mono), never clipped nor
            rescaled (sent as float32). sample_rate: Hz. model: a name, or None for the daemon's default.
        progress: called with the fraction done (float in [0, 1], stem frames back / frames) as
            stems arrive. chunk_s: seconds of audio per push (3 pushes are kept in flight).
        repo: a weights folder for this separation (as ``open``; default: the Client's ``repo``).
        options: segment_s, overlap, shifts, seed, two_stems, transition_power.
        Returns ``Stems`` with the input's length and alignment (latency compensated).

        On a timeout the whole separation is redone on a fresh connection, up to ``retries`` times.
        Raises BadAudio (shape, channels, empty, NaN/Inf naming the frame), EngineUnavailable, and
        the daemon's typed errors.
        """
        rate = _rate(sample_rate)
        block = _checked(audio, None, "audio", 0, rate)
        if block.shape[1] == 0:
            raise BadAudio("audio: no frames")
        if not chunk_s > 0:
            raise ValueError(f"chunk_s must be > 0, got {chunk_s!r}")
        opts = protocol.check_options(protocol.to_plain(options), "separate")
        if repo is not None:
            opts["repo"] = _repo_path(repo)  # passed on to open() as its keyword
        last: EngineUnavailable | None = None
        for attempt in range(self.retries + 1):
            self._socket()  # an autostart that fails is not retried
            try:
                return self._separate_once(block, rate, model, progress, chunk_s, opts)
            except EngineUnavailable as e:
                last = e
                self._retry_pause(e)
        raise EngineUnavailable(f"{last}{_tries(self.retries)}")

    def close(self) -> None:
        """Cancel the sessions still open (without waiting) and close the socket. Idempotent."""
        if self._closed:
            return
        for session in list(self._sessions):
            if not session._closed:
                session._abandon()
        if self._sock is not None:
            self._sock.setsockopt(zmq.LINGER, 200)  # let the cancels go out
            self._sock.close()
            self._sock = None
        self._queues.clear()
        self._closed = True

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- separate

    def _separate_once(self, block: np.ndarray, rate: int, model: str | None,
                       progress: Callable[[float], Any] | None, chunk_s: float, opts: dict) -> Stems:
        channels, total = block.shape
        session = self.open(model, rate, channels, **opts)
        try:
            step = max(1, min(int(round(chunk_s * rate)), session._max_frames))
            session._views = True  # blocks are copied into `out` below: no intermediate copies
            out = {s: np.empty((channels, total), np.float32) for s in session.stems}
            filled = 0

            def take(got: dict[str, np.ndarray]) -> None:
                nonlocal filled
                m = got[session.stems[0]].shape[1]
                for s in session.stems:
                    out[s][:, filled:filled + m] = got[s]
                filled += m

            if progress is not None:
                session.on_stems = lambda frames_out: progress(min(1.0, frames_out / total))
            in_flight: deque[int] = deque()
            for start in range(0, total, step):
                if len(in_flight) >= PIPELINE:
                    take(session.receive(in_flight.popleft()))
                session._usable()
                ticket = -self._new_id()
                session._tickets[ticket] = [session._send_piece(block[:, start:start + step])]
                in_flight.append(ticket)
            while in_flight:
                take(session.receive(in_flight.popleft()))
            take(session.close())
        except BaseException as e:
            if not isinstance(e, EngineUnavailable):
                session._abandon()
            raise
        if filled != total:
            raise ProtocolError(f"separate: {filled} stem frames for {total} frames of audio")
        return Stems(out, rate, session.model, 0)

    def _limits(self) -> dict:
        if self._hello is None:
            self.hello()
        limits = self._hello.get("limits")
        return limits if isinstance(limits, dict) else {}
