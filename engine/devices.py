"""Device and precision selection: CUDA when there is one, else CPU; fp16 only where it helps."""
from __future__ import annotations

import torch

from .errors import BadRequest


def pick_device(name: str | None = None) -> torch.device:
    """None or "auto": cuda if available, else mps, else cpu. Raises BadRequest for an absent device."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadRequest(f"-d {name}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadRequest(f"-d {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadRequest(f"-d {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadRequest(f"-d {name}: MPS is not available on this machine")
    return device


def pick_dtype(device: torch.device, fp16: bool) -> torch.dtype | None:
    """torch.float16 (autocast) when asked for on CUDA; None (float32) otherwise."""
    if fp16 and device.type != "cuda":
        raise BadRequest("--fp16 needs a CUDA device; on the CPU unbake computes in float32")
    return torch.float16 if fp16 else None
