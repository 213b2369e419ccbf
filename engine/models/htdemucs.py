"""The HT-Demucs family (HTDemucs, HDemucs, Demucs) through the demucs package's own model classes.

``DemucsAdapter`` wraps one demucs model so it fulfils the ``Separator`` contract of
``engine.models.base``; ``load_demucs_package`` reads one official checkpoint file (the pickled dict
``{'klass', 'args', 'kwargs', 'state', 'training_args'}`` written by ``demucs.states.serialize_model`` +
``save_with_checksum``) with ``torch.load(weights_only=True)`` and an explicit allow-list of globals;
``load_demucs_bag`` reads a demucs bag yaml (``demucs/remote/*.yaml``) into an ``engine.models.base.Bag``.

The sha256 of a file is checked by the weights store before any of these loaders runs.
"""
from __future__ import annotations

import inspect
import pickle
import re
import warnings
from fractions import Fraction
from numbers import Real
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import nn

from demucs.demucs import Demucs
from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs

from ..errors import CheckpointError
from .base import Bag
from .htdemucs_core import mha_fastpath, split_forward
from .htdemucs_cpu import fused_dconv, speed_up

__all__ = [
    "DEMUCS_MODEL_CLASSES",
    "DEMUCS_SAFE_GLOBALS",
    "DemucsAdapter",
    "DemucsPackageError",
    "load_demucs_bag",
    "load_demucs_package",
]

# The only classes a package's 'klass' may name.
DEMUCS_MODEL_CLASSES: tuple[type, ...] = (HTDemucs, HDemucs, Demucs)

# Everything an official demucs package needs beyond what torch's weights-only unpickler allows by
# default: the model class itself (the package stores the class object under 'klass') and
# fractions.Fraction (HTDemucs stores its training segment as Fraction(39, 5) in 'kwargs').
# Tensors, dicts, lists, tuples, str/int/float/bool/None are allowed by torch already.
DEMUCS_SAFE_GLOBALS: list = [*DEMUCS_MODEL_CLASSES, Fraction]

_PACKAGE_KEYS = {"klass", "args", "kwargs", "state"}
_OPTIONAL_PACKAGE_KEYS = {"training_args"}
_BAG_KEYS = {"models", "weights", "segment"}


class DemucsPackageError(CheckpointError, ValueError):
    """A verified demucs checkpoint or bag file whose content cannot be loaded (bad format, a class
    that is not a demucs model, missing/unexpected state keys). ``code`` is CheckpointError's."""


class DemucsAdapter(nn.Module):
    """A demucs ``HTDemucs`` / ``HDemucs`` / ``Demucs`` model as a ``Separator``.

    ``forward(mix [B, C, valid_length]) -> [B, S, C, valid_length]`` is the wrapped model's forward;
    the caller centre-trims to the frames it asked for, as ``demucs.apply.apply_model`` does.

    ``segment_s`` mirrors the ``segment=`` argument of ``demucs.apply.apply_model``: it sets the grid
    (``segment_frames``) and, for HTDemucs, the window fed to the network (``int(segment * samplerate)``;
    the network pads it on the right up to its training length itself). For HTDemucs it may not exceed
    the training segment. ``None`` uses the model's own ``segment``.

    The wrapped model is kept in eval mode whatever ``train()`` is called with: HTDemucs in training
    mode rewrites its ``segment`` from the input length, which inference must never do.
    """

    cpu_attention_fastpath = False  # True: demucs' own forward on the CPU too (the benchmark's "before")
    cpu_core = None  # an engine.models.onnx_core.OnnxCore: HTDemucs' network on onnxruntime (CPU, fp32)
    weights_path = None  # the package file it was loaded from (load_demucs_package), for onnx_core

    def __init__(self, model: nn.Module, name: str | None = None, segment_s: float | None = None,
                 default_overlap: float = 0.25):
        super().__init__()
        if not isinstance(model, DEMUCS_MODEL_CLASSES):
            raise TypeError(f"DemucsAdapter wraps HTDemucs, HDemucs or Demucs, not {type(model).__name__}")
        self.model = model
        self.name = name if name is not None else type(model).__name__.lower()
        self.sources = list(model.sources)
        self.sample_rate = int(model.samplerate)
        self.audio_channels = int(model.audio_channels)
        self.default_overlap = float(default_overlap)
        self._segment_override: float | None = None
        self.set_segment(segment_s)
        self.eval()
        speed_up(model)  # DConv branches in fewer passes on the CPU (htdemucs_cpu; state dict unchanged)

    # -- segment ----------------------------------------------------------------------------------
    @property
    def is_htdemucs(self) -> bool:
        return isinstance(self.model, HTDemucs)

    @property
    def training_frames(self) -> int | None:
        """HTDemucs' training length in samples (the longest input it accepts); None for the others."""
        if self.is_htdemucs and self.model.use_train_segment:
            return int(self.model.segment * self.model.samplerate)
        return None

    @property
    def max_segment_frames(self) -> int | None:
        return self.training_frames

    @property
    def segment_frames(self) -> int:
        """Default segment of the overlap-add grid: ``int(samplerate * segment)``, as demucs."""
        seg = self._segment_override if self._segment_override is not None else self.model.segment
        return int(self.model.samplerate * seg)

    @property
    def segment_s(self) -> float:
        """The segment in seconds the grid uses (the override, or the model's own ``segment``)."""
        seg = self._segment_override if self._segment_override is not None else self.model.segment
        return float(seg)

    def set_segment(self, segment_s: float | None) -> None:
        """Override the segment like ``demucs.apply.apply_model(segment=segment_s)``; None resets it."""
        if segment_s is None:
            self._segment_override = None
            return
        if isinstance(segment_s, bool) or not isinstance(segment_s, Real) or not segment_s > 0:
            raise ValueError(f"{self.name}: segment must be a positive number of seconds, got {segment_s!r}")
        frames = int(self.model.samplerate * segment_s)
        training = self.training_frames
        if training is not None and frames > training:  # compared in samples: robust to float rounding
            raise ValueError(
                f"{self.name}: segment {float(segment_s)} s exceeds the HTDemucs training segment "
                f"{float(self.model.segment)} s")
        self._segment_override = segment_s

    # -- Separator contract -----------------------------------------------------------------------
    def valid_length(self, frames: int) -> int:
        """The input length ``demucs.apply.apply_model`` feeds the network for a chunk of ``frames``.

        HTDemucs: ``int(segment * samplerate)`` when a segment override is set, else the model's
        ``valid_length`` (its training length; ValueError past it). HDemucs has no ``valid_length``:
        the chunk length itself. Demucs: ``model.valid_length(frames)``.
        """
        frames = int(frames)
        if frames <= 0:
            raise ValueError(f"{self.name}: frames must be positive, got {frames}")
        model = self.model
        if self.is_htdemucs:
            if self._segment_override is not None:
                length = int(self._segment_override * model.samplerate)
            else:
                length = model.valid_length(frames)
            training = self.training_frames
            if training is not None and frames > training:
                raise ValueError(
                    f"{self.name}: {frames} frames exceed the HTDemucs training length {training}")
            if frames > length:
                raise ValueError(
                    f"{self.name}: {frames} frames exceed the segment of {length} frames")
            return length
        if hasattr(model, "valid_length"):
            return int(model.valid_length(frames))
        return frames

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        if mix.dim() != 3 or mix.shape[1] != self.audio_channels:
            raise ValueError(
                f"{self.name}: expected mix [batch, {self.audio_channels}, frames], got {tuple(mix.shape)}")
        if mix.device.type != "cpu" or self.cpu_attention_fastpath:
            return self.model(mix)
        if self.cpu_core is not None and mix.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
            return split_forward(self.model, mix, self.cpu_core)  # --cpu-runtime onnx
        # On the CPU, nn.MultiheadAttention's fused inference path (torch._native_multi_head_attention,
        # in HTDemucs' cross-transformer) is slower than the plain ops for these shapes
        # (tests/bench/bench_cpu_paths.py) and agrees with them to ~1e-7 relative. The switch is
        # process-wide: set for this call and put back (the engine runs one forward at a time).
        # The DConv residual branches take their fused path (engine.models.htdemucs_cpu).
        with mha_fastpath(False), fused_dconv():
            return self.model(mix)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()
        return self

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, sources={self.sources}, sample_rate={self.sample_rate}, "
                f"segment_frames={self.segment_frames}, max_segment_frames={self.max_segment_frames}")


# -- loading ------------------------------------------------------------------------------------------
def _read_package(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(DEMUCS_SAFE_GLOBALS):
            package = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL (\S+)", str(exc))
        what = f"it references {found.group(1)}" if found else _first_line(exc)
        raise DemucsPackageError(
            f"{path}: refused to unpickle: {what}; a demucs package may only hold the demucs model "
            "classes, fractions.Fraction and tensors (diffq-quantized packages are not supported)") from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise DemucsPackageError(f"{path}: cannot read the checkpoint: {_first_line(exc)}") from exc
    return package


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_package(path: Path, package) -> None:
    if not isinstance(package, dict):
        raise DemucsPackageError(f"{path}: expected a demucs package dict, got {type(package).__name__}")
    missing = _PACKAGE_KEYS - package.keys()
    extra = package.keys() - _PACKAGE_KEYS - _OPTIONAL_PACKAGE_KEYS
    if missing or extra:
        raise DemucsPackageError(
            f"{path}: not a demucs package: missing keys {sorted(missing)}, unexpected keys "
            f"{sorted(map(str, extra))}")
    klass = package["klass"]
    if not (isinstance(klass, type) and klass in DEMUCS_MODEL_CLASSES):
        raise DemucsPackageError(
            f"{path}: 'klass' is {klass!r}, not one of the demucs model classes "
            f"{[k.__name__ for k in DEMUCS_MODEL_CLASSES]}")
    if not isinstance(package["args"], (list, tuple)):
        raise DemucsPackageError(f"{path}: 'args' must be a list or tuple")
    kwargs = package["kwargs"]
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise DemucsPackageError(f"{path}: 'kwargs' must be a dict with str keys")
    if not isinstance(package["state"], dict):
        raise DemucsPackageError(f"{path}: 'state' must be a dict")


def _build_model(path: Path, package: dict) -> nn.Module:
    klass, args, kwargs = package["klass"], list(package["args"]), dict(package["kwargs"])
    # Like demucs.states.load_model (its default): constructor arguments that the installed demucs no
    # longer knows are dropped with a warning. The weights are still loaded strictly below.
    params = inspect.signature(klass).parameters
    dropped = [k for k in kwargs if k not in params]
    for key in dropped:
        del kwargs[key]
    if dropped:
        warnings.warn(f"{path}: dropping constructor arguments unknown to {klass.__name__}: {dropped}")
    try:
        return klass(*args, **kwargs)
    except Exception as exc:  # a bad hyper-parameter combination
        raise DemucsPackageError(
            f"{path}: cannot build {klass.__name__} from the package arguments: {_first_line(exc)}") from exc


def _load_state(path: Path, model: nn.Module, state: dict) -> None:
    if state.get("__quantized"):
        raise DemucsPackageError(
            f"{path}: diffq-quantized demucs packages (e.g. mdx_q, mdx_extra_q) are not supported; "
            "use the non-quantized model")
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(str(k) for k in state if k not in expected)
    if missing or unexpected:
        raise DemucsPackageError(
            f"{path}: state does not match {type(model).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise DemucsPackageError(f"{path}: state entries that are not tensors: {sorted(bad)}")
    shapes = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
              for k, v in expected.items() if state[k].shape != v.shape]
    if shapes:
        raise DemucsPackageError(f"{path}: state shapes do not match the model: {shapes}")
    # Half-precision states (serialize_model's default half=True) are cast to the parameters' float32
    # by load_state_dict's copy, exactly as demucs.states.set_state does.
    model.load_state_dict(state, strict=True)


def _signature_of(path: Path) -> str:
    stem = path.stem
    return stem.rsplit("-", 1)[0] if "-" in stem else stem


def load_demucs_package(path: Path, device: str | torch.device = "cpu", name: str | None = None,
                        segment_s: float | None = None) -> DemucsAdapter:
    """Load one official demucs checkpoint file (``SIG-SHA8.th``) into a ``DemucsAdapter``.

    Unpickles with ``weights_only=True`` and only ``DEMUCS_SAFE_GLOBALS`` allowed; refuses any 'klass'
    that is not a demucs model class; loads the state strictly (missing/unexpected keys are listed in
    the error). ``name`` defaults to the file's signature (the part before the checksum).
    """
    path = Path(path)
    package = _read_package(path)
    _check_package(path, package)
    model = _build_model(path, package)
    _load_state(path, model, package["state"])
    del package
    model.to(device)
    model.eval()
    adapter = DemucsAdapter(model, name=name if name is not None else _signature_of(path), segment_s=segment_s)
    adapter.weights_path = path
    return adapter


def _parse_bag(yaml_path: Path) -> tuple[list[str], list[list[float]] | None, float | None]:
    try:
        bag = yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError as exc:
        raise DemucsPackageError(f"{yaml_path}: invalid yaml: {_first_line(exc)}") from exc
    if not isinstance(bag, dict):
        raise DemucsPackageError(f"{yaml_path}: a bag file is a mapping with 'models'")
    extra = set(map(str, bag)) - _BAG_KEYS
    if extra:
        raise DemucsPackageError(f"{yaml_path}: unknown keys {sorted(extra)} (allowed: {sorted(_BAG_KEYS)})")
    sigs = bag.get("models")
    if not isinstance(sigs, list) or not sigs or not all(isinstance(s, str) and s for s in sigs):
        raise DemucsPackageError(f"{yaml_path}: 'models' must be a non-empty list of signature strings")
    weights = bag.get("weights")
    if weights is not None:
        ok = isinstance(weights, list) and all(
            isinstance(row, list) and all(isinstance(w, Real) and not isinstance(w, bool) for w in row)
            for row in weights)
        if not ok:
            raise DemucsPackageError(f"{yaml_path}: 'weights' must be a list of lists of numbers")
        if len(weights) != len(sigs):
            raise DemucsPackageError(
                f"{yaml_path}: {len(weights)} weight rows for {len(sigs)} models")
        weights = [[float(w) for w in row] for row in weights]
    segment = bag.get("segment")
    if segment is not None:
        if isinstance(segment, bool) or not isinstance(segment, Real) or not segment > 0:
            raise DemucsPackageError(f"{yaml_path}: 'segment' must be a positive number of seconds")
    return sigs, weights, segment


def load_demucs_bag(yaml_path: Path, resolve: Callable[[str], Path],
                    device: str | torch.device = "cpu") -> Bag:
    """Load a demucs bag yaml (``models: [sigs]``, optional ``weights``, optional ``segment``).

    ``resolve(sig)`` returns the (already verified) checkpoint file of each signature. A ``segment``
    overrides each member's ``segment`` in place like ``demucs.apply.BagOfModels``: always for
    HDemucs/Demucs, and for HTDemucs only when it does not exceed the training segment.
    A signature listed twice shares one loaded model.
    """
    yaml_path = Path(yaml_path)
    sigs, weights, segment = _parse_bag(yaml_path)
    loaded: dict[str, nn.Module] = {}
    paths: dict[str, Path] = {}
    members = []
    for sig in sigs:
        if sig not in loaded:
            paths[sig] = Path(resolve(sig))
            loaded[sig] = load_demucs_package(paths[sig], device=device, name=sig).model
        model = loaded[sig]
        if segment is not None and (not isinstance(model, HTDemucs) or segment <= model.segment):
            model.segment = segment
        members.append(model)
    adapters = [DemucsAdapter(m, name=sig) for m, sig in zip(members, sigs)]
    for adapter, sig in zip(adapters, sigs):
        adapter.weights_path = paths[sig]
    try:
        return Bag(name=yaml_path.stem, members=adapters, weights=weights,
                   segment_s=None if segment is None else float(segment))
    except ValueError as exc:
        raise DemucsPackageError(f"{yaml_path}: {exc}") from exc
