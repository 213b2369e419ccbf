"""BS-/Mel-RoFormer on the CPU: the same network, two memory-bound steps in fewer passes.

On the CPU, a RoFormer forward spends a quarter of its time in elementwise passes over the
attention's queries and keys and the transformer's activations (tests/bench/bench_cpu_paths.py
--roformer), not in its matmuls:

* rotary embeddings (``rotary_embedding_torch.apply_rotary_emb``): ``t * cos * 1 + rotate_half(t) *
  sin * 1`` and a ``cat``, eight passes over each of q and k; here one complex multiply of the
  (even, odd) pairs by ``cos + i sin`` (the same rotation: (x1 cos - x2 sin, x2 cos + x1 sin));
* ``RMSNorm``: ``normalize(x) * scale * gamma``, four passes after the norm; here two.

``speed_up(net)`` swaps the classes of those submodules for subclasses (the parameters, buffers
and state dict do not change) whose ``forward`` takes these paths for float32 tensors on the CPU
and is the library's own everywhere else (CUDA, half precision, xpos, offsets). The output is
within ~1e-6 relative of the library's (tests/engine/test_roformer_cpu.py).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["speed_up"]

_SUBCLASSES: dict[type, type] = {}


def _fast_path(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu"


def _rotate(self, t: torch.Tensor, seq_dim=None, offset=0, scale=None) -> torch.Tensor:
    """``RotaryEmbedding.rotate_queries_or_keys``: t [batch, heads, n, d] rotated by position."""
    seq_dim = self.default_seq_dim if seq_dim is None else seq_dim
    if (not _fast_path(t) or seq_dim != -2 or offset != 0 or scale not in (None, 1, 1.0) or self.use_xpos
            or t.shape[-1] % 2):
        return super(type(self), self).rotate_queries_or_keys(t, seq_dim=seq_dim, offset=offset, scale=scale)
    n, d = t.shape[-2], t.shape[-1]
    freqs = self.forward(self.get_seq_pos(n, device=t.device, dtype=t.dtype), seq_len=n)  # [n, rot]
    if freqs.shape != (n, d):  # a partial rotation: the library's path
        return super(type(self), self).rotate_queries_or_keys(t, seq_dim=seq_dim, offset=offset, scale=scale)
    angle = freqs[:, ::2]  # [n, d/2]: each pair's angle (the library repeats it for both halves)
    rot = torch.complex(angle.cos(), angle.sin())
    if t.stride(-1) != 1 or t.storage_offset() % 2 or any(s % 2 for s in t.stride()[:-1]):
        t = t.clone(memory_format=torch.contiguous_format)  # contiguous() keeps an odd storage offset
    out = torch.view_as_complex(t.unflatten(-1, (d // 2, 2))) * rot  # [batch, heads, n, d/2]
    return torch.view_as_real(out).flatten(-2)


def _rms_norm(self, x: torch.Tensor) -> torch.Tensor:
    """``RMSNorm``: ``F.normalize(x, dim=-1) * scale * gamma``, x [..., dim]."""
    if not _fast_path(x) or not _fast_path(self.gamma):
        return super(type(self), self).forward(x)
    inv = self.scale / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps
    return (x * inv).mul_(self.gamma)


def _subclass(cls: type, attrs: dict) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Cpu{cls.__name__}", (cls,), {**attrs, "__module__": __name__})
    return _SUBCLASSES[cls]


def speed_up(net: nn.Module) -> int:
    """Give ``net``'s rotary embeddings and RMSNorms (of bs-roformer's BSRoformer or MelBandRoformer)
    the CPU paths above. Idempotent; returns how many submodules were swapped."""
    from rotary_embedding_torch import RotaryEmbedding
    from bs_roformer import bs_roformer, mel_band_roformer
    norms = {bs_roformer.RMSNorm, mel_band_roformer.RMSNorm}
    n = 0
    for m in net.modules():
        cls = type(m)
        if cls is RotaryEmbedding:
            m.__class__ = _subclass(cls, {"rotate_queries_or_keys": _rotate})
        elif cls in norms:
            m.__class__ = _subclass(cls, {"forward": _rms_norm})
        else:
            continue
        n += 1
    return n
