"""``StemChain``: per-stem pedalboard chains around a separation, with pedalboard's call shape.

pedalboard's chain is C++ and takes no Python objects (pedalboard issue #12, PR #88), so this
composes *around* pedalboard: the engine splits the audio into stems, each stem goes through its
own chain (a ``Pedalboard``, any pedalboard plugin, or a callable with pedalboard's call shape),
and the processed stems are summed into the remix::

    from pedalboard import Pedalboard, Reverb, Compressor
    from plugin_bridge import StemChain

    chain = StemChain({"vocals": Pedalboard([Reverb(room_size=0.6)]), "drums": Compressor()},
                      model="htdemucs", gains_db={"bass": -3.0})
    remix = chain(audio, 44100)                 # offline, like board(audio, 44100)
    stems = chain.process_stems(audio, 44100)   # {stem: processed float32 [channels, frames]}

Latency, next to pedalboard's own semantics:

- ``reset=True`` (the default; pedalboard: one-shot processing, plugin latency compensated, output
  as long as the input, tails past the end cut): the same here. The separation is offline and
  aligned (``Client.separate``), each pedalboard chain is called with ``reset=True`` (pedalboard
  compensates its plugins); a callable that reports latency (``reported_latency_samples``, as
  pedalboard's external plugins do) is compensated here the same way (fed that many extra zeros,
  its first output frames dropped). Output: the input's length and alignment.
- ``reset=False`` (pedalboard: streaming, state kept between calls, plugin latency *not*
  compensated): successive calls with blocks of any size return exactly as many frames as they
  get, delayed by ``latency_samples`` = the engine's latency (``StemStream.latency_samples``) +
  ``buffer_size - 1`` + the largest chain latency; stems whose chain has less latency are delayed to
  match, so the stems stay aligned. ``flush()`` returns the rest (exactly ``latency_samples``
  frames); without the first ``latency_samples`` frames, everything returned equals the
  ``reset=True`` output of the whole input. ``reset()`` (or a call with ``reset=True``) drops the
  stream. The ``buffer_size - 1`` is there because the chains are always called with blocks of
  exactly ``buffer_size`` frames (the first streaming call's): pedalboard re-prepares a plugin, and
  so clears a Delay's or a Reverb's state, whenever a block is longer than any before it; fed
  random block sizes directly, pedalboard 0.9's Delay and Reverb drift up to 0.6 from their
  one-shot output within the first 0.1 s.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from engine.errors import BadAudio, BadRequest

__all__ = ["StemChain", "chain_latency_samples"]

# A stem's chain: a pedalboard Pedalboard/Plugin, or f(audio, sample_rate, buffer_size=, reset=).
StemFx = Callable[..., np.ndarray]


def chain_latency_samples(chain: Any) -> int:
    """Samples of delay a chain adds in streaming (``reset=False``): plugins in series add up, a
    ``pedalboard.Mix`` (parallel) takes its largest branch; a plugin or callable reports its own
    ``reported_latency_samples`` (0 when it has none, as pedalboard's built-in plugins)."""
    import pedalboard
    if chain is None:
        return 0
    if isinstance(chain, pedalboard.Mix):
        return max((chain_latency_samples(p) for p in chain), default=0)
    if isinstance(chain, pedalboard.PluginContainer):  # Pedalboard, Chain
        return sum(chain_latency_samples(p) for p in chain)
    latency = getattr(chain, "reported_latency_samples", 0) or 0
    if not isinstance(latency, (int, np.integer)) or latency < 0:
        raise BadRequest(f"{chain!r}: reported_latency_samples must be an int >= 0, got {latency!r}")
    return int(latency)


def _is_pedalboard(chain: Any) -> bool:
    import pedalboard
    return isinstance(chain, pedalboard.Plugin)


class StemChain:
    """Per-stem effect chains around a separation; called like a pedalboard plugin.

    chains: ``{stem: chain}``; a chain is a ``pedalboard.Pedalboard``, any pedalboard plugin, or a
        callable ``f(audio: float32 [channels, frames], sample_rate: float, buffer_size: int,
        reset: bool) -> float32 [channels, frames]`` (pedalboard's call shape; same frame count
        out as in). A stem not in ``chains`` passes through unchanged; a stem mapped to ``None``
        is muted. Naming a stem the model does not have is a BadRequest at the first call.
    model: a model or preset name for the engine (None: the engine's default model).
    gains_db: ``{stem: dB}`` applied after the stem's chain (default 0 dB for every stem).
    client: a ``plugin_bridge.Client`` (None: ``Client()``, the embedded default daemon, made
        at the first call).
    options: session options for the engine (segment_s, overlap, shifts, seed, two_stems, ...).

    ``__call__(input_array, sample_rate, buffer_size=8192, reset=True)`` -> the remix, float32
    with the input's shape ([channels, frames], or [frames] for mono 1-D input).
    ``process_stems(...)`` -> ``{stem: float32 [channels, frames]}``, the processed stems (gain
    applied; a muted stem is silence). See the module docstring for latency and ``reset``.
    Attributes: ``latency_samples`` (int, samples at the streaming call's sample rate; 0 until a
    streaming call, and for ``reset=True``), ``stems`` (list[str] once known).
    Raises BadAudio (shape, NaN/Inf), BadRequest (unknown stem, bad chain output), and the
    client's errors (EngineUnavailable, ModelError, ...).
    """

    def __init__(self, chains: Mapping[str, StemFx | None] | None = None, model: str | None = None, *,
                 gains_db: Mapping[str, float] | None = None, client=None, **options):
        self.chains = dict(chains or {})
        self.gains_db = {s: float(g) for s, g in (gains_db or {}).items()}
        self.model = model
        self.options = options
        self._client = client
        self._own_client = client is None
        self.stems: list[str] | None = None
        self.latency_samples = 0
        self._stream = None
        self._stream_key: tuple | None = None  # (sample rate, channels, block frames)
        self._pending: dict[str, np.ndarray] = {}  # stem frames waiting for a whole block
        self._ready: dict[str, np.ndarray] = {}    # processed frames waiting to go out
        self._skip = self._frames_in = self._frames_out = 0
        self._chain_latency = 0
        self._layout_1d = False

    def __repr__(self) -> str:
        return (f"StemChain(chains={self.chains!r}, model={self.model!r}, gains_db={self.gains_db!r}, "
                f"latency_samples={self.latency_samples})")

    # -- public -------------------------------------------------------------------------------
    def __call__(self, input_array, sample_rate: float, buffer_size: int = 8192, reset: bool = True) -> np.ndarray:
        stems = self.process_stems(input_array, sample_rate, buffer_size, reset)
        return self._remix(stems)

    def process_stems(self, input_array, sample_rate: float, buffer_size: int = 8192,
                      reset: bool = True) -> dict[str, np.ndarray]:
        audio = self._input(input_array)
        rate = self._rate(sample_rate)
        if reset:
            self.reset()
            return self._offline(audio, rate, int(buffer_size))
        return self._streaming(audio, rate, int(buffer_size))

    def flush(self) -> np.ndarray:
        """End a stream (``reset=False`` calls): the remix's last ``latency_samples`` frames."""
        return self._remix(self.flush_stems())

    def flush_stems(self) -> dict[str, np.ndarray]:
        """End a stream: each processed stem's last ``latency_samples`` frames. Afterwards the next
        ``reset=False`` call starts a new stream. Raises BadRequest if no stream is open."""
        if self._stream is None:
            raise BadRequest("flush: no stream is open (call with reset=False first)")
        stream, (rate, channels, block) = self._stream, self._stream_key
        self._take(stream.flush())  # the engine's last frames
        for s in self.stems:  # the chains' own delay, then whole blocks of silence
            pending = self._pending[s].shape[1] + self._chain_latency
            pad = pending + (-pending % block) - self._pending[s].shape[1]
            self._pending[s] = np.concatenate([self._pending[s], np.zeros((channels, pad), np.float32)], axis=1)
        self._run_blocks(rate, block)
        left = self._frames_in + self.latency_samples - self._frames_out
        out = {s: self._ready[s][:, :left] for s in self.stems}
        self._stream = None
        self._stream_key = None
        return out

    def reset(self) -> None:
        """Drop the stream in progress (the daemon frees its session) and clear the chains' state."""
        if self._stream is not None:
            try:
                self._stream.cancel()
            except Exception:
                pass
        self._stream = None
        self._stream_key = None
        for chain in self.chains.values():
            if chain is not None and hasattr(chain, "reset"):
                chain.reset()

    def close(self) -> None:
        """Drop any stream and close the client this StemChain made. Idempotent."""
        self.reset()
        if self._own_client and self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> StemChain:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from .client import Client
            self._client = Client()
        return self._client

    def _input(self, input_array) -> np.ndarray:
        a = np.asarray(input_array)
        if a.dtype.kind != "f":
            raise BadAudio(f"StemChain: audio must be float, got {a.dtype}")
        self._layout_1d = a.ndim == 1
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.shape[0] not in (1, 2):
            raise BadAudio(f"StemChain: audio must be [channels, frames] with 1 or 2 channels (or 1-D "
                           f"mono), got shape {a.shape}" + (" (transpose a [frames, channels] array)"
                                                            if a.ndim == 2 and a.shape[1] in (1, 2) else ""))
        return np.ascontiguousarray(a, dtype=np.float32)

    @staticmethod
    def _rate(sample_rate) -> int:
        rate = float(sample_rate)
        if not rate > 0 or rate != int(rate):
            raise BadRequest(f"StemChain: sample_rate must be a positive whole number of Hz, got {sample_rate!r}")
        return int(rate)

    def _check_stems(self, stems: list[str]) -> None:
        self.stems = list(stems)
        unknown = sorted(set(self.chains) | set(self.gains_db))
        unknown = [s for s in unknown if s not in self.stems]
        if unknown:
            raise BadRequest(f"StemChain: no stem {', '.join(map(repr, unknown))} in {self.model or 'the model'}'s "
                             f"stems {', '.join(self.stems)}")

    def _gain(self, stem: str) -> float:
        return float(10.0 ** (self.gains_db.get(stem, 0.0) / 20.0))

    def _apply(self, stem: str, audio: np.ndarray, rate: int, buffer_size: int, reset: bool,
               compensate: bool = False) -> np.ndarray:
        """One stem through its chain (and gain); muted stems give silence."""
        if stem in self.chains and self.chains[stem] is None:
            return np.zeros_like(audio)
        chain = self.chains.get(stem)
        out = audio
        if chain is not None:
            n = audio.shape[1]
            lat = chain_latency_samples(chain) if compensate and not _is_pedalboard(chain) else 0
            x = np.concatenate([audio, np.zeros((audio.shape[0], lat), np.float32)], axis=1) if lat else audio
            out = np.asarray(chain(x, rate, buffer_size=buffer_size, reset=reset), dtype=np.float32)
            if out.ndim == 1:
                out = out[None, :]
            if out.shape != x.shape:
                raise BadRequest(f"StemChain: the chain of stem {stem!r} returned shape {out.shape} for "
                                 f"input {x.shape}; a chain must return as many frames as it gets")
            out = out[:, lat:lat + n]
        gain = self._gain(stem)
        return out * np.float32(gain) if gain != 1.0 else np.ascontiguousarray(out)

    def _offline(self, audio: np.ndarray, rate: int, buffer_size: int) -> dict[str, np.ndarray]:
        stems = self.client.separate(audio, rate, self.model, **self.options)
        self._check_stems(list(stems))
        self.latency_samples = 0
        return {s: self._apply(s, stems[s], rate, buffer_size, reset=True, compensate=True) for s in self.stems}

    def _open_stream(self, rate: int, channels: int, buffer_size: int) -> None:
        if buffer_size < 1:
            raise BadRequest(f"StemChain: buffer_size must be >= 1, got {buffer_size}")
        stream = self.client.stream(self.model, rate, channels, **self.options)
        try:
            self._check_stems(stream.stems)
            lats = {s: chain_latency_samples(self.chains.get(s)) for s in self.stems}
        except BaseException:
            stream.cancel()
            raise
        self._chain_latency = max(lats.values(), default=0)
        self.latency_samples = stream.latency_samples + buffer_size - 1 + self._chain_latency
        self._skip = stream.latency_samples  # the engine's pre-roll: silence, not stem frames
        self._pending = {s: np.zeros((channels, 0), np.float32) for s in self.stems}
        # processed frames waiting to go out, after a silence that makes every stem's total delay
        # latency_samples (its chain adds lats[s] itself)
        self._ready = {s: np.zeros((channels, self.latency_samples - lats[s]), np.float32) for s in self.stems}
        self._frames_in = self._frames_out = 0
        self._stream, self._stream_key = stream, (rate, channels, buffer_size)

    def _take(self, stems: dict[str, np.ndarray]) -> None:
        """Queue the engine's output for the chains, without its pre-roll."""
        n = stems[self.stems[0]].shape[1]
        drop = min(self._skip, n)
        self._skip -= drop
        for s in self.stems:
            if n > drop:
                self._pending[s] = np.concatenate([self._pending[s], stems[s][:, drop:]], axis=1)

    def _run_blocks(self, rate: int, block: int) -> None:
        """Every whole block of queued stem frames through its chain (always ``block`` frames)."""
        for s in self.stems:
            pending = self._pending[s]
            whole = pending.shape[1] - pending.shape[1] % block
            if not whole:
                continue
            outs = [self._apply(s, np.ascontiguousarray(pending[:, a:a + block]), rate, block, reset=False)
                    for a in range(0, whole, block)]
            self._ready[s] = np.concatenate([self._ready[s], *outs], axis=1)
            self._pending[s] = pending[:, whole:]

    def _streaming(self, audio: np.ndarray, rate: int, buffer_size: int) -> dict[str, np.ndarray]:
        channels, n = audio.shape
        if self._stream is None:
            self._open_stream(rate, channels, buffer_size)
        elif self._stream_key[:2] != (rate, channels):
            raise BadRequest(f"StemChain: a stream at {self._stream_key[0]} Hz, {self._stream_key[1]} "
                             f"channel(s) is open; got {rate} Hz, {channels} channel(s) (call reset() first)")
        self._take(self._stream.process(audio))
        self._frames_in += n
        self._run_blocks(rate, self._stream_key[2])
        out = {}
        for s in self.stems:
            out[s], self._ready[s] = self._ready[s][:, :n], self._ready[s][:, n:]
        self._frames_out += n
        return out

    def _remix(self, stems: dict[str, np.ndarray]) -> np.ndarray:
        first = next(iter(stems.values()))
        total = np.zeros_like(first)
        for s in stems.values():
            total += s
        return total[0] if self._layout_1d else total
