"""Pure audio helpers: validation, channel and rate conversion. Arrays are float32
[channels, frames]; nothing here works in place or keeps a statistic over a whole track.
"""
from __future__ import annotations

import numpy as np

from .errors import BadAudio

MAX_CHANNELS = 2  # the models separate mono (duplicated) or stereo


def validate(block: np.ndarray, where: str, first_frame: int = 0, sample_rate: int | None = None) -> np.ndarray:
    """Check a block of audio and return it as float32 C-contiguous [channels, frames].

    Raises BadAudio naming ``where`` and the time of the first NaN/Inf sample.
    """
    block = np.asarray(block)
    if block.ndim != 2:
        raise BadAudio(f"{where}: audio must be [channels, frames], got shape {block.shape}")
    if block.shape[0] < 1 or block.shape[0] > MAX_CHANNELS:
        raise BadAudio(f"{where}: {block.shape[0]} channels; unbake separates mono or stereo audio "
                       f"(downmix it first)")
    if not np.issubdtype(block.dtype, np.floating):
        raise BadAudio(f"{where}: audio must be floating point, got {block.dtype}")
    block = np.ascontiguousarray(block, dtype=np.float32)
    finite = np.isfinite(block)
    if not finite.all():
        frame = first_frame + int(np.argwhere(~finite)[:, 1].min())  # earliest, any channel
        when = f" ({frame / sample_rate:.3f} s)" if sample_rate else ""
        raise BadAudio(f"{where}: NaN or Inf sample at frame {frame}{when}")
    return block


def to_channels(block: np.ndarray, channels: int) -> np.ndarray:
    """[c, n] -> [channels, n]: mono is duplicated, equal counts are copied."""
    if block.shape[0] == channels:
        return block.copy()
    if block.shape[0] == 1:
        return np.repeat(block, channels, axis=0)
    raise BadAudio(f"cannot turn {block.shape[0]} channels into {channels}")


def from_channels(block: np.ndarray, channels: int) -> np.ndarray:
    """[..., c, n] -> [..., channels, n]: back to mono by averaging, else copied."""
    if block.shape[-2] == channels:
        return block.copy()
    if channels == 1:
        return block.mean(axis=-2, keepdims=True)
    raise BadAudio(f"cannot turn {block.shape[-2]} channels into {channels}")


# The resampler's kernel has ``new * (2 * width + old)`` taps for the rate ratio new/old in lowest
# terms (julius.ResampleFrac), so its cost grows with the reduced fraction: 44,056 Hz -> 44,100 Hz is
# 11014/11025 (1.9 GB to build), 767,999 Hz about 250 GiB. Terms above this are approximated.
MAX_RATIO_TERM = 1000  # every pair of the common rates (8k..192k against 44.1k/48k) is <= 640


def ratio_terms(source_rate: int, target_rate: int, max_term: int = MAX_RATIO_TERM) -> tuple[int, int]:
    """(old, new): the conversion ratio target_rate / source_rate (ints, Hz, > 0) as a fraction
    new/old whose terms are at most ``max_term`` (int, default MAX_RATIO_TERM).

    Exact (the fraction in lowest terms) where its terms fit, as for every pair of the common rates
    (8000, 16000, 22050, 32000, 44100, 48000, 88200, 96000, 176400, 192000 Hz); else the closest
    fraction with terms <= max_term (``Fraction.limit_denominator`` on the side that is larger):
    over every rate in [1000, 768000] Hz against 44.1 and 48 kHz, within 5.1e-4 of the true ratio
    (749,320 Hz -> 17/1), mostly within 1e-6. The audio then reaches the model at a rate that far
    from its own (under one cent of pitch), and the way back uses the inverse fraction, so stems
    stay exactly aligned with the input and keep its length.
    Raises ValueError for rates < 1."""
    from fractions import Fraction
    if source_rate < 1 or target_rate < 1 or max_term < 1:
        raise ValueError(f"sample rates must be >= 1 Hz, got {source_rate} -> {target_rate}")
    ratio = Fraction(int(target_rate), int(source_rate))
    if max(ratio.numerator, ratio.denominator) <= max_term:
        return ratio.denominator, ratio.numerator
    if ratio >= 1:  # new > old: bound new (the denominator of old/new)
        inv = (1 / ratio).limit_denominator(max_term)
        return max(1, inv.numerator), inv.denominator
    approx = ratio.limit_denominator(max_term)
    return approx.denominator, max(1, approx.numerator)


class Resampler:
    """Streaming, exactly aligned sample-rate conversion (julius' windowed-sinc kernels, which ship
    with demucs), identity when the rates match. The ratio is ``ratio_terms``: exact for the common
    rates, a fraction with terms <= MAX_RATIO_TERM otherwise, so the kernel never exceeds about
    1000 x 1050 taps (4 MB) whatever the rates.

    ``process(block [c, n]) -> [c, m]`` and ``flush() -> [c, m]``. Output frame j sits at input time
    j * source_rate / target_rate exactly (zero phase), whatever the block sizes; zeros are assumed
    before the first and after the last input frame. pedalboard's StreamResampler was measured to
    shift by up to 0.44 frame for some rate pairs, which is why it is not used here.
    Memory is constant: only the kernel's context is kept.
    """

    def __init__(self, source_rate: int, target_rate: int, channels: int):
        self.old, self.new = ratio_terms(int(source_rate), int(target_rate))
        # equal rates, or rates within 1/2000 of each other where no fraction with terms <= 1000
        # is closer than 1/1 (44,078 Hz against 44,100 Hz): no conversion at all
        self.identity = self.old == self.new
        self.channels = channels
        if self.identity:
            return
        import julius
        import torch
        r = julius.ResampleFrac(self.old, self.new)
        self.kernel = r.kernel.float()  # [new, 1, 2 * width + old]
        self.width = r._width
        self._torch = torch
        self.buf = np.zeros((channels, self.width), np.float32)  # input from buf_start
        self.buf_start = -self.width  # zeros before the track
        self.received = 0
        self.next_block = 0  # output frames [next_block * new, ...) not yet produced

    def _blocks(self, upto_block: int) -> np.ndarray:
        i0, i1 = self.next_block, upto_block
        if i1 <= i0:
            return np.zeros((self.channels, 0), np.float32)
        lo, hi = i0 * self.old - self.width, i1 * self.old + self.width
        x = self.buf[:, lo - self.buf_start:hi - self.buf_start]
        assert x.shape[1] == hi - lo, (x.shape, lo, hi)
        torch = self._torch
        y = torch.nn.functional.conv1d(torch.from_numpy(np.ascontiguousarray(x))[:, None], self.kernel,
                                       stride=self.old)  # [channels, new, blocks]
        self.next_block = i1
        keep = i1 * self.old - self.width - self.buf_start
        self.buf, self.buf_start = self.buf[:, keep:], self.buf_start + keep
        return y.transpose(1, 2).reshape(self.channels, -1).numpy()

    def process(self, block: np.ndarray) -> np.ndarray:
        if self.identity:
            return block
        self.buf = np.concatenate([self.buf, np.asarray(block, np.float32)], axis=1)
        self.received += block.shape[1]
        return self._blocks((self.received - self.width) // self.old)

    def flush(self) -> np.ndarray:
        """The rest: output frames up to ceil(received * target / source)."""
        if self.identity:
            return np.zeros((self.channels, 0), np.float32)
        total = -(-self.received * self.new // self.old)
        blocks = -(-total // self.new)
        pad = blocks * self.old + self.width - (self.buf_start + self.buf.shape[1])
        self.buf = np.concatenate([self.buf, np.zeros((self.channels, max(pad, 0)), np.float32)], axis=1)
        out = self._blocks(blocks)
        return out[:, :out.shape[1] - (blocks * self.new - total)]


def sdr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Global SDR in dB over the whole clip: 10 log10(sum s^2 / sum (s - s_hat)^2)."""
    reference = np.asarray(reference, np.float64)
    estimate = np.asarray(estimate, np.float64)
    num = np.sum(reference ** 2)
    den = np.sum((reference - estimate) ** 2)
    return float(10 * np.log10((num + 1e-12) / (den + 1e-12)))
