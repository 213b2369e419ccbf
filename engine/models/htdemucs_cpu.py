"""demucs' DConv residual branches on the CPU in fewer passes over memory (HTDemucs, HDemucs, Demucs v2).

Each layer of a ``demucs.demucs.DConv`` is ``x + LayerScale(GLU(GroupNorm(1, 2C)(Conv1d_1x1(GELU(
GroupNorm(1, H)(Conv1d(x)))))))``: a projection down to ``H = C / compress`` channels (6 in htdemucs'
first layer), then back up to ``2C`` (96), normalised over all of ``[2C, T]`` and gated down to ``C``.
On the CPU the ``[B, 2C, T]`` tensor (66 MB in htdemucs' first layer, batch = 512 frequency bins) is
written by the 1x1 convolution, read twice and written by the GroupNorm, read by the GLU and its half
written again, scaled and added: about a fifth of a segment's time in htdemucs.

Here that GroupNorm's statistics come from the small ``h [B, H, T]`` instead: with ``y = W h + b``,

    sum(y)   = (sum_c W_c) . S + T sum(b),                      S = sum_t h_t        [B, H]
    sum(y^2) = <W^T W, G> + 2 (b^T W) . S + T |b|^2,            G = sum_t h_t h_t^T  [B, H, H]

(in float64: no cancellation), so normalisation, affine, GLU halves and LayerScale fold into one
per-item weight ``W' [B, 2C, H]`` and bias ``c [B, 2C]``; the layer is then two batched matmuls, an
in-place sigmoid and one ``addcmul``: ``x + (W'_a h + c_a) * sigmoid(W'_g h + c_g)``. The big tensor
is never written. Same weights, within ~2e-7 relative of demucs' ops (tests/engine/test_dconv_cpu.py);
about half a DConv's time.

``speed_up(model)`` swaps the class of every DConv of the standard layout (GroupNorm, GELU, no LSTM
or local attention) for ``FusedDConv`` (parameters and state dict unchanged). Its ``forward`` takes
the fused path only inside ``fused_dconv()`` (``DemucsAdapter.forward`` on the CPU), for float32 CPU
tensors without autograd, autocast or an ONNX export; everywhere else, and for ``model(x)`` called
directly, it is demucs' own.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

from demucs.demucs import DConv
from demucs.transformer import LayerScale

__all__ = ["FusedDConv", "fused_dconv", "speed_up"]

_ACTIVE = contextvars.ContextVar("unbake_fused_dconv", default=False)


@contextlib.contextmanager
def fused_dconv():
    """Within the block (this thread or task only), swapped DConvs take the fused CPU path."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def fused_layer(layer: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """One DConv layer, ``x [B, C, T] -> x + branch(x) [B, C, T]``, the second GroupNorm from the
    statistics of ``h`` (see the module doc)."""
    conv1, norm1, act, conv2, norm2, _, scale = layer
    h = act(norm1(conv1(x)))                                  # [B, H, T]
    B, H, T = h.shape
    C2 = conv2.out_channels
    C = C2 // 2
    assert x.shape == (B, C, T), (x.shape, h.shape)           # the residual adds C channels
    w = conv2.weight.reshape(C2, H).double()                  # [2C, H]
    b = conv2.bias.double() if conv2.bias is not None else w.new_zeros(C2)
    hd = h.double()
    s = hd.sum(-1)                                            # [B, H]
    g = torch.bmm(hd, hd.transpose(1, 2))                     # [B, H, H]
    n = C2 * T
    mean = (s @ w.sum(0) + T * b.sum()) / n                   # [B]
    sq = (g * (w.t() @ w)).sum((1, 2)) + 2 * (s @ (w.t() @ b)) + T * (b * b).sum()
    var = (sq / n - mean * mean).clamp_min(0)
    a = norm2.weight.double() / torch.sqrt(var + norm2.eps)[:, None]           # [B, 2C]
    c = (b - mean[:, None]) * a + norm2.bias.double()                          # [B, 2C]
    layer_scale = torch.cat([scale.scale.double(), scale.scale.new_ones(C, dtype=torch.float64)])
    a, c = a * layer_scale, c * layer_scale                   # LayerScale on the GLU's value half
    # The bias as a column of the weight and a row of ones under h: a bias tensor broadcast by
    # baddbmm would first be copied into the [B, C, T] output.
    wp = torch.cat([a[:, :, None] * w, c[:, :, None]], 2).float()             # [B, 2C, H + 1]
    h1 = torch.cat([h, h.new_ones(B, 1, T)], 1)                               # [B, H + 1, T]
    value = torch.bmm(wp[:, :C], h1)                          # [B, C, T]
    gate = torch.bmm(wp[:, C:], h1).sigmoid_()                # [B, C, T]
    return torch.addcmul(x, value, gate)


class FusedDConv(DConv):
    """A ``DConv`` whose forward is ``fused_layer`` per layer inside ``fused_dconv()`` (float32, CPU,
    no autograd), demucs' own otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not _ACTIVE.get() or x.dim() != 3 or x.dtype != torch.float32 or x.device.type != "cpu"
                or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or torch.jit.is_tracing()
                or torch.onnx.is_in_onnx_export()):
            return super().forward(x)
        for layer in self.layers:
            x = fused_layer(layer, x)
        return x


def _standard(dconv: DConv) -> bool:
    """Every layer is [Conv1d, GroupNorm(1, H), GELU, Conv1d 1x1 (H -> 2C), GroupNorm(1, 2C), GLU(1),
    LayerScale (channels first)]: no LSTM, local attention, ReLU or missing norm."""
    for layer in dconv.layers:
        mods = list(layer)
        if [type(m) for m in mods] != [nn.Conv1d, nn.GroupNorm, nn.GELU, nn.Conv1d, nn.GroupNorm, nn.GLU,
                                       LayerScale]:
            return False
        conv1, norm1, act, conv2, norm2, glu, scale = mods
        if (norm1.num_groups != 1 or norm2.num_groups != 1 or not norm2.affine or act.approximate != "none"
                or conv2.kernel_size != (1,) or conv2.stride != (1,) or conv2.padding != (0,) or conv2.groups != 1
                or conv2.out_channels != 2 * dconv.channels
                or glu.dim != 1 or scale.channel_last):
            return False
    return True


def speed_up(model: nn.Module) -> int:
    """Swap every standard DConv in ``model`` for ``FusedDConv`` (in place; the state dict does not
    change). Returns how many were swapped."""
    n = 0
    for module in model.modules():
        if type(module) is DConv and _standard(module):
            module.__class__ = FusedDConv
            n += 1
    return n
