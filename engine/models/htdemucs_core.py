"""HTDemucs' forward split at the spectrogram: torch's STFT/iSTFT outside, the network in between.

``HTDemucsCore`` is the part of ``demucs.htdemucs.HTDemucs.forward`` between ``_magnitude`` and
``_mask``: both branches' normalisation, the encoders, the cross-transformer and the decoders. It has
no complex numbers and no STFT, so it can be exported (``engine.models.onnx_core``) while the STFT
and iSTFT stay in torch, as OpenVINO's Audacity plugin and demucs-onnx do. ``split_forward`` is the
whole forward rebuilt from the three parts; with ``core=HTDemucsCore(model)`` it is demucs' forward
op for op (tests/engine/test_onnx_core.py).

``precise=True`` computes every mean and variance one axis at a time (the GroupNorms included), so a
runtime whose fp32 reductions sum millions of elements naively (onnxruntime) stays within ~1e-5 of
torch; the export uses it. Eager torch runs ``precise=False``, demucs' own ops.
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from demucs.htdemucs import HTDemucs
from demucs.transformer import MyGroupNorm

__all__ = ["HTDemucsCore", "mha_fastpath", "split_forward", "spec_in"]


@contextlib.contextmanager
def mha_fastpath(enabled: bool):
    """nn.MultiheadAttention's fused inference path on or off (a process-wide switch) for the block,
    put back after. Off: the plain ops (faster on the CPU for HTDemucs' shapes; the only ones that
    export to ONNX)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _mean(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Mean over ``dims`` (keepdim), one axis at a time from the last."""
    for d in sorted(dims, reverse=True):
        x = x.mean(dim=d, keepdim=True)
    return x


def _mean_std(x: torch.Tensor, dims: tuple[int, ...], precise: bool):
    """(mean, unbiased std) over ``dims``, keepdim, as ``x.mean``/``x.std`` in demucs."""
    if not precise:
        return x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True)
    mean = _mean(x, dims)
    n = 1
    for d in dims:
        n *= x.shape[d]
    var = _mean((x - mean) ** 2, dims) * (n / (n - 1))
    return mean, var.sqrt()


def _precise_group_norm(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``nn.GroupNorm.forward`` (x [B, C, *]) with its statistics reduced one axis at a time."""
    if isinstance(self, MyGroupNorm):  # x [B, T, C]: demucs' transformer norm over (T, C)
        return _group_norm(self, x.transpose(1, 2)).transpose(1, 2)
    return _group_norm(self, x)


# Below this many elements per group a GroupNorm keeps its own op (onnxruntime's InstanceNormalization
# is precise enough there, and one op is faster than the decomposition).
PRECISE_MIN_ELEMENTS = 1 << 16


def _group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    B, C = x.shape[:2]
    rest = x.shape[2:]
    g = norm.num_groups
    if x[0].numel() // g < PRECISE_MIN_ELEMENTS:  # shapes are static in an export
        return F.group_norm(x, g, norm.weight, norm.bias, norm.eps)
    y = x.reshape(B, g, C // g, *rest)
    dims = tuple(range(2, y.dim()))
    mean = _mean(y, dims)
    var = _mean((y - mean) ** 2, dims)
    y = ((y - mean) / torch.sqrt(var + norm.eps)).reshape(x.shape)
    if norm.affine:
        shape = (1, C) + (1,) * len(rest)
        y = y * norm.weight.reshape(shape) + norm.bias.reshape(shape)
    return y


class HTDemucsCore(nn.Module):
    """The network of one ``HTDemucs`` between its spectrogram and its mask.

    ``forward(mag [B, 2*C, Fq, T], mix [B, C, L]) -> (x [B, S, 2*C, Fq, T], xt [B, S, C, L])``:
    ``mag`` is ``model._magnitude(model._spec(mix))`` (complex-as-channels), ``mix`` the (padded)
    input; ``x`` is the frequency branch's output before ``_mask``, ``xt`` the time branch's, both
    de-normalised. Shares the wrapped model's parameters (no copy).

    ``precise``: reductions one axis at a time, GroupNorms included (for export; see the module doc).
    """

    def __init__(self, model: HTDemucs, precise: bool = False):
        super().__init__()
        if not isinstance(model, HTDemucs):
            raise TypeError(f"HTDemucsCore wraps HTDemucs, not {type(model).__name__}")
        self.model = model
        self.precise = bool(precise)

    def forward(self, mag: torch.Tensor, mix: torch.Tensor):
        m = self.model
        B, C, Fq, T = mag.shape
        length = mix.shape[-1]
        with _group_norms_precise(m, self.precise):
            mean, std = _mean_std(mag, (1, 2, 3), self.precise)
            x = (mag - mean) / (1e-5 + std)
            meant, stdt = _mean_std(mix, (1, 2), self.precise)
            xt = (mix - meant) / (1e-5 + stdt)
            x, xt = _branches(m, x, xt)
        S = len(m.sources)
        x = x.view(B, S, -1, Fq, T)
        x = x * std[:, None] + mean[:, None]
        xt = xt.view(B, S, -1, length)
        xt = xt * stdt[:, None] + meant[:, None]
        return x, xt


class _group_norms_precise:
    """Context: every GroupNorm of ``model`` uses ``_precise_group_norm`` (instance attribute), if on."""

    def __init__(self, model: nn.Module, on: bool):
        self.norms = [mod for mod in model.modules() if isinstance(mod, nn.GroupNorm)] if on else []

    def __enter__(self):
        for norm in self.norms:
            norm.forward = types.MethodType(_precise_group_norm, norm)

    def __exit__(self, *exc):
        for norm in self.norms:
            del norm.forward


def _branches(m: HTDemucs, x: torch.Tensor, xt: torch.Tensor):
    """Encoders, cross-transformer and decoders of ``HTDemucs.forward`` (demucs 4.0.1), unchanged."""
    x, xt, saved, saved_t, lengths, lengths_t = encode(m, x, xt)
    x, xt = transform(m, x, xt)
    return decode(m, x, xt, saved, saved_t, lengths, lengths_t)


def encode(m: HTDemucs, x: torch.Tensor, xt: torch.Tensor):
    """The encoders: (x, xt, saved, saved_t, lengths, lengths_t), the skips as lists of tensors."""
    saved, saved_t, lengths, lengths_t = [], [], [], []
    for idx, encode_layer in enumerate(m.encoder):
        lengths.append(x.shape[-1])
        inject = None
        if idx < len(m.tencoder):
            lengths_t.append(xt.shape[-1])
            tenc = m.tencoder[idx]
            xt = tenc(xt)
            if not tenc.empty:
                saved_t.append(xt)
            else:
                inject = xt
        x = encode_layer(x, inject)
        if idx == 0 and m.freq_emb is not None:
            frs = torch.arange(x.shape[-2], device=x.device)
            emb = m.freq_emb(frs).t()[None, :, :, None].expand_as(x)
            x = x + m.freq_emb_scale * emb
        saved.append(x)
    return x, xt, saved, saved_t, lengths, lengths_t


def transform(m: HTDemucs, x: torch.Tensor, xt: torch.Tensor):
    """The cross-transformer between the branches (with its channel up/down samplers)."""
    if m.crosstransformer:
        if m.bottom_channels:
            b, c, f, t = x.shape
            x = m.channel_upsampler(x.reshape(b, c, f * t)).reshape(b, -1, f, t)
            xt = m.channel_upsampler_t(xt)
        x, xt = m.crosstransformer(x, xt)
        if m.bottom_channels:
            b, c, f, t = x.shape
            x = m.channel_downsampler(x.reshape(b, c, f * t)).reshape(b, -1, f, t)
            xt = m.channel_downsampler_t(xt)
    return x, xt


def decode(m: HTDemucs, x, xt, saved: list, saved_t: list, lengths: list, lengths_t: list):
    """The decoders; consumes (pops) the skip and length lists ``encode`` returned."""
    for idx, decode_layer in enumerate(m.decoder):
        skip = saved.pop(-1)
        x, pre = decode_layer(x, skip, lengths.pop(-1))
        offset = m.depth - len(m.tdecoder)
        if idx >= offset:
            tdec = m.tdecoder[idx - offset]
            length_t = lengths_t.pop(-1)
            if tdec.empty:
                pre = pre[:, :, 0]
                xt, _ = tdec(pre, None, length_t)
            else:
                xt, _ = tdec(xt, saved_t.pop(-1), length_t)
    return x, xt


def spec_in(model: HTDemucs, mix: torch.Tensor):
    """(padded mix [B, C, L], z complex spectrogram, mag [B, 2*C, Fq, T], length before padding)."""
    length_pre_pad = None
    if model.use_train_segment:
        training_length = int(model.segment * model.samplerate)
        if mix.shape[-1] < training_length:
            length_pre_pad = mix.shape[-1]
            mix = F.pad(mix, (0, training_length - length_pre_pad))
    z = model._spec(mix)
    mag = model._magnitude(z).to(mix.device)
    return mix, z, mag, length_pre_pad


def split_forward(model: HTDemucs, mix: torch.Tensor,
                  core: Callable[[torch.Tensor, torch.Tensor], tuple]) -> torch.Tensor:
    """``HTDemucs.forward(mix [B, C, L]) -> [B, S, C, L]`` (eval mode) with the network run by
    ``core(mag, padded_mix) -> (x, xt)`` (an ``HTDemucsCore`` or an exported one)."""
    mix, z, mag, length_pre_pad = spec_in(model, mix)
    x, xt = core(mag, mix)
    assert x.dim() == 5 and xt.dim() == 4, (x.shape, xt.shape)  # [B, S, 2C, Fq, T], [B, S, C, L]
    zout = model._mask(z, x)
    out = model._ispec(zout, mix.shape[-1]) + xt
    if length_pre_pad:
        out = out[..., :length_pre_pad]
    return out
