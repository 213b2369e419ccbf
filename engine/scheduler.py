"""The scheduler: segments of every session queue here; one worker thread batches them through the
networks, round-robin between sessions, and hands finished stem blocks back as replies.

    daemon (main thread)                    worker thread
    submit(sid, push/close, block) ──inbox──▶ track.feed(block) -> jobs (segments) per session
    cancel(sid) drops the session's          pick a batch: round-robin over sessions, one head job
      queued jobs at once                      each per round, same network and window (job.key),
                                               up to max_batch; wait up to max_queue_delay_s for
                                               more when the batch is not full (Triton-style)
                                             run_jobs(batch): one forward pass (freed heap
                                               given back first if its shape is new: heap.py)
    emit(identity, header, pcm) ◀──────────── track.collect() -> stems / progress / done replies

A paused session (``pause``: its client does not read its replies, engine.daemon) keeps its
queued segments but none of them is picked until it is resumed, so the engine stops making output
nobody reads.

Only one worker at a time touches a session's TrackSeparator; the lock guards the queues and makes
sure every request gets exactly one terminal reply, even when a cancel races with its completion.

``workers`` > 1 (``unbake serve --ray``: one per model replica, engine.replicas) runs that many
worker threads, each with its own batch in flight. A worker takes a session (to feed it, or for a
batch) only when no other worker holds it (``Session.busy``): a session's segments are put back in
grid order and its replies go out in order, as with one worker; different sessions run at once.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable

import numpy as np

from . import protocol as P
from .apply import Job, run_jobs
from .errors import Cancelled, EngineUnavailable, QueueFull, UnbakeError, UnknownSession
from .heap import release_free_memory

PROGRESS_EVERY_S = 0.5
MAX_REPLY_FRAMES = 2 ** 16  # frames per stems reply (1.5 s at 44.1 kHz): a client writes each out as it
# comes, and holds a few (plugin_bridge.client.RECV_QUEUE) instead of a whole tail


class Task:
    """One push or close request of a session."""
    __slots__ = ("identity", "re", "op", "block", "jobs_total", "jobs_left", "t0", "t_progress", "fed")

    def __init__(self, identity: bytes, re: int, op: str, block: np.ndarray | None):
        self.identity, self.re, self.op, self.block = identity, re, op, block
        self.jobs_total = self.jobs_left = 0
        self.t0 = self.t_progress = time.monotonic()
        self.fed = False


class Session:
    __slots__ = ("sid", "track", "model_name", "inbox", "tasks", "jobs", "cancelled", "frames_out",
                 "on_removed", "busy")

    def __init__(self, sid: str, track, model_name: str, on_removed: Callable[[], None] | None):
        self.sid, self.track, self.model_name = sid, track, model_name
        self.inbox: collections.deque[Task] = collections.deque()  # not yet fed
        self.tasks: collections.deque[Task] = collections.deque()  # fed, waiting for their jobs
        self.jobs: collections.deque[tuple[Job, Task, float]] = collections.deque()
        self.cancelled = False
        self.frames_out = 0
        self.on_removed = on_removed
        self.busy = False  # a worker is feeding it or has a batch of it in flight


class Scheduler:
    """emit(identity, header: dict, pcm: list[np.ndarray]) sends a reply; it must be thread-safe.

    max_batch: most segments in one forward pass. max_queue_delay_s: how long a segment may wait
    for others to fill a batch. max_pending: requests of one session queued at once.
    forward: where the forward passes run (``engine.apply.run_jobs``; None: in this process).
    workers: worker threads, each with one batch in flight (1 unless ``forward`` runs elsewhere).
    """

    def __init__(self, emit: Callable[[bytes, dict, list], None], *, max_batch: int = 1,
                 max_queue_delay_s: float = 0.002, max_pending: int = 16, forward=None, workers: int = 1):
        self.emit = emit
        self.max_batch = max(1, int(max_batch))
        self.max_queue_delay_s = max(0.0, float(max_queue_delay_s))
        self.max_pending = max_pending
        self.cond = threading.Condition()
        self.sessions: dict[str, Session] = {}
        self.ring: collections.deque[str] = collections.deque()  # round-robin order
        self.paused: set[str] = set()  # sessions whose jobs are not picked (pause)
        self.stopping = False
        self.batches = 0
        self.segments = 0
        self._last_shape: tuple | None = None  # of the last forward pass (_run)
        self.forward = forward
        self.threads = [threading.Thread(target=self._loop, name=f"unbake-scheduler-{i}", daemon=True)
                        for i in range(max(1, int(workers)))]
        for t in self.threads:
            t.start()

    # -- called by the daemon's thread --------------------------------------------------------
    def add(self, sid: str, track, model_name: str, on_removed: Callable[[], None] | None = None) -> None:
        with self.cond:
            self.sessions[sid] = Session(sid, track, model_name, on_removed)
            self.ring.append(sid)

    def submit(self, sid: str, identity: bytes, re: int, op: str, block: np.ndarray | None = None) -> None:
        """Queue a push (block float32 [channels, n]) or close. Raises UnknownSession, QueueFull."""
        with self.cond:
            sess = self.sessions.get(sid)
            if sess is None or sess.cancelled:
                raise UnknownSession(f"session {sid}: not open (closed, cancelled or expired)")
            if self.stopping:
                raise EngineUnavailable("the engine is shutting down")
            if len(sess.inbox) + len(sess.tasks) >= self.max_pending:
                raise QueueFull(f"session {sid}: {self.max_pending} requests already queued; wait for "
                                f"their replies")
            if any(t.op == P.CLOSE for t in sess.inbox) or any(t.op == P.CLOSE for t in sess.tasks):
                raise UnknownSession(f"session {sid}: already closing")
            sess.inbox.append(Task(identity, re, op, block))
            self.cond.notify()

    def cancel(self, sid: str, reason: UnbakeError | None = None) -> bool:
        """Drop a session and its queued segments now; its pending requests get ``reason``
        (Cancelled by default) as their reply. False if there was no such session."""
        with self.cond:
            sess = self.sessions.get(sid)
            if sess is None:
                return False
            self._remove(sess, reason or Cancelled(f"session {sid} was cancelled"))
            return True

    def drop(self, sid: str) -> None:
        """Free an idle session (its client went away)."""
        self.cancel(sid, UnknownSession(f"session {sid} expired"))

    def pause(self, sid: str, paused: bool = True) -> None:
        """Stop (True) or resume (False) running the session's segments; requests still queue
        (within max_pending). Unknown sessions are ignored."""
        with self.cond:
            if paused:
                if sid in self.sessions:
                    self.paused.add(sid)
            elif sid in self.paused:
                self.paused.discard(sid)
                self.cond.notify_all()

    def has(self, sid: str) -> bool:
        """Whether the session is still open here (not closed, cancelled or failed)."""
        with self.cond:
            return sid in self.sessions

    @property
    def queue_depth(self) -> int:
        """Segments and unfed requests waiting."""
        with self.cond:
            return sum(len(s.jobs) + len(s.inbox) for s in self.sessions.values())

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel everything left (replies: EngineUnavailable) and stop the worker."""
        with self.cond:
            self.stopping = True
            for sess in list(self.sessions.values()):
                self._remove(sess, EngineUnavailable("the engine is shutting down"))
            self.cond.notify_all()
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- under the lock -----------------------------------------------------------------------
    def _remove(self, sess: Session, reason: UnbakeError | None) -> None:
        sess.cancelled = True
        if reason is not None:
            for task in list(sess.tasks) + list(sess.inbox):
                self.emit(task.identity, *_error(task.re, reason))
        sess.jobs.clear()
        sess.inbox.clear()
        sess.tasks.clear()
        self.sessions.pop(sess.sid, None)
        self.paused.discard(sess.sid)
        try:
            self.ring.remove(sess.sid)
        except ValueError:
            pass
        if sess.on_removed is not None:
            sess.on_removed()

    # -- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not any(not s.busy and (s.inbox or (s.jobs and s.sid not in self.paused))
                                                    for s in self.sessions.values()):
                    self.cond.wait()
                if self.stopping:
                    return
                feeding = [s for s in list(self.sessions.values()) if s.inbox and not s.busy]
                for s in feeding:
                    s.busy = True
                fresh = [(s, s.inbox.popleft()) for s in feeding for _ in range(len(s.inbox))]
            try:
                for sess, task in fresh:
                    self._feed(sess, task)
            finally:
                self._release(feeding)
            batch = self._pick_batch()
            if batch:
                try:
                    self._run(batch)
                finally:
                    self._release([s for s, _, _ in batch])

    def _release(self, sessions: list[Session]) -> None:
        if sessions:
            with self.cond:
                for s in sessions:
                    s.busy = False
                self.cond.notify_all()

    def _feed(self, sess: Session, task: Task) -> None:
        try:
            jobs = sess.track.feed(task.block) if task.op == P.PUSH else sess.track.feed_close()
        except UnbakeError as e:  # bad audio: this request fails, the session goes on
            with self.cond:
                if not sess.cancelled:
                    self.emit(task.identity, *_error(task.re, e))
            return
        except Exception as e:  # the session's state is unknown: end it
            with self.cond:
                if not sess.cancelled:
                    sess.tasks.append(task)
                    self._remove(sess, UnbakeError(f"session {sess.sid}: internal error: {e!r}"))
            return
        task.block = None
        now = time.monotonic()
        with self.cond:
            if sess.cancelled:
                return
            task.jobs_total = task.jobs_left = len(jobs)
            task.fed = True
            sess.tasks.append(task)
            sess.jobs.extend((job, task, now) for job in jobs)
        if not jobs:
            self._deliver(sess)

    def _pick_batch(self) -> list[tuple[Session, Job, Task]]:
        with self.cond:
            while True:
                order = [self.sessions[sid] for sid in self.ring
                         if self.sessions[sid].jobs and sid not in self.paused and not self.sessions[sid].busy]
                if not order:
                    return []
                key = order[0].jobs[0][0].key
                counts = {s.sid: 0 for s in order}
                picked: list[tuple[Session, int]] = []
                more = True
                while more and len(picked) < self.max_batch:
                    more = False
                    for s in order:  # one head job per session per round
                        i = counts[s.sid]
                        if len(picked) < self.max_batch and i < len(s.jobs) and s.jobs[i][0].key == key:
                            picked.append((s, i))
                            counts[s.sid] = i + 1
                            more = True
                if len(picked) < self.max_batch and self.max_queue_delay_s > 0 and not self.stopping:
                    oldest = min(s.jobs[i][2] for s, i in picked)
                    wait = oldest + self.max_queue_delay_s - time.monotonic()
                    if wait > 0:
                        if any(s.inbox for s in self.sessions.values()):
                            return []  # feed the new requests first: their segments may join
                        self.cond.wait(wait)
                        continue
                batch = []
                for s in order:
                    s.busy = s.busy or counts[s.sid] > 0
                    for _ in range(counts[s.sid]):
                        job, task, _ = s.jobs.popleft()
                        batch.append((s, job, task))
                self.ring.rotate(-(self.ring.index(order[0].sid) + 1))  # next batch starts after it
                return batch

    def _run(self, batch: list[tuple[Session, Job, Task]]) -> None:
        shape = (batch[0][1].key, len(batch))  # network, grid, window length; batch size
        if self.forward is None and self._last_shape is not None and shape != self._last_shape:
            # Tracks of other lengths (a short track's one segment, a long one's last) have
            # temporaries of other sizes: the holes the last pass left would not fit them, and the
            # heap would grow by a second working set (bench_sharing.py: daemon peak 653 -> 627 MB).
            release_free_memory()
        self._last_shape = shape
        try:
            run_jobs([job for _, job, _ in batch], self.forward)
        except Exception as e:  # e.g. out of memory: fail the sessions involved, keep serving
            err = e if isinstance(e, UnbakeError) else UnbakeError(f"forward pass failed: {e!r}")
            with self.cond:
                for sess in {id(s): s for s, _, _ in batch}.values():
                    if not sess.cancelled:
                        self._remove(sess, err)
            return
        with self.cond:
            self.batches += 1
            self.segments += len(batch)
        touched = {}
        for sess, _, task in batch:
            task.jobs_left -= 1
            touched[id(sess)] = sess
        for sess in touched.values():
            self._deliver(sess)

    def _deliver(self, sess: Session) -> None:
        """Send what became final for the session's oldest requests; finish those that are done."""
        while True:
            with self.cond:
                if sess.cancelled or not sess.tasks:
                    return
                task = sess.tasks[0]
            done = task.jobs_left == 0
            try:
                stems = sess.track.collect(final=done and task.op == P.CLOSE)
            except Exception as e:  # a typed error (non-finite stems: BadAudio) travels as it is
                reason = e if isinstance(e, UnbakeError) else UnbakeError(
                    f"session {sess.sid}: internal error: {e!r}")
                with self.cond:
                    if not sess.cancelled:
                        self._remove(sess, reason)
                return
            with self.cond:
                if sess.cancelled:
                    return
                self._send_stems(sess, task, stems)
                now = time.monotonic()
                if not done:
                    if now - task.t_progress >= PROGRESS_EVERY_S:
                        task.t_progress = now
                        finished = task.jobs_total - task.jobs_left
                        eta = (now - task.t0) / finished * task.jobs_left if finished else None
                        self.emit(task.identity, {"kind": P.K_PROGRESS, "re": task.re, "session": sess.sid,
                                                  "state": "running",
                                                  "percent": round(100.0 * finished / task.jobs_total, 1),
                                                  "eta_s": None if eta is None else round(eta, 2)}, [])
                    return
                sess.tasks.popleft()
                self.emit(task.identity, {"kind": P.K_DONE, "re": task.re, "session": sess.sid,
                                          "frames_in": sess.track.frames_in, "frames_out": sess.frames_out,
                                          "final": task.op == P.CLOSE}, [])
                if task.op == P.CLOSE:
                    self._remove(sess, None)
                    return

    def _send_stems(self, sess: Session, task: Task, stems: dict[str, np.ndarray]) -> None:
        names = list(stems)
        n = stems[names[0]].shape[-1]
        for a in range(0, n, MAX_REPLY_FRAMES):
            b = min(n, a + MAX_REPLY_FRAMES)
            self.emit(task.identity, {"kind": P.K_STEMS, "re": task.re, "session": sess.sid,
                                      "start": sess.frames_out + a, "frames": b - a,
                                      "channels": sess.track.channels, "stems": names},
                      [stems[s][:, a:b] for s in names])
        sess.frames_out += n


def _error(re: int, err: Exception) -> tuple[dict, list]:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    return {"kind": P.K_ERROR, "re": re, "code": getattr(err, "code", "E_INTERNAL"), "message": message}, []
