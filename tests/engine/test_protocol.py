"""The wire protocol (engine.protocol), without a daemon: property-based round trips and malformed
input, plus the torch-free client (plugin_bridge.client) against a scripted in-process peer that
speaks the protocol (no engine, no model): routing of replies, typed errors, timeouts, Lazy Pirate,
pipelining, and StemStream's delay line."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from engine import errors, protocol
from engine.errors import BadAudio, BadRequest, LimitExceeded, ProtocolError

LIMITS = protocol.Limits()
TYPED = (ProtocolError, LimitExceeded, BadRequest, BadAudio)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def validate(frames: list, limits: protocol.Limits = LIMITS) -> tuple[dict, np.ndarray | None]:
    """What the daemon does with a message before it allocates anything: header, schema, PCM."""
    header = protocol.unpack_header(frames[0], limits)
    req = protocol.check_request(header, len(frames) - 1, limits)
    pcm = None
    if req["op"] == protocol.PUSH:
        pcm = protocol.pcm_array(frames[1], req["channels"], req["frames"], where=f"push #{req['id']}")
    return req, pcm


def rejected(frames: list, limits: protocol.Limits = LIMITS) -> Exception | None:
    """None if the message is accepted, else its typed error (any other exception fails the test)."""
    try:
        validate(frames, limits)
    except TYPED as e:
        message = str(e)
        assert message and "\n" not in message, repr(message)
        assert e.code.startswith("E_")
        return e
    return None


def code_of(frames: list, limits: protocol.Limits = LIMITS) -> str | None:
    err = rejected(frames, limits)
    return None if err is None else err.code


# -- strategies ---------------------------------------------------------------------------------------

@st.composite
def pcm_blocks(draw, max_frames: int = 5000) -> np.ndarray:
    """float32 [channels, frames]: random finite bit patterns (subnormals, -0.0, extremes) plus
    hypothesis-drawn special values at drawn places."""
    channels = draw(st.integers(1, 2))
    frames = draw(st.integers(1, max_frames))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    bits = rng.integers(0, 2 ** 32, size=(channels, frames), dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).copy()
    x[~np.isfinite(x)] = -0.0
    specials = draw(st.lists(st.tuples(st.integers(0, channels - 1), st.integers(0, frames - 1),
                                       st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45,
                                                        3.4028235e38, -3.4028235e38, 1.1754944e-38])),
                             max_size=8))
    for c, f, v in specials:
        x[c, f] = v
    return x


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


option_values = st.fixed_dictionaries({}, optional={
    "segment_s": st.floats(0.5, 3600), "overlap": st.floats(0, protocol.MAX_OVERLAP), "shifts": st.integers(0, 20),
    "seed": st.integers(0, 2 ** 63 - 1), "two_stems": st.sampled_from(["vocals", "drums"]),
    "transition_power": st.one_of(st.integers(1, 16), st.floats(1, 16)),
})
ids = st.integers(0, protocol.MAX_ID)
# open.repo: absolute paths of any characters but NUL, up to the limit
repo_paths = st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                     max_size=protocol.MAX_REPO_PATH_CHARS - 1).map(lambda t: "/" + t)
session_ids = st.text(min_size=1, max_size=64)
# open.model: every name the protocol allows (protocol.MODEL_NAME_RULE)...
NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+-"
model_names = st.tuples(st.sampled_from(NAME_CHARS[:62]), st.text(alphabet=NAME_CHARS, max_size=63)).map(
    "".join).filter(lambda n: ".." not in n)
# ...and beyond: any text (paths, globs, NUL, non-ASCII, control characters), long ones, and the
# attacks a hostile peer sends
hostile_names = st.sampled_from(["../../etc/passwd", "/root/secret", "*", "x/../../y", "a\0b", "n" * 10_000,
                                 "..", ".", "", "a..b", "~root", "htdemucs/../x", "[a-z]*", "?", "-rf",
                                 ".hidden", "a\nb", "a b", "htdemucs\n", "c:\\x", "\u00e9t\u00e9"])
any_names = st.one_of(model_names, hostile_names, st.text(max_size=80), st.text(min_size=60, max_size=300),
                      st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+/*?\[\]\\-]{0,70}", fullmatch=True))


@st.composite
def requests(draw) -> tuple[str, list]:
    """A valid request of any op, as ``protocol.request`` builds it."""
    op = draw(st.sampled_from(protocol.OPS))
    rid = draw(ids)
    if op == protocol.HELLO:
        return op, protocol.request(op, rid, **draw(st.fixed_dictionaries({}, optional={"client": st.text()})))
    if op in (protocol.STATUS, protocol.MODELS):
        return op, protocol.request(op, rid)
    if op == protocol.OPEN:
        fields = {"sample_rate": draw(st.integers(LIMITS.min_sample_rate, LIMITS.max_sample_rate)),
                  "channels": draw(st.integers(1, 2)), "options": draw(option_values)}
        model = draw(st.none() | model_names)
        if model is not None:
            fields["model"] = model
        repo = draw(st.none() | repo_paths)
        if repo is not None:
            fields["repo"] = repo
        return op, protocol.request(op, rid, **fields)
    session = draw(session_ids)
    if op == protocol.PUSH:
        block = draw(pcm_blocks(max_frames=300))
        return op, protocol.request(op, rid, [block], session=session, channels=block.shape[0],
                                    frames=block.shape[1])
    return op, protocol.request(op, rid, session=session)


def as_bytes(frames: list) -> list[bytes]:
    return [bytes(f) for f in frames]


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20)


# -- round trips --------------------------------------------------------------------------------------

@given(pcm_blocks(), ids, session_ids)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_push_roundtrip_is_bit_exact(block, rid, session):
    channels, frames = block.shape
    wire = as_bytes(protocol.request(protocol.PUSH, rid, [block], session=session, channels=channels,
                                     frames=frames))
    assert len(wire) == 2 and len(wire[1]) == 4 * channels * frames
    req, pcm = validate(wire)
    assert req == {"op": "push", "id": rid, "session": session, "channels": channels, "frames": frames}
    assert pcm.dtype == np.float32 and pcm.shape == (channels, frames)
    np.testing.assert_array_equal(bits(pcm), bits(block))  # -0.0 and subnormals included
    # the PCM frame is little-endian float32 in C order [channels, frames], whatever the array's layout
    assert wire[1] == block.astype("<f4").tobytes(order="C")
    assert bytes(protocol.pcm_frame(np.asfortranarray(block))) == wire[1]
    assert bytes(protocol.pcm_frame(block.astype(">f4"))) == wire[1]


@given(requests())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_check_request_accepts_every_request_the_client_builds(op_wire):
    op, wire = op_wire
    req, pcm = validate(as_bytes(wire))
    assert req["op"] == op
    assert (pcm is not None) == (op == protocol.PUSH)


@given(st.one_of(repo_paths, st.text(max_size=50), st.text(min_size=protocol.MAX_REPO_PATH_CHARS - 2,
                                                          max_size=protocol.MAX_REPO_PATH_CHARS + 2).map(lambda t: "/" + t),
                 repo_paths.flatmap(lambda p: st.integers(0, len(p)).map(lambda i: p[:i] + "\0" + p[i:]))))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@example("/")
@example("relative")
@example("/" + "x" * (protocol.MAX_REPO_PATH_CHARS - 1))
@example("/" + "x" * protocol.MAX_REPO_PATH_CHARS)
def test_open_repo_is_an_absolute_path_without_nul_within_the_limit(repo):
    """open.repo: accepted exactly when absolute, 1..MAX_REPO_PATH_CHARS characters, no NUL; carried
    through as it is; anything else is E_BAD_REQUEST (a header that still fits the header limit)."""
    header = {"v": 1, "op": "open", "id": 9, "sample_rate": 44100, "channels": 2, "repo": repo}
    ok = repo.startswith("/") and 0 < len(repo) <= protocol.MAX_REPO_PATH_CHARS and "\0" not in repo
    err = rejected([protocol.pack(header)])
    if ok:
        assert err is None, err
        req, _ = validate([protocol.pack(header)])
        assert req["repo"] == repo
    else:
        assert err is not None and err.code == "E_BAD_REQUEST", (repo[:80], err)


def test_open_without_repo_carries_none():
    req, _ = validate([protocol.pack({"v": 1, "op": "open", "id": 1, "sample_rate": 44100, "channels": 1})])
    assert req["repo"] is None and protocol.REPO_FIELD == "repo"


@given(pcm_blocks(max_frames=2000), st.integers(0, 2 ** 40), st.integers(0, protocol.MAX_ID))
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_stems_reply_roundtrip(block, start, re):
    stems = [block, -block, block * 0.5]
    names = ["vocals", "drums", "other"]
    wire = as_bytes(protocol.reply(protocol.K_STEMS, re, stems, session="s1", start=start,
                                   frames=block.shape[1], channels=block.shape[0], stems=names))
    header = protocol.check_reply(protocol.unpack_header(wire[0], LIMITS))
    assert (header["kind"], header["re"], header["start"]) == ("stems", re, start)
    back = protocol.reply_pcm(header, wire[1:])
    assert len(back) == 3
    for got, want in zip(back, stems):
        assert got.flags.writeable and got.dtype == np.float32
        np.testing.assert_array_equal(bits(got), bits(want))
    with pytest.raises(ProtocolError):
        protocol.reply_pcm(header, wire[1:-1])  # a frame missing
    with pytest.raises(ProtocolError):
        protocol.reply_pcm(header, [wire[1][:-4], *wire[2:]])  # a frame too short


def test_empty_stems_block_roundtrip():
    empty = np.zeros((2, 0), np.float32)
    wire = as_bytes(protocol.reply(protocol.K_STEMS, 1, [empty, empty], session="s", start=0, frames=0,
                                   channels=2, stems=["a", "b"]))
    back = protocol.reply_pcm(protocol.unpack_header(wire[0], LIMITS), wire[1:])
    assert [b.shape for b in back] == [(2, 0), (2, 0)]


@given(st.sampled_from(sorted(errors.BY_CODE)), st.text(max_size=2000), st.none() | ids)
def test_error_reply_roundtrip_keeps_class_and_code(code, message, re):
    err = errors.BY_CODE[code](message)
    wire = as_bytes(protocol.error_reply(re, err))
    header = protocol.check_reply(protocol.unpack_header(wire[0], LIMITS))
    assert (header["kind"], header["re"], header["code"]) == ("error", re, code)
    assert "\n" not in header["message"] and len(header["message"]) <= 1000
    back = errors.from_code(header["code"], header["message"])
    assert type(back) is type(err) and back.code == code
    assert isinstance(errors.from_code("E_NOT_A_CODE", "x"), errors.UnbakeError)


@pytest.mark.parametrize("kind", sorted(protocol.TERMINAL | {protocol.K_PROGRESS, protocol.K_STEMS}))
def test_check_reply_accepts_every_kind_and_rejects_others(kind):
    assert protocol.check_reply(protocol.unpack_header(protocol.reply(kind, 1)[0], LIMITS))["kind"] == kind
    for bad in ({"v": 1, "kind": "nope", "re": 1}, {"v": 2, "kind": kind, "re": 1}, {"kind": kind}):
        with pytest.raises(ProtocolError):
            protocol.check_reply(bad)


# -- malformed input: always a typed error with a one-line message -----------------------------------

@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
@example([b""])
@example([b"\x91" * 60000 + b"\xc0"])     # deeply nested
@example([b"\xdd\xff\xff\xff\xff"])         # an array declaring 2**32 - 1 items
@example([b"\xc6\xff\xff\xff\xff"])         # a bin declaring 4 GiB
@example([b"\x81\x01\x02"])                  # an int key
@settings(max_examples=500)
def test_random_bytes_are_rejected_with_a_typed_error(frames):
    assert rejected(frames) is not None


@given(msgpack_values, st.lists(st.binary(max_size=64), max_size=2))
@settings(max_examples=500)
def test_random_msgpack_headers_are_rejected_or_valid(value, pcm):
    rejected([msgpack.packb(value, use_bin_type=True), *pcm])


@given(requests(), st.data())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_any_field_of_any_type_is_rejected_or_valid(op_wire, data):
    """Replace or drop one field of a valid request (or one option) by anything msgpack can carry."""
    op, wire = op_wire
    wire = as_bytes(wire)
    header = msgpack.unpackb(wire[0], raw=False)
    key = data.draw(st.sampled_from(sorted(header) + ["repo", "options.segment_s", "options.overlap",
                                                      "options.shifts", "options.seed",
                                                      "options.two_stems", "options.nope"]))
    value = data.draw(msgpack_values | st.just("<drop>"))
    target = header
    if key.startswith("options."):
        target = header.setdefault("options", {})
        if not isinstance(target, dict):
            return
        key = key.split(".", 1)[1]
    if value == "<drop>":
        target.pop(key, None)
    else:
        target[key] = value
    rejected([msgpack.packb(header, use_bin_type=True), *wire[1:]])


@pytest.mark.parametrize("field", ["v", "op", "id", "model", "sample_rate", "channels", "options",
                                   "session", "frames", "repo"])
@pytest.mark.parametrize("value", [None, True, 1.5, -1, "x", b"x", [1], {"a": 1}, 2 ** 64 - 1])
def test_wrong_types_for_every_field(field, value):
    op = {"model": "open", "sample_rate": "open", "options": "open", "repo": "open"}.get(field, "push")
    header = {"v": 1, "op": op, "id": 7}
    if op == "open":
        header.update(sample_rate=44100, channels=2, model="htdemucs", options={})
    else:
        header.update(session="s", channels=1, frames=4)
    header[field] = value
    pcm = [np.zeros(4, "<f4").tobytes()] if op == "push" else []
    code = code_of([protocol.pack(header), *pcm])
    if field == "options" and value in (None, {}):
        assert code is None
    elif field in ("model", "repo") and value is None or field in ("session", "model") and value == "x":
        assert code is None
    elif field == "repo" and value == "x":
        assert code == "E_BAD_REQUEST"  # a relative path
    elif field == "options" and value == {"a": 1}:
        assert code == "E_BAD_REQUEST"  # unknown option
    elif field in ("channels", "frames", "sample_rate") and isinstance(value, int) and not isinstance(value, bool):
        assert code in ("E_BAD_AUDIO", "E_BAD_REQUEST", "E_LIMIT")  # the right type, out of range
    elif field == "id" and value == 2 ** 64 - 1:
        assert code == "E_PROTOCOL"
    elif field == "v" and value is True:
        pass  # True == 1 in Python: accepted as version 1 (harmless)
    else:
        assert code == "E_PROTOCOL", (field, value, code)


@given(st.integers(1, 2), st.integers(1, 2 ** 62))
def test_huge_declared_sizes_are_refused_before_allocation(channels, frames):
    assume(channels * frames > LIMITS.max_chunk_samples)
    header = {"v": 1, "op": "push", "id": 1, "session": "s", "channels": channels, "frames": frames}
    err = rejected([protocol.pack(header), b"\0" * 16])
    assert err.code == "E_LIMIT" and "push smaller chunks" in str(err)


def test_specific_codes():
    push = {"v": 1, "op": "push", "id": 3, "session": "s", "channels": 2, "frames": 4}
    pcm = np.zeros((2, 4), "<f4").tobytes()
    assert code_of([protocol.pack(push), pcm]) is None
    assert code_of([protocol.pack({**push, "v": 2}), pcm]) == "E_PROTOCOL"
    assert "version 2" in str(rejected([protocol.pack({**push, "v": 2}), pcm]))
    assert code_of([protocol.pack({k: v for k, v in push.items() if k != "v"}), pcm]) == "E_PROTOCOL"
    assert code_of([protocol.pack({**push, "op": "explode"}), pcm]) == "E_PROTOCOL"
    assert code_of([protocol.pack({**push, "id": -1}), pcm]) == "E_PROTOCOL"
    assert code_of([protocol.pack({**push, "channels": 0}), b""]) == "E_BAD_AUDIO"
    assert code_of([protocol.pack({**push, "channels": 3, "frames": 1}), b"\0" * 12]) == "E_BAD_AUDIO"
    assert code_of([protocol.pack({**push, "frames": 0}), b""]) == "E_BAD_AUDIO"
    assert code_of([protocol.pack({**push, "dtype": "<f8"}), pcm]) == "E_PROTOCOL"
    assert code_of([protocol.pack(push)]) == "E_PROTOCOL"                  # PCM frame missing
    assert code_of([protocol.pack(push), pcm, pcm]) == "E_LIMIT"           # one PCM frame too many
    assert code_of([protocol.pack(push), pcm[:-4]]) == "E_LIMIT"           # bytes != header's sizes
    assert code_of([protocol.pack(push), pcm + b"\0" * 4]) == "E_LIMIT"
    assert code_of([protocol.pack({"v": 1, "op": "hello", "id": 1}), pcm]) == "E_PROTOCOL"
    assert code_of([b"\x80" * (LIMITS.max_header_bytes + 1)]) == "E_LIMIT"  # header too large
    assert code_of([msgpack.packb([1, 2, 3])]) == "E_PROTOCOL"              # not a map
    opn = {"v": 1, "op": "open", "id": 4, "sample_rate": 44100, "channels": 2}
    assert code_of([protocol.pack(opn)]) is None
    assert code_of([protocol.pack({**opn, "channels": 0})]) == "E_BAD_AUDIO"
    assert code_of([protocol.pack({**opn, "sample_rate": 10})]) == "E_BAD_REQUEST"
    assert code_of([protocol.pack({**opn, "sample_rate": 10 ** 7})]) == "E_BAD_REQUEST"
    assert code_of([protocol.pack({**opn, "model": ""})]) == "E_BAD_REQUEST"
    assert code_of([protocol.pack({**opn, "model": "m" * 201})]) == "E_BAD_REQUEST"
    assert code_of([protocol.pack({k: v for k, v in opn.items() if k != "sample_rate"})]) == "E_PROTOCOL"
    for options, code in [({"segment_s": 0}, "E_BAD_REQUEST"), ({"segment_s": math.inf}, "E_BAD_REQUEST"),
                          ({"overlap": 1.0}, "E_BAD_REQUEST"), ({"overlap": math.nan}, "E_BAD_REQUEST"),
                          ({"shifts": 21}, "E_BAD_REQUEST"), ({"shifts": 1.0}, "E_PROTOCOL"),
                          ({"seed": True}, "E_PROTOCOL"), ({"two_stems": ""}, "E_BAD_REQUEST"),
                          ({"transition_power": 0.5}, "E_BAD_REQUEST"), ({"batch": 4}, "E_BAD_REQUEST"),
                          ({"segment_s": None, "shifts": 2}, None)]:
        assert code_of([protocol.pack({**opn, "options": options})]) == code, options
    for op in ("close", "cancel"):
        assert code_of([protocol.pack({"v": 1, "op": op, "id": 5, "session": "s"})]) is None
        assert code_of([protocol.pack({"v": 1, "op": op, "id": 5, "session": ""})]) == "E_PROTOCOL"
        assert code_of([protocol.pack({"v": 1, "op": op, "id": 5, "session": "s" * 65})]) == "E_PROTOCOL"
        assert code_of([protocol.pack({"v": 1, "op": op, "id": 5})]) == "E_PROTOCOL"


@given(pcm_blocks(max_frames=3000), st.data(), st.sampled_from([math.nan, math.inf, -math.inf]),
       st.none() | st.integers(8000, 192000))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_nan_and_inf_are_bad_audio_naming_the_frame(block, data, bad, sample_rate):
    channels, frames = block.shape
    c, f = data.draw(st.integers(0, channels - 1)), data.draw(st.integers(0, frames - 1))
    block[c, f] = bad
    first = data.draw(st.integers(0, 10 ** 9))
    with pytest.raises(BadAudio) as info:
        protocol.pcm_array(bytes(protocol.pcm_frame(block)), channels, frames, "push #1", first, sample_rate)
    assert info.value.code == "E_BAD_AUDIO"
    assert f"frame {first + f}" in str(info.value) and "\n" not in str(info.value)
    wire = as_bytes(protocol.request(protocol.PUSH, 1, [block], session="s", channels=channels, frames=frames))
    assert code_of(wire) == "E_BAD_AUDIO"


def test_nan_names_the_earliest_bad_frame_across_channels():
    block = np.zeros((2, 10), np.float32)
    block[0, 7] = math.inf
    block[1, 2] = math.nan
    with pytest.raises(BadAudio, match="frame 2"):
        protocol.pcm_array(bytes(protocol.pcm_frame(block)), 2, 10)


@given(model_names)
@example("a" * protocol.MAX_MODEL_NAME_CHARS)
@example("htdemucs_6s")
@example("spleeter-2stems")
@example("9.5+x_y-z")
def test_every_name_of_the_rule_is_accepted(name):
    assert protocol.check_model_name(name) == name
    opn = {"v": 1, "op": "open", "id": 4, "sample_rate": 44100, "channels": 2, "model": name}
    assert code_of([protocol.pack(opn)]) is None


@settings(max_examples=500)
@given(any_names)
def test_a_model_name_is_a_name_never_a_path(name):
    """Whatever a peer sends as open.model: accepted only when it is a name by the rule (so it can
    never leave the weights folder as NAME.yaml, NAME-*.th, NAME.ckpt), else E_BAD_REQUEST, whose
    one line shows at most 80 characters of its repr."""
    import re
    ok = (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", name) is not None and ".." not in name)
    opn = {"v": 1, "op": "open", "id": 4, "sample_rate": 44100, "channels": 2, "model": name}
    err = rejected([protocol.pack(opn)])
    if ok:
        assert err is None
        assert "/" not in name and "\0" not in name and not name.startswith(".")
        assert not set(name) & set("*?[]~\\ \n")
        return
    assert err is not None and err.code == "E_BAD_REQUEST", (name, err)
    assert "is not a name" in str(err) and len(str(err)) < 300
    with pytest.raises(BadRequest):
        protocol.check_model_name(name)


def test_model_name_of_another_type_is_a_protocol_error():
    for value in (7, b"htdemucs", ["x"], {"a": 1}, True):
        with pytest.raises(ProtocolError):
            protocol.check_model_name(value)


def test_limits_travel_and_cover_a_push():
    wire = protocol.Limits().to_wire()
    assert protocol.Limits(**wire) == protocol.Limits()
    assert protocol.Limits().max_message_bytes >= 4 * protocol.Limits().max_chunk_samples
    assert protocol.lock_path("ipc:///tmp/x/engine.sock") == "/tmp/x/engine.sock.lock"


# -- the client: torch-free -------------------------------------------------------------------------

def test_client_imports_without_torch():
    code = ("import sys, plugin_bridge, plugin_bridge.client\n"
            "from plugin_bridge import Client, Stems, StemStream\n"
            "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')]\n"
            "Client('ipc:///nonexistent/unbake.sock', autostart=False)\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# -- the client against a scripted peer (no engine) --------------------------------------------------

STEMS = ["vocals", "accompaniment"]


def fake_stems(x: np.ndarray) -> list[np.ndarray]:
    vocals = (x * np.float32(0.25)).astype(np.float32)
    return [vocals, (x - vocals).astype(np.float32)]


class FakeEngine(threading.Thread):
    """A ROUTER that speaks protocol v1 like the daemon, with a toy "model": vocals = x / 4,
    accompaniment = x - vocals. Model names (names by protocol.MODEL_NAME_RULE): ``fake+L`` (latency
    L frames; stems are released as late as the latency allows, in two blocks per push), ``fake+L+under`` (one frame later than
    promised), ``fake+L+gap`` (a stems block with the wrong start), anything else: E_UNKNOWN_MODEL.
    ``drop`` requests are ignored (no reply) before answering again; ``keepalive_s`` > 0 makes
    every reply to push wait that long, sending progress every 0.1 s."""

    def __init__(self, endpoint: str, limits: protocol.Limits = LIMITS):
        super().__init__(daemon=True)
        self.endpoint, self.limits = endpoint, limits
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.sessions: dict[str, dict] = {}
        self.received: list[dict] = []
        self.drop = 0
        self.keepalive_s = 0.0
        self.stopped = threading.Event()
        self.count = 0

    def stop(self):
        self.stopped.set()
        self.join(5)
        self.sock.close()

    def run(self):
        while not self.stopped.is_set():
            if not self.sock.poll(20):
                continue
            ident, *frames = self.sock.recv_multipart()
            try:
                header = protocol.unpack_header(frames[0], self.limits)
                rid = protocol.request_id(header)
                req = protocol.check_request(header, len(frames) - 1, self.limits)
                self.received.append(req)
                if self.drop > 0:
                    self.drop -= 1
                    continue
                for reply in self.handle(ident, req, frames[1:]):
                    self.sock.send_multipart([ident, *reply])
            except errors.UnbakeError as e:
                self.sock.send_multipart([ident, *protocol.error_reply(rid, e)])

    def handle(self, ident, req, pcm):
        op, rid = req["op"], req["id"]
        R = protocol.reply
        if op == "hello":
            return [R("hello", rid, protocol=1, engine_version="fake", device="cpu",
                      limits=self.limits.to_wire())]
        if op == "status":
            return [R("status", rid, uptime_s=1.0, device="cpu", models=[], queue_depth=0,
                      sessions=len(self.sessions), served=0)]
        if op == "models":
            return [R("models", rid, models=[{"name": "fake+0", "sources": STEMS, "installed": True,
                                              "loaded": True}])]
        if op == "open":
            name = req["model"] or "fake+0"
            parts = name.split("+")
            if parts[0] != "fake" or not parts[1:] or not parts[1].isdigit():
                raise errors.UnknownModel(f"unknown model {name!r}")
            self.count += 1
            sid = f"s{self.count}"
            self.sessions[sid] = dict(latency=int(parts[1]), mode=(parts[2:] or [""])[0],
                                      channels=req["channels"], x=np.zeros((req["channels"], 0), np.float32),
                                      out=0)
            return [R("ready", rid, session=sid, model=name, stems=STEMS, sample_rate=req["sample_rate"],
                      channels=req["channels"], model_sample_rate=44100,
                      latency_samples=int(parts[1]), options=req["options"])]
        s = self.sessions.get(req["session"])
        if s is None:
            raise errors.UnknownSession(f"{op}: no session {req['session']!r}")
        if op == "cancel":
            del self.sessions[req["session"]]
            return [R("done", rid, session=req["session"], frames_in=s["x"].shape[1],
                      frames_out=s["out"], final=True)]
        replies = []
        if op == "push":
            block = protocol.pcm_array(pcm[0], req["channels"], req["frames"])
            s["x"] = np.concatenate([s["x"], block], axis=1)
            t = time.monotonic()
            while time.monotonic() - t < self.keepalive_s:  # a slow push: keep-alives only
                self.sock.send_multipart([ident, *R("progress", rid, session=req["session"], state="queued")])
                time.sleep(0.1)
            end = max(s["out"], s["x"].shape[1] - s["latency"] - (1 if s["mode"] == "under" else 0))
        else:
            end = s["x"].shape[1]
            del self.sessions[req["session"]]
        replies.append(R("progress", rid, session=req["session"], state="running", percent=50))
        cuts = sorted({s["out"], (s["out"] + end) // 2, end})
        for a, b in zip(cuts, cuts[1:]):
            start = a + (1 if s["mode"] == "gap" else 0)
            replies.append(R("stems", rid, fake_stems(s["x"][:, a:b]), session=req["session"], start=start,
                             frames=b - a, channels=s["channels"], stems=STEMS))
        s["out"] = end
        replies.append(R("done", rid, session=req["session"], frames_in=s["x"].shape[1], frames_out=end,
                         final=op == "close"))
        return replies


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    endpoint = f"ipc://{tmp_path_factory.mktemp('fake')}/engine.sock"
    engine = FakeEngine(endpoint, protocol.Limits(max_chunk_samples=3000))
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def client(fake):
    from plugin_bridge.client import Client
    with Client(fake.endpoint, timeout_s=2.0, retries=1) as c:
        yield c


def test_client_requests(client, fake):
    hello = client.hello()
    assert hello["protocol"] == 1 and hello["limits"]["max_chunk_samples"] == 3000
    assert client.status()["device"] == "cpu"
    assert client.models()[0]["name"] == "fake+0"
    with pytest.raises(errors.UnknownModel) as info:
        client.open("htdemucs", 44100, 2)
    assert info.value.code == "E_UNKNOWN_MODEL"
    with pytest.raises(BadRequest):  # checked before sending
        client.open("fake+0", 44100, 2, overlap=2.0)


@given(st.integers(1, 2), st.integers(1, 20000), st.sampled_from([0.01, 0.05, 0.2, 1.0]),
       st.sampled_from(["fake+0", "fake+300", "fake+5000"]), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_separate_pipelined_equals_the_toy_model(client, channels, frames, chunk_s, model, seed):
    x = np.random.default_rng(seed).standard_normal((channels, frames)).astype(np.float32)
    seen = []
    stems = client.separate(x[0] if channels == 1 else x, 8000, model, progress=seen.append, chunk_s=chunk_s)
    assert stems.stems == STEMS and list(stems) == STEMS and len(stems) == 2
    assert (stems.sample_rate, stems.latency_samples, stems.model) == (8000, 0, model)
    for got, want in zip(stems.values(), fake_stems(x)):
        assert got.dtype == np.float32 and got.shape == (channels, frames)
        np.testing.assert_array_equal(got, want)
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_separate_validates_input_before_sending(client, fake):
    before = len(fake.received)
    x = np.zeros((2, 1000), np.float32)
    x[1, 600] = np.nan
    with pytest.raises(BadAudio, match="frame 600"):
        client.separate(x, 44100, "fake+0")
    with pytest.raises(BadAudio, match="transpose"):
        client.separate(np.zeros((1000, 2), np.float32), 44100, "fake+0")
    with pytest.raises(BadAudio, match="floating point"):
        client.separate(np.zeros((2, 1000), np.int16), 44100, "fake+0")
    with pytest.raises(BadAudio):
        client.separate(np.zeros((3, 10), np.float32), 44100, "fake+0")
    with pytest.raises(BadAudio):
        client.separate(np.zeros((2, 0), np.float32), 44100, "fake+0")
    with pytest.raises(BadAudio, match="frame 3"):  # beyond float32: not clipped
        client.separate(np.array([[0, 0, 0, 1e300]]), 44100, "fake+0")
    assert len(fake.received) == before
    big = np.array([[2.5, -7.0, 0.0]])  # float64 out of [-1, 1]: sent as is, never clipped
    np.testing.assert_array_equal(client.separate(big, 44100, "fake+0")["vocals"], big / 4)


@given(st.integers(1, 2), st.integers(0, 4000), st.lists(st.integers(0, 7000), min_size=1, max_size=12),
       st.integers(0, 2 ** 32 - 1))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_stem_stream_is_the_offline_result_delayed_by_its_latency(client, channels, latency, sizes, seed):
    x = np.random.default_rng(seed).standard_normal((channels, sum(sizes))).astype(np.float32)
    with client.stream(f"fake+{latency}", 8000, channels) as stream:
        assert stream.latency_samples == latency and stream.stems == STEMS
        outs, at = [], 0
        for n in sizes:
            out = stream.process(x[:, at:at + n])
            at += n
            assert all(v.shape == (channels, n) and v.dtype == np.float32 for v in out.values())
            outs.append(out)
        tail = stream.flush()
    total = sum(sizes)
    assert all(v.shape == (channels, latency) for v in tail.values())  # the rest of the delay line
    for i, stem in enumerate(STEMS):
        y = np.concatenate([o[stem] for o in outs] + [tail[stem]], axis=1)
        assert y.shape == (channels, total + latency)
        np.testing.assert_array_equal(y[:, :latency], 0)
        np.testing.assert_array_equal(y[:, latency:], fake_stems(x)[i])


def test_stem_stream_never_pads_silently(client):
    with client.stream("fake+100+under", 8000, 1) as stream:
        stream.process(np.zeros((1, 50), np.float32))  # all pre-roll
        with pytest.raises(ProtocolError, match="fewer than"):
            stream.process(np.zeros((1, 200), np.float32))


def test_session_checks_block_order(client):
    session = client.open("fake+0+gap", 8000, 1)
    with pytest.raises(ProtocolError, match="starts at frame"):
        session.push(np.ones((1, 100), np.float32))
    with pytest.raises(ProtocolError, match="unusable"):
        session.push(np.ones((1, 100), np.float32))


def test_sessions_interleave_on_one_client_and_split_big_blocks(client, fake):
    a = client.open("fake+0", 8000, 2)
    b = client.open("fake+10", 8000, 1)
    xa = np.random.default_rng(1).standard_normal((2, 7001)).astype(np.float32)  # > 3000 samples: 5 pushes
    xb = np.random.default_rng(2).standard_normal((1, 500)).astype(np.float32)
    ta = a.send_push(xa)
    tb = b.send_push(xb)
    got_b = b.receive(tb)       # a's replies are buffered meanwhile
    got_a = a.receive(ta)
    np.testing.assert_array_equal(got_a["vocals"], fake_stems(xa)[0])
    np.testing.assert_array_equal(got_b["vocals"], fake_stems(xb)[0][:, :490])
    assert a.frames_in == 7001 and a.frames_out == 7001
    np.testing.assert_array_equal(b.close()["accompaniment"], fake_stems(xb)[1][:, 490:])
    assert a.close()["vocals"].shape == (2, 0)
    with pytest.raises(errors.UnknownSession):
        a.push(xa)
    with pytest.raises(BadAudio, match="channel"):
        client.open("fake+0", 8000, 2).push(np.zeros((1, 10), np.float32))


def test_a_silent_engine_times_out_and_lazy_pirate_resends(client, fake):
    from plugin_bridge.client import Client
    fake.drop = 1  # the first hello gets no reply: resent on a new socket
    t = time.monotonic()
    assert client.hello()["protocol"] == 1
    assert 1.9 < time.monotonic() - t < 4
    fake.drop = 1  # separate() is redone from scratch: open dropped, then all again
    x = np.ones((1, 100), np.float32)
    np.testing.assert_array_equal(client.separate(x, 8000, "fake+0")["vocals"], x / 4)
    session = client.open("fake+0", 8000, 1)
    fake.drop = 1  # a session's push is not retried
    with pytest.raises(errors.EngineUnavailable, match="within 2 s"):
        session.push(x)
    fake.drop = 0
    with Client(fake.endpoint.replace("engine.sock", "nobody.sock"), timeout_s=0.3, retries=2) as nobody:
        t = time.monotonic()
        with pytest.raises(errors.EngineUnavailable, match="nobody.sock") as info:
            nobody.status()
        assert info.value.code == "E_UNAVAILABLE" and "3 times" in str(info.value)
        assert time.monotonic() - t < 3


def test_keep_alives_reset_the_timeout(fake):
    from plugin_bridge.client import Client
    with Client(fake.endpoint, timeout_s=0.5, retries=0) as c:
        session = c.open("fake+0", 8000, 1)
        fake.keepalive_s = 1.5  # longer than timeout_s, with progress every 0.1 s
        try:
            out = session.push(np.ones((1, 10), np.float32))
        finally:
            fake.keepalive_s = 0.0
        np.testing.assert_array_equal(out["vocals"], np.full((1, 10), 0.25, np.float32))
