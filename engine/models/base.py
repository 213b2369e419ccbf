"""The contract every separation model adapter fulfils, so ``engine.apply`` can stay model-agnostic.

A ``Separator`` is a ``torch.nn.Module`` with these attributes::

    name: str                  catalog name, e.g. "spleeter-2stems"
    sources: list[str]         stem names, in output order
    sample_rate: int           Hz; audio is resampled to it before the model sees it
    audio_channels: int        channels the network takes (mono input is duplicated by engine.audio)
    segment_frames: int        default segment length of the overlap-add grid, in samples
    max_segment_frames: int | None   longest segment the network accepts (None: no limit)
    default_overlap: float     default overlap between segments, fraction of segment_frames
    pad_mode: str              optional, "zeros" (default) or "reflect": what a network window holds
                               outside the track (engine.apply)

and two methods::

    valid_length(frames) -> int
        The input length the network needs to produce ``frames`` output samples (>= frames).
        ``engine.apply`` feeds a window of that length centred on the chunk, taking real
        context from the track where it exists and, past its ends, zeros (demucs' TensorChunk
        rule) or the track mirrored at its ends (``pad_mode = "reflect"``).
    forward(mix) -> Tensor
        mix: float32 [batch, audio_channels, valid_length]
        returns float32 [batch, len(sources), audio_channels, valid_length]
        Each batch item is independent (no statistic across the batch), so batching changes
        nothing but speed.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Separator(Protocol):
    name: str
    sources: list[str]
    sample_rate: int
    audio_channels: int
    segment_frames: int
    max_segment_frames: int | None
    default_overlap: float

    def valid_length(self, frames: int) -> int: ...

    def __call__(self, mix: torch.Tensor) -> torch.Tensor: ...


class Bag(torch.nn.Module):
    """Several separators with the same sources, averaged per source with fixed weights
    (demucs' bag of models, e.g. htdemucs_ft).

    members: list of Separators sharing ``sources``, ``sample_rate`` and ``audio_channels``.
    weights: [len(members)][len(sources)] floats; None means all ones.
    ``engine.apply`` runs each member on its own grid and returns
    sum_m weights[m][s] * out_m[s] / sum_m weights[m][s] for every source s.
    """

    def __init__(self, name: str, members: list, weights: list[list[float]] | None = None,
                 segment_s: float | None = None):
        super().__init__()
        if not members:
            raise ValueError(f"bag {name!r} has no members")
        first = members[0]
        for m in members[1:]:
            if (m.sources, m.sample_rate, m.audio_channels) != (
                    first.sources, first.sample_rate, first.audio_channels):
                raise ValueError(f"bag {name!r}: members disagree on sources, sample rate or channels")
        if weights is None:
            weights = [[1.0] * len(first.sources) for _ in members]
        if len(weights) != len(members) or any(len(w) != len(first.sources) for w in weights):
            raise ValueError(f"bag {name!r}: weights must be [{len(members)}][{len(first.sources)}]")
        self.name = name
        self.members = torch.nn.ModuleList(members)
        self.weights = [list(map(float, w)) for w in weights]
        self.sources = list(first.sources)
        self.sample_rate = first.sample_rate
        self.audio_channels = first.audio_channels
        self.segment_s = segment_s
