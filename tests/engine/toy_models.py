"""Small real separators for testing the application layer (not fakes of the engine: real nn.Modules)."""
import torch
from torch import nn


class ConvSeparator(nn.Module):
    """Two sources from a random-weight 1-D conv net; needs `pad` frames of context each side.

    forward: [batch, channels, frames] -> [batch, 2, channels, frames]
    """
    name = "toy-conv"
    sources = ["low", "high"]
    sample_rate = 8000
    audio_channels = 2
    default_overlap = 0.25

    def __init__(self, segment_frames=1000, pad=0, seed=0, max_segment_frames=None):
        super().__init__()
        torch.manual_seed(seed)
        self.segment_frames = segment_frames
        self.max_segment_frames = max_segment_frames
        self.pad = pad
        self.conv = nn.Conv1d(2, 4, 2 * pad + 1, padding=pad)

    def valid_length(self, frames):
        return frames + 2 * self.pad

    def forward(self, mix):
        b, c, t = mix.shape
        y = torch.tanh(self.conv(mix))
        return y.view(b, 2, c, t)


class FixedWindowSeparator(ConvSeparator):
    """Like HTDemucs: always takes a window of exactly `segment_frames` (its training length)."""
    name = "toy-fixed"

    def __init__(self, segment_frames=1000, seed=0):
        super().__init__(segment_frames, pad=3, seed=seed, max_segment_frames=segment_frames)

    def valid_length(self, frames):
        if frames > self.segment_frames:
            raise ValueError("too long")
        return self.segment_frames


class ReflectConvSeparator(ConvSeparator):
    """ConvSeparator whose windows hold the track mirrored past its ends (``pad_mode``)."""
    name = "toy-conv-reflect"
    pad_mode = "reflect"


class ReflectFixedWindowSeparator(FixedWindowSeparator):
    """FixedWindowSeparator (a short track sits centred in one long window), mirrored padding."""
    name = "toy-fixed-reflect"
    pad_mode = "reflect"


class WindowMeanSeparator(nn.Module):
    """Every output frame depends on the whole window (like a U-Net's bottleneck): sources are the
    input plus / minus the window's mean per channel. forward: [b, c, t] -> [b, 2, c, t]."""
    name = "toy-window-mean"
    sources = ["plus", "minus"]
    sample_rate = 8000
    audio_channels = 2
    default_overlap = 0.25
    max_segment_frames = None

    def __init__(self, segment_frames=800, pad_mode="zeros"):
        super().__init__()
        self.segment_frames = segment_frames
        self.pad_mode = pad_mode

    def valid_length(self, frames):
        return frames

    def forward(self, mix):
        mean = mix.mean(dim=-1, keepdim=True)
        return torch.stack([mix + mean, mix - mean], dim=1)
