"""Bad input on the wire: thousands of random and malformed messages, each answered with an error
(or dropped where the peer cannot be answered); the daemon's memory stays bounded and a valid
request right after still succeeds.

``open`` draws its model name, sample rate and options (overlap, segment_s, ...) from the whole space
the protocol allows and beyond it (issue 12): any name of the model-name character set, catalog and
preset names, paths and globs; any rate in [1000, 768000] Hz (coprime ones such as 7,919 and 767,999
Hz cost the resampler a few MB, engine.audio.ratio_terms) and rates outside; any overlap in [0, 1)
and outside. A session that opens gets a little audio at its rate and is cancelled. Every error
names the request (``re``) whenever its id is readable."""
import math
import time

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine import protocol as P
from tests.engine.engine_proc import EngineProcess, Peer, proc_rss_mb

pytestmark = pytest.mark.slow

ERROR_CODES = {"E_PROTOCOL", "E_LIMIT", "E_BAD_REQUEST", "E_BAD_AUDIO", "E_UNKNOWN_SESSION", "E_UNKNOWN_MODEL",
               "E_QUEUE_FULL", "E_WEIGHTS_MISSING", "E_MODEL"}
TTL_S = 3  # the fuzz engine's --session-ttl-s
KEEP_FRAMES = 4410  # 0.1 s every 0.5 s: audio keeps a session (protocol.SESSION_TTL_S_PER_AUDIO_S), 1 frame would not
RSS_GROWTH_LIMIT_MB = 300


def readable_id(frames: list) -> int | None:
    """The request id the daemon can read in a message (a msgpack map within the header limit), else None."""
    if not frames or len(frames[0]) > P.Limits().max_header_bytes:
        return None
    try:
        header = msgpack.unpackb(bytes(frames[0]), raw=False, strict_map_key=True, use_list=True)
    except Exception:
        return None
    return P.request_id(header) if isinstance(header, dict) else None


@pytest.fixture(scope="module")
def engine(spleeter_repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with EngineProcess(f"ipc://{tmp}/e.sock", "--preload", "spleeter-2stems", "--session-ttl-s", str(TTL_S),
                       env={"UNBAKE_REPO": str(spleeter_repo)}, log=tmp / "daemon.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def peer(engine):
    with Peer(engine.endpoint) as p:
        yield p


def _open(peer) -> str:
    ready = peer.call(P.OPEN, sample_rate=44100, channels=2, model="spleeter-2stems", options={"segment_s": 1.0})
    assert ready["kind"] == "ready", ready
    return ready["session"]


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), c, max_size=4)),
                      max_leaves=8)
ops = st.one_of(st.sampled_from(P.OPS), st.text(max_size=10), values)
sizes = st.one_of(st.integers(-3, 5000), st.sampled_from([0, 1, 2, 44100, 2 ** 31, 2 ** 40, 2 ** 63 - 1]), values)
LIMITS = P.Limits()
# the whole range the protocol allows, its edges, the rates that once cost gigabytes, and beyond
rates = st.one_of(st.integers(LIMITS.min_sample_rate, LIMITS.max_sample_rate),
                  st.sampled_from([1000, 7919, 44056, 44078, 44100, 48000, 749320, 767999, 768000]),
                  st.sampled_from([-1, 0, 999, 768001, 2 ** 31, 2 ** 63 - 1]), sizes)
model_names = st.one_of(
    st.from_regex(P._MODEL_NAME, fullmatch=True) if hasattr(P, "_MODEL_NAME") else st.text(max_size=64),
    st.sampled_from(["spleeter-2stems", "spleeter-2stems", "fast", "default", "htdemucs", "no-such-model",
                     "../../etc/passwd", "/etc/passwd", "*", "spleeter-*", "a" * 65, "", ".hidden", "-x",
                     "spl\0eeter", "modèle"]),
    st.text(max_size=80), values)
overlaps = st.one_of(st.floats(0, 1, exclude_max=True), st.sampled_from([0.0, 0.5, 0.95, 0.9500001, 0.999999]),
                     st.floats(allow_nan=True, allow_infinity=True), values)
option_maps = st.fixed_dictionaries({}, optional={
    "overlap": overlaps, "segment_s": st.one_of(st.floats(0, 40), st.sampled_from([0.02, 0.5, 1.0, 3600.0]), values),
    "shifts": st.one_of(st.integers(0, 3), values), "two_stems": st.one_of(st.sampled_from(["vocals", "x"]), values),
    "bogus": values})


@st.composite
def messages(draw, session: str):
    """(frames, id the daemon can read or None) of one malformed (or, rarely, valid) request."""
    kind = draw(st.sampled_from(["bytes", "object", "header", "push", "open", "open", "open_in_range", "gone"]))
    rid = draw(st.one_of(st.integers(0, 2 ** 40), values))
    if kind == "bytes":
        return [draw(st.binary(max_size=200)) for _ in range(draw(st.integers(1, 3)))]
    if kind == "object":
        return [msgpack.packb(draw(values), use_bin_type=True)]
    header = {"v": draw(st.one_of(st.just(1), st.just(1), st.just(1), values)), "op": draw(ops), "id": rid}
    if kind == "header":
        header.update(draw(st.dictionaries(st.sampled_from(
            ["session", "channels", "frames", "sample_rate", "model", "options", "dtype"]), values, max_size=4)))
        return [msgpack.packb(header, use_bin_type=True)] + [draw(st.binary(max_size=64))
                                                              for _ in range(draw(st.integers(0, 2)))]
    if kind == "gone":  # a session that does not exist (or no longer: made-up ids)
        header.update(op=draw(st.sampled_from(["close", "cancel"])),
                      session=draw(st.sampled_from(["nope", "", "0" * 16, session[::-1]])))
        return [msgpack.packb(header, use_bin_type=True)]
    if kind == "open_in_range":  # well-formed: the model, rate and overlap drawn from what the protocol allows
        header.update(v=1, id=draw(st.integers(0, 2 ** 40)), op="open", channels=draw(st.sampled_from([1, 2])),
                      sample_rate=draw(st.one_of(st.integers(LIMITS.min_sample_rate, LIMITS.max_sample_rate),
                                                 st.sampled_from([7919, 44056, 767999, 768000, 1000]))),
                      model=draw(st.one_of(st.sampled_from(["spleeter-2stems", "fast"]), model_names)),
                      options=draw(st.fixed_dictionaries({"overlap": st.floats(0, 0.99)}, optional={
                          "segment_s": st.floats(0.01, 40)})))
        return [msgpack.packb(header, use_bin_type=True)]
    if kind == "open":
        header.update(op="open", sample_rate=draw(rates),
                      channels=draw(st.one_of(st.sampled_from([1, 2, 2]), sizes)), model=draw(model_names),
                      options=draw(st.one_of(option_maps, option_maps, values)))
        if draw(st.booleans()):  # mostly well-formed apart from the drawn fields
            header["v"], header["id"] = 1, draw(st.integers(0, 2 ** 40))
        return [msgpack.packb(header, use_bin_type=True)]
    # push: to the real session or a made-up one, with wrong sizes, NaN/Inf, truncated frames
    channels, frames = draw(st.sampled_from([(2, 64), (1, 64), (0, 64), (2, 0), (2, 2 ** 40), (3, 10)]))
    header.update(op="push", session=draw(st.sampled_from([session, "nope", ""])), channels=channels,
                  frames=frames)
    payload = np.zeros((2, 64), np.float32)
    poison = draw(st.sampled_from([None, math.nan, math.inf, -math.inf]))
    if poison is not None:
        payload[draw(st.integers(0, 1)), draw(st.integers(0, 63))] = poison
    raw = payload.tobytes()[:draw(st.sampled_from([512, 511, 100, 0]))]
    pcm = [raw] * draw(st.integers(0, 3))
    return [msgpack.packb(header, use_bin_type=True), *pcm]


def test_malformed_messages_get_error_replies_and_memory_stays_bounded(engine, peer):
    session = _open(peer)
    # warm: a valid push through the real session first, so the baseline holds the working set
    ok = peer.replies(peer.request(P.PUSH, [np.zeros((2, 44100), np.float32)], session=session, channels=2,
                                   frames=44100))
    assert ok[-1][0]["kind"] == "done"
    rss0 = proc_rss_mb(engine.proc.pid)
    seen = {"errors": 0, "other": 0, "opened": 0, "reopened": 0}
    codes = set()
    touched = [time.monotonic()]  # when the real session was last pushed to
    real = [session]  # the real session (another one only if this one expired after a whole TTL)

    @settings(max_examples=2000, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large])
    @given(st.data())
    def one(data):
        if time.monotonic() - touched[0] > 0.5:  # keep the real session well within its 3 s TTL
            gap = time.monotonic() - touched[0]
            kept = peer.replies(peer.request(P.PUSH, [np.zeros((2, KEEP_FRAMES), np.float32)], session=real[0],
                                             channels=2, frames=KEEP_FRAMES))
            if kept[-1][0].get("code") == "E_UNKNOWN_SESSION" and gap >= TTL_S:
                # The machine stalled this test for a whole TTL (seen once under CI load): the engine was
                # right to free the session. Open another; an expiry before the TTL still fails below.
                real[0] = _open(peer)
                seen["reopened"] += 1
            else:
                assert kept[-1][0]["kind"] == "done", (gap, kept, engine.log_text()[-3000:])
            touched[0] = time.monotonic()
        frames = data.draw(messages(real[0]))
        peer.send(frames)
        while True:  # exactly one terminal reply per message (progress keep-alives may come first)
            header, _ = peer.recv(timeout_s=15)
            if header["kind"] in P.TERMINAL:
                break
        assert header["re"] == readable_id(frames), (header, frames[0][:200])
        if header["kind"] == "ready":  # a drawn open that is valid: a little audio at its rate, then gone
            seen["opened"] += 1
            rate, ch = header["sample_rate"], header["channels"]
            n = max(1, rate // 20)
            got = peer.replies(peer.request(P.PUSH, [np.full((ch, n), 0.01, np.float32)], session=header["session"],
                                            channels=ch, frames=n))
            assert got[-1][0]["kind"] == "done", got[-1][0]
            assert peer.call(P.CANCEL, session=header["session"])["kind"] == "done"
        if header["kind"] == "error":
            seen["errors"] += 1
            codes.add(header["code"])
            assert header["code"] in ERROR_CODES, header
            assert header["message"] and "\n" not in header["message"]
        else:
            seen["other"] += 1

    one()
    assert seen["errors"] + seen["other"] >= 2000
    assert seen["errors"] >= 1800, seen
    assert {"E_PROTOCOL", "E_LIMIT", "E_BAD_AUDIO", "E_UNKNOWN_SESSION", "E_BAD_REQUEST"} <= codes, codes
    assert seen["opened"] >= 5, seen  # valid opens at drawn rates and options did happen
    assert seen["reopened"] <= 2, seen  # a stall of a whole TTL is rare; more says the engine frees early
    assert engine.proc.poll() is None, "the daemon died"
    rss1 = proc_rss_mb(engine.proc.pid)
    peak = engine.status()["peak_rss_mb"]
    print(seen, codes, f"RSS {rss0:.0f} -> {rss1:.0f} MB, peak {peak:.0f} MB")
    assert rss1 - rss0 < RSS_GROWTH_LIMIT_MB, (rss0, rss1)
    assert peak - rss0 < RSS_GROWTH_LIMIT_MB + 200, (rss0, peak)

    # a valid request right after still succeeds, with exact output length
    session2 = _open(peer)
    x = np.random.default_rng(0).standard_normal((2, 30000)).astype(np.float32) * 0.1
    got = peer.replies(peer.request(P.PUSH, [x], session=session2, channels=2, frames=30000))
    got += peer.replies(peer.request(P.CLOSE, session=session2))
    frames = sum(h["frames"] for h, _ in got if h["kind"] == "stems")
    assert frames == 30000 and got[-1][0]["kind"] == "done" and got[-1][0]["final"]


def test_oversized_frame_drops_that_peer_and_others_are_served(engine):
    limit = P.Limits().max_message_bytes
    with Peer(engine.endpoint) as bad:
        bad.send([P.pack({"v": 1, "op": "hello", "id": 1}), b"\0" * (limit + 8)])
        with pytest.raises(TimeoutError):  # ZMQ_MAXMSGSIZE: the connection is dropped unread
            bad.recv(timeout_s=2)
    with Peer(engine.endpoint) as good:
        assert good.call(P.HELLO, timeout_s=10)["kind"] == "hello"


def test_error_replies_name_the_request(engine, peer):
    err = peer.call(P.PUSH, [np.zeros((2, 10), np.float32)], session="nope", channels=2, frames=10)
    assert err["code"] == "E_UNKNOWN_SESSION" and "nope" in err["message"]
    session = _open(peer)
    bad = np.zeros((2, 100), np.float32)
    bad[1, 57] = np.nan
    err = peer.call(P.PUSH, [bad], session=session, channels=2, frames=100)
    assert err["code"] == "E_BAD_AUDIO" and "frame 57" in err["message"]
    err = peer.call(P.PUSH, [np.zeros((2, 10), np.float32)], session=session, channels=2, frames=2 ** 30)
    assert err["code"] == "E_LIMIT"
    err = peer.call(P.OPEN, sample_rate=44100, channels=2, model="no-such-model")
    assert err["code"] == "E_UNKNOWN_MODEL" and "no-such-model" in err["message"]
    err = peer.call(P.OPEN, sample_rate=44100, channels=2, model="spleeter-2stems", options={"segment_s": -1.0})
    assert err["code"] == "E_BAD_REQUEST" and "segment_s" in err["message"]
    # the session is still usable after its bad pushes
    ok = peer.replies(peer.request(P.PUSH, [np.zeros((2, 100), np.float32)], session=session, channels=2,
                                   frames=100))
    assert ok[-1][0]["kind"] == "done" and ok[-1][0]["frames_in"] == 100
