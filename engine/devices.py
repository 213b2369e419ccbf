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


PRECISIONS = ("fp32", "bf16")
# Families whose bf16 output was checked on real weights (tests/bench/bench_precision.py: dev-set SDR
# within 0.05 dB of fp32). Others (HT-Demucs, RoFormer: random weights here) stay fp32.
BF16_VERIFIED_ATTR = "bf16_verified"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether ``device`` computes bf16 natively, a few words naming it). CPU: the avx512_bf16 or
    amx_bf16 flag on Linux (torch's own check elsewhere); CUDA: ``torch.cuda.is_bf16_supported``."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported()), f"CUDA device {torch.cuda.get_device_name(device)}"
    if device.type != "cpu":
        return False, f"device {device}"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        return bool({"avx512_bf16", "amx_bf16"} & set(flags)), "this CPU (no avx512_bf16 or amx_bf16)"
    except OSError:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "this CPU"


def precision_dtype(device: torch.device, precision: str | None, models) -> torch.dtype | None:
    """The autocast dtype for ``precision`` ("fp32" or None: None, float32; "bf16": torch.bfloat16)
    of ``models`` (Separators or Bags) on ``device``. Raises BadRequest, in one line, for another
    value, for a model whose bf16 output is not verified, and for a device without native bf16 (never
    a slow emulation chosen silently)."""
    if precision in (None, "fp32"):
        return None
    if precision != "bf16":
        raise BadRequest(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    unverified = [getattr(m, "name", type(m).__name__) for m in models if not getattr(m, BF16_VERIFIED_ATTR, False)]
    if unverified:
        raise BadRequest(f"precision bf16 is not verified for {', '.join(unverified)} (it is for spleeter-2stems: "
                         f"dev-set SDR within 0.05 dB of fp32); use fp32")
    ok, what = native_bf16(device)
    if not ok:
        raise BadRequest(f"precision bf16: {what} has no native bf16, and unbake does not emulate it "
                         f"(many times slower than fp32); use fp32")
    return torch.bfloat16


def pick_dtype(device: torch.device, fp16: bool) -> torch.dtype | None:
    """torch.float16 (autocast) when asked for on CUDA; None (float32) otherwise."""
    if fp16 and device.type != "cuda":
        raise BadRequest("--fp16 needs a CUDA device; on the CPU unbake computes in float32")
    return torch.float16 if fp16 else None
