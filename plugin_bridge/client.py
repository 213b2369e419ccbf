"""The torch-free client of the unbake engine: ``Client``, ``Session``, ``Stems``, ``StemStream``.

Imports numpy, pyzmq, msgpack, the standard library, ``engine.protocol`` and ``engine.errors``
only, never torch (a test checks it). One ``Client`` owns one zmq DEALER socket to the daemon's
ROUTER; it is not thread-safe (use one Client per thread).

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

import fcntl
import math
import operator
import os
import subprocess
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Iterator

import numpy as np
import zmq

import engine
from engine import endpoints, protocol
from engine.errors import (BadAudio, BadRequest, Cancelled, EngineUnavailable, ProtocolError,
                           UnbakeError, UnknownSession, from_code)

__all__ = ["Client", "Session", "Stems", "StemStream"]

CURVE_SERVER_KEY_ENV = "UNBAKE_CURVE_SERVER_KEY"
CURVE_CLIENT_CERT_ENV = "UNBAKE_CURVE_CLIENT_CERT"

PROBE_TIMEOUT_S = 0.5      # the hello probe that decides whether a daemon runs
PIPELINE = 3               # pushes separate() keeps in flight
RECV_QUEUE = 2             # replies zmq reads ahead of this process (ZMQ_RCVHWM); the rest wait
                           # in the daemon, which holds those stems anyway (zero-copy replies)
IDLE_EXIT_S = 600          # an autostarted daemon exits after this long without clients
RETRY_PAUSE_S = 0.5        # before resending to a daemon that answered it is shutting down
_REPLY_LIMITS = protocol.Limits(max_header_bytes=16 * 2 ** 20)  # replies come from a trusted peer
_SPAWNED: list[subprocess.Popen] = []  # keep spawned daemons referenced (no ResourceWarning at GC)


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


def _checked(block, channels: int | None, where: str, first_frame: int = 0,
             sample_rate: int | None = None) -> np.ndarray:
    """Audio as float32 C-contiguous [channels, frames], finite; never clipped nor rescaled.

    A 1-D array is mono ([1, frames]) where ``channels`` is 1 or None. Raises BadAudio naming the
    shape, or the first frame (counted from ``first_frame``) that holds a NaN or Inf.
    """
    a = np.asarray(block)
    if a.dtype.kind != "f":
        raise BadAudio(f"{where}: samples must be floating point (float32, nominally in [-1, 1]), "
                       f"got {a.dtype}; unbake never rescales integer PCM")
    if a.ndim == 1 and channels in (None, 1):
        a = a[np.newaxis, :]
    want = "1 or 2" if channels is None else str(channels)
    if a.ndim != 2 or (a.shape[0] not in (1, 2) if channels is None else a.shape[0] != channels):
        hint = ""
        if a.ndim == 2 and a.shape[1] in ((1, 2) if channels is None else (channels,)):
            hint = "; it looks like [frames, channels]: pass its transpose (.T)"
        raise BadAudio(f"{where}: expected float [channels, frames] with {want} channel(s), "
                       f"got shape {tuple(a.shape)}{hint}")
    with np.errstate(over="ignore", invalid="ignore"):
        a = np.ascontiguousarray(a, dtype=np.float32)
    if a.size and not math.isfinite(float(a.sum(dtype=np.float64))):  # float64 sums never overflow here
        bad = ~np.isfinite(a)
        at = first_frame + int(np.argmax(bad.any(axis=0)))
        when = f" ({at / sample_rate:.3f} s)" if sample_rate else ""
        raise BadAudio(f"{where}: NaN or Inf sample (or a value beyond float32) at frame {at}{when}")
    return a


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


def _tail(path: str, offset: int, max_bytes: int = 2000, lines: int = 6) -> str:
    """The last lines written to ``path`` after ``offset``, joined on one line."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


def _tries(retries: int) -> str:
    return f" (tried {retries + 1} times)" if retries else ""


def _concat(parts: list[np.ndarray], channels: int, views: bool = False) -> np.ndarray:
    """One writable array of the parts (views=True: a read-only view where there is one part)."""
    if not parts:
        return np.zeros((channels, 0), np.float32)
    if len(parts) == 1:
        return parts[0] if views or parts[0].flags.writeable else parts[0].copy()
    return np.concatenate(parts, axis=1)


# -- results ----------------------------------------------------------------------------------------

class Stems(Mapping):
    """The stems of one track: a read-only mapping ``stem name -> float32 [channels, frames]``.

    Every array has the input's channel count and exactly its length and alignment (offline
    results are latency-compensated: ``latency_samples`` is 0). Iteration follows ``stems``, the
    model's order (e.g. ``['vocals', 'accompaniment']``).

    Attributes: ``sample_rate`` (int, Hz, the input's), ``model`` (str, the model that made them),
    ``latency_samples`` (int, 0), ``stems`` (list[str]), ``channels``, ``frames`` (ints).
    """

    def __init__(self, stems: Mapping[str, np.ndarray], sample_rate: int, model: str | None,
                 latency_samples: int = 0):
        self._data = dict(stems)
        self.sample_rate = int(sample_rate)
        self.model = model
        self.latency_samples = int(latency_samples)

    @property
    def stems(self) -> list[str]:
        return list(self._data)

    @property
    def channels(self) -> int:
        return next(iter(self._data.values())).shape[0] if self._data else 0

    @property
    def frames(self) -> int:
        return next(iter(self._data.values())).shape[1] if self._data else 0

    def __getitem__(self, stem: str) -> np.ndarray:
        return self._data[stem]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return (f"Stems(model={self.model!r}, stems={self.stems}, sample_rate={self.sample_rate}, "
                f"channels={self.channels}, frames={self.frames}, latency_samples={self.latency_samples})")


# -- sessions ---------------------------------------------------------------------------------------

class Session:
    """One track in the engine, fed in blocks: the raw, undelayed form (see ``StemStream`` for the
    plugin-like delayed one). Made by ``Client.open``; not retried when the connection fails.

    Attributes (from the daemon's ``ready``): ``id`` (str), ``model`` (str), ``stems`` (list[str]),
    ``sample_rate`` (int, Hz, the track's), ``channels`` (1 or 2), ``model_sample_rate`` (int, Hz),
    ``latency_samples`` (int, at ``sample_rate``: after N frames pushed at least N - latency_samples
    frames of every stem have come back), ``options`` (dict, as the daemon applied them),
    ``weights_sha256`` (str, 64 hex digits identifying the model's weights, or None where the daemon
    does not know it: ``engine.registry.weights_sha256``);
    ``frames_in`` / ``frames_out``: frames pushed / stem frames received so far.

    ``push(block)`` sends float [channels, frames] audio (never clipped nor rescaled; float32 on the
    wire) and returns ``{stem: float32 [channels, m]}``, the stem frames that became final (m may be
    0); ``close()`` returns the tail; concatenated, all outputs have exactly the pushed length and
    align with the input. ``send_push`` / ``receive`` are the same push split in two, so that several
    pushes can be in flight (receive them in the order they were sent).

    Errors: BadAudio (wrong shape or channel count, NaN/Inf: naming the frame), the daemon's typed
    errors (QueueFull, Cancelled, UnknownSession, ModelError, ...), EngineUnavailable (no reply within
    the client's ``timeout_s``; the session is then lost), ProtocolError (replies that break the
    protocol). After an error the session is unusable; its later calls raise the same kind of error.
    """

    def __init__(self, client: Client, ready: dict, generation: int, max_chunk_samples: int):
        try:
            self.id: str = ready["session"]
            self.stems: list[str] = list(ready["stems"])
            self.sample_rate: int = int(ready["sample_rate"])
            self.channels: int = int(ready["channels"])
            self.latency_samples: int = int(ready.get("latency_samples") or 0)
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"ready reply: missing or malformed field ({e})") from None
        if not isinstance(self.id, str) or not self.stems or not all(isinstance(s, str) for s in self.stems) \
                or self.latency_samples < 0 or self.channels < 1:
            raise ProtocolError(f"ready reply: malformed session {ready.get('session')!r} / stems "
                                f"{ready.get('stems')!r} / latency {ready.get('latency_samples')!r}")
        self.model: str | None = ready.get("model")
        self.model_sample_rate: int | None = ready.get("model_sample_rate")
        self.options: dict = dict(ready.get("options") or {})
        sha = ready.get("weights_sha256")
        self.weights_sha256: str | None = sha if isinstance(sha, str) else None
        self.frames_in = 0
        self.frames_out = 0
        self.last_done: dict | None = None
        self.on_stems: Callable[[int], Any] | None = None  # called with frames_out as stems arrive
        self._views = False  # True: receive/close may return read-only views (Client.separate copies them)
        self._client = client
        self._generation = generation
        self._max_frames = max(1, int(max_chunk_samples) // self.channels)
        self._tickets: dict[int, list[int]] = {}  # ticket -> wire request ids, in sending order
        self._closed = False
        self._failed: UnbakeError | None = None

    def __repr__(self) -> str:
        return (f"Session(id={self.id!r}, model={self.model!r}, stems={self.stems}, sample_rate="
                f"{self.sample_rate}, channels={self.channels}, latency_samples={self.latency_samples})")

    @property
    def closed(self) -> bool:
        return self._closed

    # -- checks

    def _usable(self) -> None:
        if self._failed is not None:
            e = self._failed
            raise from_code(e.code, f"session {self.id} is unusable after an earlier error: {e}")
        if self._closed:
            raise UnknownSession(f"session {self.id} is closed")
        client = self._client
        if client._closed:
            raise EngineUnavailable(f"session {self.id}: its client is closed")
        if client._generation != self._generation:
            raise EngineUnavailable(f"session {self.id} was lost: the connection to {client.endpoint} "
                                    f"was reset since it was opened")

    def _fail(self, err: UnbakeError) -> None:
        """Mark the session unusable, drop what is in flight and ask the daemon to free it."""
        if self._failed is None:
            self._failed = err
        self._abandon()

    def _abandon(self) -> None:
        client = self._client
        for ids in self._tickets.values():
            for rid in ids:
                client._queues.pop(rid, None)
        self._tickets.clear()
        if not self._closed and not client._closed and client._generation == self._generation:
            client._send_nowait(protocol.CANCEL, session=self.id)
        self._closed = True

    def prepare(self, block) -> np.ndarray:
        """``block`` checked and converted as it would be pushed: float32 C-contiguous [channels, n].
        Raises BadAudio."""
        return _checked(block, self.channels, f"session {self.id}", self.frames_in, self.sample_rate)

    # -- pushing

    def _send_piece(self, piece: np.ndarray) -> int:
        try:
            rid = self._client._send(protocol.PUSH, [piece], session=self.id, channels=self.channels,
                                     frames=int(piece.shape[1]))
        except UnbakeError as e:
            self._fail(e)
            raise
        self.frames_in += piece.shape[1]
        return rid

    def send_push(self, block) -> int:
        """Send ``block`` (float [channels, frames]; split into several pushes where it exceeds the
        daemon's ``max_chunk_samples``) without waiting; returns a ticket for ``receive``.
        A 0-frame block sends nothing."""
        self._usable()
        block = self.prepare(block)
        ids: list[int] = []
        ticket = -self._client._new_id()  # the ticket names the list of wire requests it stands for
        self._tickets[ticket] = ids
        for i in range(0, block.shape[1], self._max_frames):
            ids.append(self._send_piece(block[:, i:i + self._max_frames]))
        return ticket

    def receive(self, ticket: int) -> dict[str, np.ndarray]:
        """Wait for the push ``ticket`` (the oldest not yet received) to be done; returns
        ``{stem: float32 [channels, m]}``, the stem frames it released (m may be 0)."""
        if ticket not in self._tickets:
            raise ValueError(f"session {self.id}: no push in flight with ticket {ticket}")
        if next(iter(self._tickets)) != ticket:
            raise ValueError(f"session {self.id}: receive pushes in the order they were sent")
        self._usable()
        ids = self._tickets[ticket]
        parts: dict[str, list[np.ndarray]] = {s: [] for s in self.stems}
        for rid in ids:
            self._collect(rid, parts, "push")
        del self._tickets[ticket]
        return {s: _concat(p, self.channels, self._views) for s, p in parts.items()}

    def push(self, block) -> dict[str, np.ndarray]:
        """Push ``block`` (float [channels, frames], the session's channel count; 1-D for mono) and
        wait; returns ``{stem: float32 [channels, m]}``, the stem frames that became final (m >= 0,
        at most ``latency_samples`` frames behind everything pushed)."""
        self._usable()
        if self._tickets:
            raise ValueError(f"session {self.id}: receive the pushes in flight before push()")
        block = self.prepare(block)
        parts: dict[str, list[np.ndarray]] = {s: [] for s in self.stems}
        for i in range(0, block.shape[1], self._max_frames):
            rid = self._send_piece(block[:, i:i + self._max_frames])
            self._collect(rid, parts, "push")
        return {s: _concat(p, self.channels) for s, p in parts.items()}

    def close(self) -> dict[str, np.ndarray]:
        """Finish the track: returns the stems' tail ``{stem: float32 [channels, m]}``; afterwards
        exactly ``frames_in`` frames of every stem have come back. The session is then gone."""
        parts: dict[str, list[np.ndarray]] = {s: [] for s in self.stems}
        for block in self.close_blocks():
            for stem, out in block.items():
                parts[stem].append(out)
        return {s: _concat(p, self.channels, self._views) for s, p in parts.items()}

    def close_blocks(self) -> Iterator[dict[str, np.ndarray]]:
        """``close`` as the stem blocks arrive: yields ``{stem: float32 [channels, m]}`` read-only
        views, one per ``stems`` reply (at most engine.scheduler.MAX_REPLY_FRAMES, 2**16, each), so that a caller writing them
        out never holds the whole tail. Iterate to the end: the session is gone after the last."""
        self._usable()
        if self._tickets:
            raise ValueError(f"session {self.id}: receive the pushes in flight before close()")
        try:
            rid = self._client._send(protocol.CLOSE, session=self.id)
        except UnbakeError as e:
            self._fail(e)
            raise
        yield from self._stem_blocks(rid, "close")
        self._closed = True
        if self.frames_out != self.frames_in:
            err = ProtocolError(f"session {self.id}: the engine returned {self.frames_out} stem frames "
                                f"for {self.frames_in} frames pushed")
            self._failed = err
            raise err

    def cancel(self) -> None:
        """Drop the session: the daemon stops its work and frees it. Pushes in flight are dropped.
        Does nothing if the session is closed, cancelled or lost already; raises EngineUnavailable
        when the daemon does not confirm within the client's ``timeout_s``."""
        client = self._client
        if self._closed or client._closed or client._generation != self._generation:
            self._closed = True
            return
        for ids in self._tickets.values():
            for rid in ids:
                client._queues.pop(rid, None)
        self._tickets.clear()
        self._closed = True
        rid = client._send(protocol.CANCEL, session=self.id)
        try:
            client._terminal(rid, f"cancel of session {self.id}")
        except (UnknownSession, Cancelled):
            pass
        finally:
            client._queues.pop(rid, None)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        if not self._closed:
            try:
                self.cancel()
            except UnbakeError:
                pass

    def _collect(self, rid: int, parts: dict[str, list[np.ndarray]], what: str) -> None:
        """Read the replies to request ``rid`` until its ``done``, appending stem blocks to ``parts``."""
        for block in self._stem_blocks(rid, what):
            for stem, out in block.items():
                parts[stem].append(out)

    def _stem_blocks(self, rid: int, what: str) -> Iterator[dict[str, np.ndarray]]:
        """The stem blocks of request ``rid`` as they arrive ({stem: read-only view}), until its
        ``done``; error replies raise (and fail the session)."""
        client = self._client
        label = f"{what} of session {self.id}"
        try:
            while True:
                header, pcm = client._next(rid, label)
                kind = header.get("kind")
                if kind == protocol.K_PROGRESS:
                    continue
                if kind == protocol.K_ERROR:
                    raise from_code(str(header.get("code")), str(header.get("message")))
                if kind == protocol.K_DONE:
                    self.last_done = header
                    return
                if kind != protocol.K_STEMS:
                    raise ProtocolError(f"{label}: unexpected {kind!r} reply")
                yield self._take_stems(header, pcm, label)
        except UnbakeError as e:
            self._fail(e)
            raise
        finally:
            client._queues.pop(rid, None)

    def _take_stems(self, header: dict, pcm: list, label: str) -> dict[str, np.ndarray]:
        if header.get("session") != self.id:
            raise ProtocolError(f"{label}: stems of session {header.get('session')!r}")
        if header.get("stems") != self.stems:
            raise ProtocolError(f"{label}: stems {header.get('stems')!r}, the session's are {self.stems}")
        if header.get("channels") != self.channels:
            raise ProtocolError(f"{label}: {header.get('channels')!r} channels, the session has {self.channels}")
        start, frames = header.get("start"), header.get("frames")
        if start != self.frames_out:
            raise ProtocolError(f"{label}: stems block starts at frame {start!r}, expected "
                                f"{self.frames_out} (blocks come in order, without gaps)")
        if not isinstance(frames, int) or frames < 0 or self.frames_out + frames > self.frames_in:
            raise ProtocolError(f"{label}: stems block of {frames!r} frames at {start}; only "
                                f"{self.frames_in} frames were pushed")
        arrays = protocol.reply_pcm(header, pcm, copy=False)  # views; _concat copies where needed
        self.frames_out += frames
        if self.on_stems is not None and frames:
            self.on_stems(self.frames_out)
        return dict(zip(self.stems, arrays))


class StemStream:
    """Streaming separation like a plugin with reported latency (pedalboard-style).

    Made by ``Client.stream``. ``latency_samples`` (int, frames at ``sample_rate``, from the daemon's
    ``ready``) is the fixed delay of the output. ``process(block)`` takes float [channels, n] and
    returns ``{stem: float32 [channels, n]}``: exactly n frames of every stem, the stems delayed by
    ``latency_samples`` (the stream's first ``latency_samples`` output frames are zeros, then stem
    frame 0, 1, ...). ``flush()`` ends the stream and returns the rest, so that all outputs of
    ``process`` and ``flush`` together have ``frames pushed + latency_samples`` frames; without their
    first ``latency_samples`` frames they equal ``Client.separate`` of the same audio.

    Attributes: ``latency_samples``, ``stems`` (list[str]), ``sample_rate`` (int, Hz), ``channels``,
    ``model`` (str), ``session`` (the underlying ``Session``).

    Errors: as ``Session``; ProtocolError when the daemon returned fewer stem frames than its stated
    latency allows (never padded silently). Context manager: leaving without ``flush()`` cancels.
    """

    def __init__(self, session: Session):
        self.session = session
        self.latency_samples = session.latency_samples
        self.stems = list(session.stems)
        self.sample_rate = session.sample_rate
        self.channels = session.channels
        self.model = session.model
        # the delay line: latency_samples zeros (the pre-roll), then the stems as they come
        self._fifo = {s: np.zeros((self.channels, self.latency_samples), np.float32) for s in self.stems}
        self.frames_in = 0
        self.frames_emitted = 0
        self._flushed = False

    def __repr__(self) -> str:
        return (f"StemStream(model={self.model!r}, stems={self.stems}, sample_rate={self.sample_rate}, "
                f"channels={self.channels}, latency_samples={self.latency_samples})")

    def _append(self, got: dict[str, np.ndarray]) -> None:
        for s in self.stems:
            block = got[s]
            if block.shape[1]:
                self._fifo[s] = np.concatenate([self._fifo[s], block], axis=1)

    def _pop(self, n: int) -> dict[str, np.ndarray]:
        out = {}
        for s in self.stems:
            fifo = self._fifo[s]
            out[s] = np.ascontiguousarray(fifo[:, :n])
            self._fifo[s] = fifo[:, n:]
        self.frames_emitted += n
        return out

    def process(self, block) -> dict[str, np.ndarray]:
        """Push ``block`` (float [channels, n]) and return exactly n frames of every stem, delayed by
        ``latency_samples``."""
        if self._flushed:
            raise UnknownSession(f"stream {self.session.id} is flushed")
        block = self.session.prepare(block)
        n = block.shape[1]
        if n:
            self._append(self.session.push(block))
            self.frames_in += n
        have = self._fifo[self.stems[0]].shape[1]
        if have < n:
            err = ProtocolError(
                f"stream {self.session.id}: the engine returned {self.session.frames_out} stem frames for "
                f"{self.session.frames_in} frames pushed, fewer than the {self.session.frames_in} - "
                f"{self.latency_samples} its latency promises; cannot fill a {n}-frame block")
            self.session._fail(err)
            raise err
        return self._pop(n)

    def flush(self) -> dict[str, np.ndarray]:
        """End the stream: returns the rest of the delay line, exactly ``latency_samples`` frames of
        every stem (the stems' last frames; zeros first if fewer frames than that were pushed)."""
        if self._flushed:
            raise UnknownSession(f"stream {self.session.id} is flushed already")
        self._append(self.session.close())
        self._flushed = True
        left = self._fifo[self.stems[0]].shape[1]
        if self.frames_emitted + left != self.frames_in + self.latency_samples:  # close() checked it
            raise ProtocolError(f"stream {self.session.id}: {self.frames_emitted + left} frames out for "
                                f"{self.frames_in} in + {self.latency_samples} latency")
        return self._pop(left)

    def cancel(self) -> None:
        """Drop the stream (the daemon frees the session)."""
        self._flushed = True
        self.session.cancel()

    def __enter__(self) -> StemStream:
        return self

    def __exit__(self, *exc) -> None:
        if not self._flushed:
            try:
                self.cancel()
            except UnbakeError:
                pass


# -- the client -------------------------------------------------------------------------------------

class Client:
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

    # -- requests and replies

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

    def _limits(self) -> dict:
        if self._hello is None:
            self.hello()
        limits = self._hello.get("limits")
        return limits if isinstance(limits, dict) else {}

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

    # -- autostart

    def _probe(self, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
        """Does a daemon answer hello at the endpoint within ``timeout_s``? (A fresh socket each time.)"""
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[len("ipc://"):]):
            return False
        sock = self._new_socket()
        try:
            rid = self._new_id()
            sock.send_multipart(protocol.request(protocol.HELLO, rid, client=self._client_name()),
                                flags=zmq.NOBLOCK)
            deadline = time.monotonic() + timeout_s
            while (remaining := deadline - time.monotonic()) > 0:
                if not sock.poll(max(1, math.ceil(remaining * 1000)), zmq.POLLIN):
                    continue
                frames = sock.recv_multipart()
                try:
                    header = protocol.check_reply(protocol.unpack_header(frames[0], _REPLY_LIMITS))
                except ProtocolError:
                    return False
                if header.get("re") not in (rid, None):
                    continue
                if header.get("kind") == protocol.K_ERROR:
                    err = from_code(str(header.get("code")), str(header.get("message")))
                    if isinstance(err, EngineUnavailable):
                        return False  # shutting down: not a daemon to talk to
                    raise err
                self._check_hello(header)
                self._hello = header
                return True
            return False
        except zmq.ZMQError:
            return False
        finally:
            sock.close()

    def _daemon_lock_held(self) -> bool:
        """Is the endpoint's daemon lock (``protocol.lock_path``) held, i.e. a daemon up or starting?"""
        try:
            fd = os.open(protocol.lock_path(self.endpoint), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OSError, UnbakeError):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def _ensure_daemon(self) -> None:
        """Make sure a daemon answers at the endpoint, starting one if needed (one per endpoint even
        when several processes try at once: they serialise on ``<lock_path>.start``)."""
        if self._probe():
            return
        start_lock = protocol.lock_path(self.endpoint) + ".start"
        try:
            os.makedirs(os.path.dirname(start_lock) or ".", mode=0o700, exist_ok=True)
        except OSError as e:
            raise EngineUnavailable(f"cannot start the unbake engine at {self.endpoint}: "
                                    f"{os.path.dirname(start_lock)}: {e.strerror}") from None
        fd = endpoints.open_lock(start_lock)  # never through a symlink; NotPrivate otherwise
        try:
            deadline = time.monotonic() + self.start_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EngineUnavailable(
                            f"another process has been starting the unbake engine at {self.endpoint} for "
                            f"more than {self.start_timeout_s:g} s (lock {start_lock})") from None
                    time.sleep(0.05)
            if self._probe():  # someone else started it meanwhile
                return
            self._start_daemon()
        finally:
            os.close(fd)  # releases the flock

    def _start_daemon(self) -> None:
        log_path = os.path.join(protocol.runtime_dir(), "engine.log")
        cmd = [sys.executable, "-m", "engine.daemon", "--endpoint", self.endpoint,
               "--idle-exit-s", str(IDLE_EXIT_S), *self.daemon_args]
        env = dict(os.environ)  # the daemon runs the engine this client was imported with
        root = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0

        def spawn() -> tuple[subprocess.Popen, bool]:
            busy = self._daemon_lock_held()  # a daemon is exiting (or stuck): ours may refuse
            try:
                log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise EngineUnavailable(f"cannot start the unbake engine: its log {log_path}: {e.strerror}") from None
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        close_fds=True, start_new_session=True, env=env)
            except OSError as e:
                raise EngineUnavailable(f"cannot start the unbake engine ({cmd[0]} -m engine.daemon): {e}") from None
            finally:
                os.close(log)
            _SPAWNED.append(proc)
            return proc, busy

        proc, busy = spawn()
        spawns = 1
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            began = time.monotonic()
            if self._probe():
                return
            code = proc.poll()
            if code is not None and not self._daemon_lock_held():
                if busy and spawns < 3:  # it refused while another daemon was going away: again
                    proc, busy = spawn()
                    spawns += 1
                else:
                    tail = _tail(log_path, offset)
                    raise EngineUnavailable(
                        f"the unbake engine exited with status {code} before answering at {self.endpoint}"
                        f"{': ' + tail if tail else ''} (log: {log_path})")
            if time.monotonic() > deadline:
                raise EngineUnavailable(f"the unbake engine started for {self.endpoint} did not answer within "
                                        f"{self.start_timeout_s:g} s (log: {log_path})")
            time.sleep(max(0.0, 0.1 - (time.monotonic() - began)))
