"""Sessions and results of the client: ``Stems`` (offline results), ``Session`` (one track fed in
blocks, undelayed) and ``StemStream`` (a ``Session`` delayed by its latency, pedalboard-style), and
the audio check they share (part of ``plugin_bridge.client``; see its module docstring for how they
map to the wire protocol). Torch-free.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from engine import protocol
from engine.errors import (BadAudio, Cancelled, EngineUnavailable, ProtocolError, UnbakeError,
                           UnknownSession, from_code)

if TYPE_CHECKING:
    from .client import Client


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
