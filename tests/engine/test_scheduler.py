"""engine.scheduler in process, with real (small) networks: round-robin between sessions, dynamic
batching with a queue delay, cancel dropping queued segments at once; batched == alone."""
import threading
import time

import numpy as np
import torch
import pytest

from engine import protocol as P
from engine.scheduler import Scheduler
from engine.sessions import TrackSeparator, separate_array
from tests.engine.toy_models import ConvSeparator


class SlowConv(ConvSeparator):
    """A real conv separator whose forward pass also takes ``delay_s`` (a stand-in for a big net)."""

    def __init__(self, delay_s=0.0, **kw):
        super().__init__(**kw)
        self.delay_s = delay_s

    def forward(self, mix):
        time.sleep(self.delay_s)
        return super().forward(mix)


class Replies:
    def __init__(self):
        self.items, self.lock, self.event = [], threading.Lock(), threading.Event()

    def __call__(self, identity, header, pcm):
        with self.lock:
            self.items.append((identity, header, [np.array(p) for p in pcm]))
        self.event.set()

    def wait_for(self, pred, timeout_s=30.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if pred(self.items):
                    return
            self.event.wait(0.05)
            self.event.clear()
        raise TimeoutError(self.items[-3:])

    def terminal(self, re):
        return [h for _, h, _ in self.items if h["re"] == re and h["kind"] in P.TERMINAL]

    def stems(self, sid):
        parts = [(h, pcm) for _, h, pcm in self.items if h["kind"] == "stems" and h["session"] == sid]
        names = parts[0][0]["stems"]
        return {n: np.concatenate([pcm[i] for _, pcm in parts], axis=1) for i, n in enumerate(names)}


def _mix(frames, seed):
    return np.random.default_rng(seed).standard_normal((2, frames)).astype(np.float32)


def test_round_robin_lets_a_short_request_overtake_a_long_bounce():
    model = SlowConv(delay_s=0.002, segment_frames=1000, pad=4)
    replies = Replies()
    sched = Scheduler(replies, max_batch=1)
    try:
        with sched.cond:  # both queued before the worker looks
            sched.add("long", TrackSeparator(model, 8000, 2), "toy")
            sched.add("short", TrackSeparator(model, 8000, 2), "toy")
            sched.submit("long", b"a", 1, P.PUSH, _mix(200_000, 0))
            sched.submit("long", b"a", 2, P.CLOSE)
            sched.submit("short", b"b", 3, P.PUSH, _mix(2_000, 1))
            sched.submit("short", b"b", 4, P.CLOSE)
        replies.wait_for(lambda items: any(h["re"] == 2 and h["kind"] == "done" for _, h, _ in items))
        order = [h["re"] for _, h, _ in replies.items if h["kind"] == "done"]
        assert order.index(4) < order.index(1), order  # the short track finished first
        # and its output is what it would be alone
        want = separate_array(model, _mix(2_000, 1), 8000)
        got = replies.stems("short")
        assert float(np.abs(got["low"] - want["low"]).max()) <= 1e-6
    finally:
        sched.stop()


def test_dynamic_batching_packs_sessions_and_changes_nothing_but_speed():
    model = ConvSeparator(segment_frames=1000, pad=4)
    replies = Replies()
    sched = Scheduler(replies, max_batch=4, max_queue_delay_s=0.0)
    mixes = {f"s{i}": _mix(2_500, 10 + i) for i in range(4)}
    try:
        with sched.cond:
            for i, (sid, mix) in enumerate(mixes.items()):
                sched.add(sid, TrackSeparator(model, 8000, 2), "toy")
                sched.submit(sid, b"c", 10 * i + 1, P.PUSH, mix)
                sched.submit(sid, b"c", 10 * i + 2, P.CLOSE)
        replies.wait_for(lambda items: sum(h["kind"] == "done" and h.get("final") for _, h, _ in items) == 4)
        # 2,500 frames, segment 1,000, stride 750: 4 segments each, 16 in all, 4 per forward pass
        assert sched.segments == 16 and sched.batches == 4
        for sid, mix in mixes.items():
            want = separate_array(model, mix, 8000)
            got = replies.stems(sid)
            for name in want:
                assert float(np.abs(got[name] - want[name]).max()) <= 1e-5
    finally:
        sched.stop()


@pytest.mark.parametrize("delay_s,batches", [(0.0, 2), (0.5, 1)])
def test_queue_delay_waits_for_a_fuller_batch(delay_s, batches):
    model = ConvSeparator(segment_frames=1000, pad=4)
    replies = Replies()
    sched = Scheduler(replies, max_batch=2, max_queue_delay_s=delay_s)
    try:
        for i, sid in enumerate(["a", "b"]):
            sched.add(sid, TrackSeparator(model, 8000, 2), "toy")
        sched.submit("a", b"x", 1, P.PUSH, _mix(1_004, 0))  # exactly one full segment window
        time.sleep(0.1)
        sched.submit("b", b"y", 2, P.PUSH, _mix(1_004, 1))
        replies.wait_for(lambda items: len([h for _, h, _ in items if h["kind"] == "done"]) == 2)
        assert sched.segments == 2 and sched.batches == batches
    finally:
        sched.stop()


def test_cancel_drops_queued_segments_at_once():
    model = SlowConv(delay_s=0.01, segment_frames=1000, pad=4)
    replies = Replies()
    sched = Scheduler(replies, max_batch=1)
    try:
        sched.add("long", TrackSeparator(model, 8000, 2), "toy")
        sched.submit("long", b"a", 1, P.PUSH, _mix(400_000, 0))  # 533 segments, about 5 s of work
        replies.wait_for(lambda items: sched.segments >= 3)
        assert sched.queue_depth > 100
        assert sched.cancel("long")
        assert sched.queue_depth == 0
        [reply] = replies.terminal(1)
        assert reply["kind"] == "error" and reply["code"] == "E_CANCELLED"
        time.sleep(0.1)
        ran = sched.segments
        time.sleep(0.3)
        assert sched.segments == ran < 100  # nothing more ran for it
        with pytest.raises(Exception, match="not open"):
            sched.submit("long", b"a", 2, P.CLOSE)
    finally:
        sched.stop()


class NaNAfter(ConvSeparator):
    """A real conv separator whose output turns NaN where the input exceeds 0.5 (a model that
    overflows on loud input, as spleeter did before its masks were made overflow-free)."""

    def forward(self, mix):
        out = super().forward(mix)
        return torch.where((mix.abs() > 0.5)[:, None], torch.full_like(out, float("nan")), out)


def test_a_typed_error_of_a_session_reaches_its_client_with_its_code():
    """Non-finite stems are a BadAudio of that session (E_BAD_AUDIO with the session's message),
    not an 'internal error'; the scheduler keeps serving the other sessions."""
    replies = Replies()
    sched = Scheduler(replies, max_batch=1)
    loud = np.zeros((2, 3000), np.float32)
    loud[:, 2500] = 0.9
    try:
        with sched.cond:
            sched.add("loud", TrackSeparator(NaNAfter(segment_frames=1000, pad=4), 8000, 2), "toy")
            sched.add("fine", TrackSeparator(ConvSeparator(segment_frames=1000, pad=4), 8000, 2), "toy")
            sched.submit("loud", b"a", 1, P.PUSH, loud)
            sched.submit("loud", b"a", 2, P.CLOSE)
            sched.submit("fine", b"b", 3, P.PUSH, _mix(2_000, 1))
            sched.submit("fine", b"b", 4, P.CLOSE)
        replies.wait_for(lambda items: replies.terminal(2) and replies.terminal(4))
        (err,) = replies.terminal(2)
        assert err["kind"] == "error" and err["code"] == "E_BAD_AUDIO", err
        assert "NaN or Inf" in err["message"] and "internal" not in err["message"], err
        assert replies.terminal(4)[0]["kind"] == "done"
    finally:
        sched.stop()


def test_workers_run_sessions_at_once_and_each_session_in_grid_order():
    """workers=2 with a forward elsewhere (as ``serve --ray``): batches of two sessions are in flight at
    the same time, never two of one session; every output equals the session alone."""
    model = SlowConv(segment_frames=1000, pad=4)
    lock = threading.Lock()
    flight: dict[int, int] = {}  # id(runner's track) -> batches in flight
    most = [0, 0]  # most batches in flight at once: overall, of one session

    def forward(runner, windows):
        with lock:
            flight[id(runner)] = flight.get(id(runner), 0) + 1
            most[0] = max(most[0], sum(flight.values()))
            most[1] = max(most[1], flight[id(runner)])
        time.sleep(0.01)
        try:
            return runner.forward(windows)
        finally:
            with lock:
                flight[id(runner)] -= 1

    replies = Replies()
    sched = Scheduler(replies, max_batch=1, forward=forward, workers=2)
    try:
        mixes = {f"s{i}": _mix(20_000 + 3_000 * i, i) for i in range(3)}
        with sched.cond:
            for i, (sid, mix) in enumerate(mixes.items()):
                sched.add(sid, TrackSeparator(model, 8000, 2), "toy")
                sched.submit(sid, b"x", 2 * i + 1, P.PUSH, mix)
                sched.submit(sid, b"x", 2 * i + 2, P.CLOSE)
        replies.wait_for(lambda items: sum(h["kind"] == "done" and h.get("final") for _, h, _ in items) == 3)
        assert most == [2, 1], most
        for sid, mix in mixes.items():
            want = separate_array(model, mix, 8000)
            got = replies.stems(sid)
            assert got["low"].shape == want["low"].shape
            assert float(np.abs(got["low"] - want["low"]).max()) == 0.0
    finally:
        sched.stop()
