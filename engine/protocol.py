"""The unbake wire protocol, version 1: constants, message layout, limits, encode/decode.

Imported by the torch-free client: stdlib, numpy and msgpack only. Never pickle.

Transport: the client's DEALER talks to the daemon's ROUTER (the ROUTER sees the peer's identity
frame first and puts it back on replies). Every message, both ways, is::

    frame 0      header: a msgpack map (at most ``Limits.max_header_bytes``)
    frame 1..n   PCM: raw little-endian float32, C order, layout [channels, frames] as the header says

Requests (header keys; every request has ``v`` = PROTOCOL_VERSION, ``op`` and ``id``, an int the
client picks and that every reply to it carries as ``re``)::

    hello   {client?}                                              -> hello
    status  {}                                                     -> status
    models  {}                                                     -> models
    open    {model?, sample_rate, channels, options?, repo?}       -> ready
    push    {session, channels, frames}  + 1 PCM frame           -> progress*, stems*, done
    close   {session}                                              -> progress*, stems*, done
    cancel  {session}                                              -> done

Replies (header keys; every reply has ``v``, ``kind`` and ``re``)::

    hello     {protocol, engine_version, device, limits, pid, fp16, threads,
               max_batch, cpu_runtime}                                            terminal
    status    {uptime_s, device, models, queue_depth, sessions, served, ...}      terminal
    models    {models: [{name, sources, installed, loaded}]}                      terminal
    ready     {session, model, stems, sample_rate, channels, model_sample_rate,
               latency_samples, options, weights_sha256, repo}                    terminal
    progress  {session?, state, percent?, eta_s?}     keep-alive while a request is queued or running
    stems     {session, start, frames, channels, stems} + one PCM frame per stem, in ``stems`` order
    done      {session, frames_in, frames_out, final}                            terminal
    error     {code, message}    code from engine.errors; ``re`` is None when the
                                 request's id could not be read                   terminal

Exactly one terminal reply answers each request. ``stems.start`` is the index (at the client's
rate) of the block's first frame in the stem; blocks of a session come in order and without gaps.
``weights_sha256`` in ``ready`` identifies the model's weights (``engine.registry.weights_sha256``:
64 hex digits, or None where unknown; added in engine 0.1.0, older daemons leave it out).
``latency_samples`` in ``ready`` is how far the stem output may lag the input pushed: after a
push's ``done``, the stems cover at least ``frames_in - latency_samples`` frames.

``model`` in ``open`` is a model or separation preset name, never a path (``check_model_name``,
``MODEL_NAME_RULE``): 1 to 64 characters of ``A-Z a-z 0-9 . _ + -``, the first a letter or digit,
without ``..``; anything else is ``E_BAD_REQUEST`` before the engine looks anything up.
``repo`` in ``open`` (``REPO_FIELD``) is a weights folder on the engine's
machine to take this session's model(s) from instead of the engine's own (``unbake separate --repo
DIR``): an absolute path, at most ``MAX_REPO_PATH_CHARS`` characters, no NUL (``check_repo_path``).
The files in it are verified exactly as in the engine's own folder (catalog sha256, the SHA8 of
``SIG-SHA8.th``). Only a peer of a private ``ipc://`` endpoint (a socket file of the engine's user,
mode 0600; ``ipc_is_private``) may name one: any other peer gets ``E_NOT_PERMITTED`` and the
daemon goes on serving. ``ready.repo`` echoes the folder asked for (None: the engine's own).
``hello`` states the engine's settings so that a client can tell which of its flags a running
engine does not honour: ``device`` (str), ``fp16`` (bool), ``threads`` (int, CPU threads of the
networks), ``max_batch`` (int, segments per forward pass), ``cpu_runtime`` ("torch" or "onnx") and
``pid`` (int); older engines send ``device``
only (a client then cannot tell, and says so).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import numpy as np

from .errors import BadAudio, BadRequest, LimitExceeded, ProtocolError

PROTOCOL_VERSION = 1
PCM_DTYPE = "<f4"
LAYOUT = "[channels, frames]"

# requests
HELLO, STATUS, MODELS, OPEN, PUSH, CLOSE, CANCEL = "hello", "status", "models", "open", "push", "close", "cancel"
OPS = (HELLO, STATUS, MODELS, OPEN, PUSH, CLOSE, CANCEL)
SESSION_OPS = (PUSH, CLOSE, CANCEL)
SAFE_TO_REPEAT = (HELLO, STATUS, MODELS)  # Lazy Pirate may resend these as they are

# replies
K_HELLO, K_STATUS, K_MODELS, K_READY = "hello", "status", "models", "ready"
K_PROGRESS, K_STEMS, K_DONE, K_ERROR = "progress", "stems", "done", "error"
TERMINAL = frozenset({K_HELLO, K_STATUS, K_MODELS, K_READY, K_DONE, K_ERROR})

# options a session may set at open (engine.apply.Streamer / engine.sessions.TrackSeparator)
OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "segment_s": (int, float), "overlap": (int, float), "shifts": (int,), "seed": (int,),
    "two_stems": (str,), "transition_power": (int, float),
    "context_s": (int, float), "lookahead_s": (int, float),  # engine.apply's past-context rule
    "residual": (bool, str),  # engine.ensemble.ResidualTrack: true, or the stem that takes it
    "precision": (str,),  # "fp32" or "bf16" (engine.devices.precision_dtype)
    # the model's own options (engine.sessions.MODEL_OPTIONS; spleeter-2stems only)
    "full_band": (bool,), "mask_exponent": (int, float), "wiener_iterations": (int,), "tta": (list, tuple),
}
MAX_WIENER_ITERATIONS = 10
MASK_EXPONENT_RANGE = (0.5, 8.0)
TTA_CHOICES = ("swap", "polarity")
MAX_SHIFTS = 20
MAX_CONTEXT_S = 60.0  # context_s / lookahead_s (engine.apply.past_context_for also bounds their cost)
# The segment grid's cost (engine.apply.grid_for): each segment is one window through the network,
# so a stride of one frame (overlap 0.999999) made 1 s of audio take 2,907 s. Overlap is at most
# MAX_OVERLAP (each frame computed at most 1 / (1 - 0.95) = 20 times) and the grid's stride at
# least 1 / MAX_SEGMENTS_PER_S seconds of audio (engine.apply.grid_for checks it against the
# model's own segment length when the session's options leave it out).
MAX_OVERLAP = 0.95
MAX_SEGMENTS_PER_S = 50
# Flow control (engine.daemon, engine.clients). A session's idle clock: ``ready`` gives it
# ``session_ttl_s``; each second of audio pushed gives it SESSION_TTL_S_PER_AUDIO_S seconds more (never more than
# ``session_ttl_s`` from now), and time its requests spend queued or running does not count. Pushes
# of almost nothing (1 frame every minute) no longer keep a session forever; a stream at 1/10 of
# real time or faster never expires while it streams.
SESSION_TTL_S_PER_AUDIO_S = 10.0
# A client that does not read its replies: the engine keeps what zmq cannot take for it (up to
# PAUSE_UNREAD_BYTES_PER_CLIENT before its sessions pause, i.e. no more forward passes for them
# until it reads); requests over the queued-audio limits get E_QUEUE_FULL ("slow down"). Nothing is
# dropped silently: a client past ``max_unread_replies_per_client`` is cut off (its sessions end,
# its unread replies are dropped, and the engine logs it).
PAUSE_UNREAD_BYTES_PER_CLIENT = 4 * 2 ** 20
SEND_QUEUE_MESSAGES = 2      # ZMQ_SNDHWM per connection: the rest waits where the engine counts it
MAX_ID = 2 ** 63 - 1
REPO_FIELD = "repo"              # open: a weights folder on the engine's machine (see above)
MAX_REPO_PATH_CHARS = 4096       # PATH_MAX on Linux
# open.model: a name, never a path (check_model_name): 1 to 64 ASCII letters, digits and . _ + -,
# the first a letter or digit, never "..": no "/", "\\", NUL, glob or shell characters, no "~"
MAX_MODEL_NAME_CHARS = 64
MODEL_NAME_RULE = ("1 to 64 characters of A-Z a-z 0-9 . _ + -, the first a letter or digit, "
                   "without '..'")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


@dataclass(frozen=True)
class Limits:
    """What the daemon accepts; checked on every message before anything is allocated."""
    max_header_bytes: int = 64 * 1024
    max_frames: int = 1                     # PCM frames in one request (push carries one)
    max_channels: int = 2
    max_chunk_samples: int = 2 ** 24        # channels * frames in one push (64 MiB of float32)
    min_sample_rate: int = 1000
    max_sample_rate: int = 768_000
    max_sessions_per_client: int = 16
    max_sessions: int = 64
    max_pending_per_session: int = 16       # requests of one session queued at once
    session_ttl_s: float = 120.0            # a session idle this long is freed (SESSION_TTL_S_PER_AUDIO_S)
    # Per peer identity (``peer_identity``: one local user on ipc, one CURVE key, one address on
    # plain TCP), however many connections it opens:
    max_sessions_per_peer: int = 32         # no peer holds more than half of max_sessions
    max_queued_samples_per_peer: int = 2 ** 26   # pushed audio not yet answered (256 MiB of float32)
    max_unread_bytes_per_peer: int = 2 ** 26     # replies held for its connections (64 MiB): beyond,
    #                                              the sessions of its connections that do not read pause
    # Per connection (a client, one zmq DEALER):
    max_queued_samples_per_client: int = 2 ** 24  # pushed audio not yet answered (64 MiB)
    max_unread_replies_per_client: int = 20_000   # replies it has not read; beyond, it is cut off

    @property
    def max_message_bytes(self) -> int:
        """ZMQ_MAXMSGSIZE: the largest single frame a peer may send."""
        return max(self.max_header_bytes, 4 * self.max_chunk_samples)

    def to_wire(self) -> dict:
        return asdict(self)


# -- where the daemon listens (engine.endpoints: syntax, the private runtime folder, lock files) ----

from .endpoints import (ENDPOINT_ENV, check_endpoint, default_endpoint, ipc_is_private,  # noqa: E402,F401
                        lock_path, runtime_dir)


# -- encoding -------------------------------------------------------------------------------------

def pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def pcm_frame(block: np.ndarray) -> memoryview:
    """float32 [channels, frames] -> its bytes as sent (little-endian, C order), without a copy
    where the array already is so."""
    assert block.ndim == 2, block.shape  # [channels, frames]
    block = np.ascontiguousarray(block, dtype=PCM_DTYPE)
    if block.size == 0:
        return memoryview(b"")
    return memoryview(block).cast("B")


def request(op: str, req_id: int, pcm: list[np.ndarray] = (), **fields) -> list:
    """[header, pcm...] for a request."""
    return [pack({"v": PROTOCOL_VERSION, "op": op, "id": req_id, **fields}), *(pcm_frame(p) for p in pcm)]


def reply(kind: str, re: int | None, pcm: list[np.ndarray] = (), **fields) -> list:
    """[header, pcm...] for a reply."""
    return [pack({"v": PROTOCOL_VERSION, "kind": kind, "re": re, **fields}), *(pcm_frame(p) for p in pcm)]


def error_reply(re: int | None, err: Exception) -> list:
    code = getattr(err, "code", "E_INTERNAL")
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    return reply(K_ERROR, re, code=code, message=message[:1000])


# -- decoding -------------------------------------------------------------------------------------

def unpack_header(frame: bytes, limits: Limits) -> dict:
    """msgpack bytes -> dict. Raises LimitExceeded / ProtocolError; allocates at most the frame's size."""
    if len(frame) > limits.max_header_bytes:
        raise LimitExceeded(f"header: {len(frame)} bytes, the limit is {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True, use_list=True)
    except Exception as e:
        raise ProtocolError(f"header: not valid msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header: expected a map, got {type(header).__name__}")
    return header


def peer_identity(peer_address: str | None, user_id: str | None = None, ipc: bool = False) -> str:
    """Who a connection belongs to, for per-peer quotas: ``key:<z85>`` for a CURVE peer (its ZAP
    User-Id), ``uid:<N>`` for an ipc peer (libzmq's Peer-Address there is ``...:uid:gid:pid``, from
    SO_PEERCRED; ``ipc`` True: the engine listens on ipc://), else ``addr:<address>`` (plain TCP:
    every local user shares 127.0.0.1). Never raises: an unreadable address is ``addr:?``."""
    if user_id:
        return f"key:{user_id}"
    if not peer_address:
        return "addr:?"
    parts = peer_address.rsplit(":", 3)
    if ipc and len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
        return f"uid:{parts[1]}"
    return f"addr:{peer_address}"


def peer_pid(peer_address: str | None, ipc: bool = True) -> int | None:
    """The peer process's pid on an ipc connection (``...:uid:gid:pid``), else None (TCP, or a
    pid the engine cannot see: 0)."""
    if not peer_address or not ipc:
        return None
    parts = peer_address.rsplit(":", 3)
    if len(parts) == 4 and all(p.isdigit() for p in parts[1:]) and int(parts[3]) > 0:
        return int(parts[3])
    return None


def request_id(header: dict) -> int | None:
    """The request's id if it is a valid one (so an error can name it), else None."""
    rid = header.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_ID:
        return rid
    return None


def _field(header: dict, key: str, types: tuple[type, ...], where: str, required: bool = True):
    if key not in header or header[key] is None:
        if required:
            raise ProtocolError(f"{where}: missing {key!r}")
        return None
    value = header[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise ProtocolError(f"{where}: {key!r} must be {names}, got {type(value).__name__}")
    return value


def check_request(header: dict, n_pcm: int, limits: Limits) -> dict:
    """Validate a request header against the schema and limits; returns it normalised.

    Raises ProtocolError (wrong types, unknown op, bad version), LimitExceeded (sizes, counts),
    BadRequest (values out of range). Touches no PCM: sizes are checked here, before any allocation.
    """
    v = header.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {v!r} is not supported (this daemon speaks {PROTOCOL_VERSION})")
    if request_id(header) is None:
        raise ProtocolError(f"'id' must be an int in [0, 2**63), got {header.get('id')!r}")
    op = header.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    where = f"{op} #{header['id']}"
    expected = 1 if op == PUSH else 0
    if n_pcm != expected:
        raise (LimitExceeded if n_pcm > limits.max_frames else ProtocolError)(
            f"{where}: {n_pcm} PCM frame(s), expected {expected}")
    out = {"op": op, "id": header["id"]}
    if op == OPEN:
        model = _field(header, "model", (str,), where, required=False)
        if model is not None:
            check_model_name(model, where)
        rate = _field(header, "sample_rate", (int,), where)
        if not limits.min_sample_rate <= rate <= limits.max_sample_rate:
            raise BadRequest(f"{where}: sample_rate {rate} Hz is outside "
                             f"[{limits.min_sample_rate}, {limits.max_sample_rate}]")
        channels = _field(header, "channels", (int,), where)
        if not 1 <= channels <= limits.max_channels:
            raise BadAudio(f"{where}: {channels} channels; unbake separates mono or stereo audio")
        options = _field(header, "options", (dict,), where, required=False) or {}
        repo = _field(header, REPO_FIELD, (str,), where, required=False)
        out.update(model=model, sample_rate=rate, channels=channels, options=check_options(options, where),
                   repo=None if repo is None else check_repo_path(repo, where))
    elif op in SESSION_OPS:
        session = _field(header, "session", (str,), where)
        if not (0 < len(session) <= 64):
            raise ProtocolError(f"{where}: 'session' must be 1 to 64 characters")
        out["session"] = session
        if op == PUSH:
            channels = _field(header, "channels", (int,), where)
            frames = _field(header, "frames", (int,), where)
            if not 1 <= channels <= limits.max_channels:
                raise BadAudio(f"{where}: {channels} channels; unbake separates mono or stereo audio")
            if frames < 1:
                raise BadAudio(f"{where}: {frames} frames; a push carries at least one")
            if channels * frames > limits.max_chunk_samples:
                raise LimitExceeded(f"{where}: {channels} x {frames} samples, the limit per push is "
                                    f"{limits.max_chunk_samples}; push smaller chunks")
            dtype = header.get("dtype", PCM_DTYPE)
            if dtype != PCM_DTYPE:
                raise ProtocolError(f"{where}: dtype {dtype!r}; only {PCM_DTYPE} (little-endian float32)")
            out.update(channels=channels, frames=frames)
    return out


def check_model_name(name, where: str = "model") -> str:
    """``name`` (str) as it is when it is a model or preset name by ``MODEL_NAME_RULE``: a name,
    never a path, so the engine may look it up in its weights folder (``NAME.yaml``,
    ``NAME-*.th``, ``NAME.ckpt``) without reaching outside it. where: what to name in the message.
    Raises ProtocolError (not a str), BadRequest (anything else: empty, longer than
    ``MAX_MODEL_NAME_CHARS``, ``/``, ``..``, NUL, ``*``, a leading ``.`` or ``-``, non-ASCII); the
    message shows at most 80 characters of the name's repr."""
    if not isinstance(name, str):
        raise ProtocolError(f"{where}: a model name must be str, got {type(name).__name__}")
    if _MODEL_NAME.fullmatch(name) is None or ".." in name:
        shown = repr(name[:100])
        shown = shown if len(shown) <= 80 and len(name) <= 100 else shown[:80] + "..."
        chars = f"{len(name)} character" + ("s" if len(name) != 1 else "")
        raise BadRequest(f"{where}: model name {shown} ({chars}) is not a name: {MODEL_NAME_RULE}")
    return name


def check_repo_path(repo: str, where: str) -> str:
    """``open``'s ``repo``: a non-empty absolute POSIX path (str) of at most MAX_REPO_PATH_CHARS
    characters, without NUL; returned as it is (not normalised: the engine resolves it). Whether the
    peer may name a path at all is the daemon's decision (``ipc_is_private``), not checked here.
    Raises ProtocolError (not a str), BadRequest (empty, relative, too long, NUL)."""
    if not isinstance(repo, str):
        raise ProtocolError(f"{where}: {REPO_FIELD!r} must be str, got {type(repo).__name__}")
    if not 0 < len(repo) <= MAX_REPO_PATH_CHARS:
        raise BadRequest(f"{where}: {REPO_FIELD!r} must be 1 to {MAX_REPO_PATH_CHARS} characters")
    if "\0" in repo:
        raise BadRequest(f"{where}: {REPO_FIELD!r} contains a NUL character")
    if not repo.startswith("/"):
        raise BadRequest(f"{where}: {REPO_FIELD!r} must be an absolute path, got {repo[:200]!r}")
    return repo


def check_options(options: dict, where: str) -> dict:
    """Session options: known keys, right types, sane ranges. Raises BadRequest / ProtocolError."""
    out = {}
    for key, value in options.items():
        if key not in OPTION_TYPES:
            raise BadRequest(f"{where}: unknown option {key!r}; options: {', '.join(OPTION_TYPES)}")
        if value is None:
            continue
        types = OPTION_TYPES[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise ProtocolError(f"{where}: option {key!r} must be {' or '.join(t.__name__ for t in types)}, "
                                f"got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise BadRequest(f"{where}: option {key!r} must be finite")
        out[key] = value
    if "segment_s" in out and not 0 < out["segment_s"] <= 3600:
        raise BadRequest(f"{where}: segment_s must be in (0, 3600] seconds")
    if "overlap" in out and not 0 <= out["overlap"] <= MAX_OVERLAP:
        raise BadRequest(f"{where}: overlap must be in [0, {MAX_OVERLAP:g}], got {out['overlap']!r}")
    if "segment_s" in out and "overlap" in out and (1 - out["overlap"]) * out["segment_s"] * MAX_SEGMENTS_PER_S < 1:
        raise BadRequest(f"{where}: segment_s {out['segment_s']:g} with overlap {out['overlap']:g} makes "
                         f"more than {MAX_SEGMENTS_PER_S} segments per second of audio (the limit); "
                         f"use a longer segment or less overlap")
    for key in ("context_s", "lookahead_s"):
        if key in out and not 0 <= out[key] <= MAX_CONTEXT_S:
            raise BadRequest(f"{where}: {key} must be in [0, {MAX_CONTEXT_S:g}] seconds")
    if "shifts" in out and not 0 <= out["shifts"] <= MAX_SHIFTS:
        raise BadRequest(f"{where}: shifts must be in [0, {MAX_SHIFTS}]")
    if "seed" in out and not 0 <= out["seed"] <= MAX_ID:
        raise BadRequest(f"{where}: seed must be in [0, 2**63)")
    if "transition_power" in out and not 1 <= out["transition_power"] <= 16:
        raise BadRequest(f"{where}: transition_power must be in [1, 16]")
    if isinstance(out.get("residual"), str) and not 0 < len(out["residual"]) <= 64:
        raise BadRequest(f"{where}: residual must be true, false or a stem name")
    if "wiener_iterations" in out and not 0 <= out["wiener_iterations"] <= MAX_WIENER_ITERATIONS:
        raise BadRequest(f"{where}: wiener_iterations must be in [0, {MAX_WIENER_ITERATIONS}]")
    lo, hi = MASK_EXPONENT_RANGE
    if "mask_exponent" in out and not lo <= out["mask_exponent"] <= hi:
        raise BadRequest(f"{where}: mask_exponent must be in [{lo:g}, {hi:g}]")
    if "tta" in out:
        tta = out["tta"]
        if len(tta) > len(TTA_CHOICES) or any(not isinstance(t, str) or t not in TTA_CHOICES for t in tta):
            raise BadRequest(f"{where}: tta must be a list of {', '.join(map(repr, TTA_CHOICES))}, got {list(tta)!r}")
        out["tta"] = list(tta)
    if "precision" in out and out["precision"] not in ("fp32", "bf16"):
        raise BadRequest(f"{where}: precision must be fp32 or bf16, got {out['precision'][:20]!r}")
    if "two_stems" in out and not 0 < len(out["two_stems"]) <= 64:
        raise BadRequest(f"{where}: two_stems must name a stem")
    return out


def pcm_array(frame, channels: int, frames: int, where: str = "audio", first_frame: int = 0,
              sample_rate: int | None = None) -> np.ndarray:
    """A PCM frame -> read-only float32 [channels, frames] view (no copy).

    Raises LimitExceeded when the byte count does not match the header, BadAudio for NaN/Inf.
    """
    size = len(frame)
    if size != 4 * channels * frames:
        raise LimitExceeded(f"{where}: PCM frame has {size} bytes, the header says {channels} x {frames} "
                            f"float32 = {4 * channels * frames}")
    block = np.frombuffer(frame, dtype=PCM_DTYPE).reshape(channels, frames)
    if not np.isfinite(block).all():
        bad = np.argwhere(~np.isfinite(block))[:, 1].min()  # the earliest frame, any channel
        at = first_frame + int(bad)
        when = f" ({at / sample_rate:.3f} s)" if sample_rate else ""
        raise BadAudio(f"{where}: NaN or Inf sample at frame {at}{when}")
    return block.astype(np.float32, copy=False)


def check_reply(header: dict) -> dict:
    """Minimal checks a client makes on a reply header. Raises ProtocolError."""
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"reply in protocol version {header.get('v')!r}, expected {PROTOCOL_VERSION}")
    if header.get("kind") not in TERMINAL | {K_PROGRESS, K_STEMS}:
        raise ProtocolError(f"unknown reply kind {header.get('kind')!r}")
    return header


def reply_pcm(header: dict, frames: list, copy: bool = True) -> list[np.ndarray]:
    """The PCM frames of a ``stems`` reply as float32 [channels, frames] arrays: writable copies,
    or (``copy=False``) read-only views on the received frames."""
    n, c = header.get("frames"), header.get("channels")
    stems = header.get("stems")
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(stems, list)) or len(frames) != len(stems):
        raise ProtocolError(f"stems reply: {len(frames)} PCM frame(s) for stems {stems!r}")
    out = []
    for f in frames:
        if len(f) != 4 * n * c:
            raise ProtocolError(f"stems reply: PCM frame of {len(f)} bytes, expected {4 * n * c}")
        view = np.frombuffer(f, dtype=PCM_DTYPE).reshape(c, n)
        out.append(view.astype(np.float32) if copy else view.astype(np.float32, copy=False))
    return out


def to_plain(value: Any) -> Any:
    """numpy scalars -> Python numbers, so a header packs."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
