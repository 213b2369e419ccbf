"""The RoFormer family (BS-RoFormer, Mel-Band RoFormer) through the ``bs-roformer`` package's classes.

Checkpoints are in ZFTurbo's Music-Source-Separation-Training (MSST) format: a ``.ckpt`` that is
``torch.save`` of the model's state dict (sometimes wrapped as ``{"state_dict": ...}``) plus a yaml
config with the sections ``audio:``, ``model:`` (the constructor arguments), ``training:``
(``instruments``, ``target_instrument``) and ``inference:`` (``num_overlap``, ...). Public
checkpoints (viperx's BS-RoFormer, Kimberley Jensen's Mel-Band RoFormer) were trained with the
MSST / lucidrains 0.3-era model code; ``bs-roformer`` 1.2.x differs from it in three ways that
do not change the maths for those checkpoints but do change the module tree:

1. hyper-connections (``num_residual_streams``, default 4): set to 1 unless the yaml says
   otherwise. With 1 stream each residual block is ``branch(x) + x`` (exactly MSST's
   ``attn(x) + x``) but the block is wrapped in a ``hyper_connections.Residual``, whose
   ``branch.`` adds a level to every transformer key name.
2. learned value-residual mixing in every layer but the first (``to_value_residual_mix`` in
   BSRoformer, always on; ``add_value_residual=True`` in MelBandRoformer): MSST has none, so it is
   switched off (the BSRoformer submodules are removed, MelBandRoformer gets ``add_value_residual=False``).
3. MelBandRoformer always has a linear-attention slot at index 0 of each layer (``None`` when
   ``linear_transformer_depth`` is 0): MSST/Kim number the time and freq transformers 0 and 1.

``msst_to_package_key`` / ``package_to_msst_key`` translate key names between the two trees; the
state is then loaded STRICTLY: any missing, unexpected or mis-shaped key raises
``RoformerCheckpointError`` (a ``CheckpointError``) listing all of them in MSST's naming.

Sources: with ``training.target_instrument`` set (both public checkpoints: ``vocals``) the network
outputs that one stem and the adapter adds ``"instrumental"`` = mix - stem, as MSST's
``inference.py --extract_instrumental`` names it; otherwise the sources are ``training.instruments``.
"""
from __future__ import annotations

import inspect
import pickle
import re
from pathlib import Path

import torch
import yaml
from torch import nn

from ..errors import CheckpointError
from .roformer_cpu import speed_up

__all__ = [
    "RoformerCheckpointError",
    "RoformerSeparator",
    "build_network",
    "load_roformer",
    "msst_to_package_key",
    "package_to_msst_key",
    "read_config",
]

COMPLEMENT_SOURCE = "instrumental"  # MSST's name for mix - target_instrument

# model: keys of MSST-era configs that the bs-roformer classes do not take, and what to do with them.
# value None: ignored (training-only or a kernel choice that does not change the result);
# otherwise the only value the package can honour (anything else is refused).
_MSST_ONLY_KEYS: dict[str, object] = {
    "use_torch_checkpoint": None,  # gradient checkpointing: training only
    "sage_attention": None,        # an attention kernel: same maths as the default one
    "mlp_expansion_factor": 4,     # MaskEstimator's hidden width: the package hard-codes 4
    "skip_connection": False,      # MSST's extra residuals between layers: not in the package
}
# Keys MSST configs carry that are informative only (not constructor arguments anywhere).
_IGNORED_MODEL_KEYS = {"dim_freqs_in"}


class RoformerCheckpointError(CheckpointError, ValueError):
    """A verified RoFormer checkpoint or config that cannot be loaded; ``code`` is CheckpointError's."""


class _MsstYamlLoader(yaml.SafeLoader):
    """safe_load plus ``!!python/tuple`` (MSST configs write freqs_per_bands that way)."""


_MsstYamlLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- config -------------------------------------------------------------------------------------------
def read_config(yaml_path: Path) -> dict:
    """The yaml as a dict of sections; raises RoformerCheckpointError naming the file and the problem."""
    yaml_path = Path(yaml_path)
    try:
        cfg = yaml.load(yaml_path.read_text(), Loader=_MsstYamlLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise RoformerCheckpointError(f"{yaml_path}: invalid yaml: {_first_line(exc)}") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise RoformerCheckpointError(f"{yaml_path}: an MSST config needs a 'model:' mapping")
    for section in ("audio", "training", "inference"):
        if cfg.get(section) is None:
            cfg[section] = {}
        if not isinstance(cfg[section], dict):
            raise RoformerCheckpointError(f"{yaml_path}: '{section}:' must be a mapping")
    return cfg


def _family(model_cfg: dict) -> str:
    if "freqs_per_bands" in model_cfg:
        return "bs"
    if "num_bands" in model_cfg:
        return "mel"
    raise RoformerCheckpointError(
        "model: has neither freqs_per_bands (BS-RoFormer) nor num_bands (Mel-Band RoFormer)")


def _constructor_kwargs(where: str, model_cfg: dict, klass: type) -> dict:
    """yaml model: -> the package constructor's kwargs (see the module doc for the mapping)."""
    params = inspect.signature(klass.__init__).parameters
    kwargs, refused = {}, []
    for key, value in model_cfg.items():
        if key in _IGNORED_MODEL_KEYS or (key == "linear_transformer_depth" and key not in params):
            continue
        if key in _MSST_ONLY_KEYS and key not in params:
            need = _MSST_ONLY_KEYS[key]
            if need is not None and value != need:
                refused.append(f"{key}={value!r} (only {need!r} is supported)")
            continue
        if key not in params:
            refused.append(f"{key} (unknown to {klass.__name__})")
            continue
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    if klass.__name__ == "BSRoformer" and model_cfg.get("linear_transformer_depth", 0):
        refused.append("linear_transformer_depth > 0 (bs-roformer's BSRoformer has no linear attention)")
    if refused:
        raise RoformerCheckpointError(f"{where}: unsupported model settings: {'; '.join(refused)}")
    # Public (MSST-era) checkpoints have no hyper-connection weights: one residual stream unless
    # the yaml asks for more (a checkpoint trained with bs-roformer >= 1.0 itself).
    kwargs.setdefault("num_residual_streams", 1)
    if klass.__name__ == "MelBandRoformer":
        kwargs.setdefault("linear_transformer_depth", 0)  # MSST/Kim's default (the package's is 1)
        kwargs.setdefault("add_value_residual", kwargs["num_residual_streams"] != 1)
        kwargs["match_input_audio_length"] = True  # only sets istft's length: no weights involved
    return kwargs


def _msst_layout(net: nn.Module) -> bool:
    """True when the network is in the MSST key layout (one residual stream)."""
    return getattr(net, "_unbake_msst_layout", False)


def build_network(cfg: dict, where: str = "config") -> nn.Module:
    """A ``BSRoformer`` or ``MelBandRoformer`` built from an MSST config dict (random weights)."""
    from bs_roformer import BSRoformer, MelBandRoformer
    model_cfg = cfg["model"]
    family = _family(model_cfg)
    klass = BSRoformer if family == "bs" else MelBandRoformer
    kwargs = _constructor_kwargs(where, model_cfg, klass)
    try:
        net = klass(**kwargs)
    except Exception as exc:  # a bad hyper-parameter combination (beartype, asserts)
        raise RoformerCheckpointError(
            f"{where}: cannot build {klass.__name__} from model: {_first_line(exc)}") from exc
    msst = kwargs["num_residual_streams"] == 1
    if msst and family == "bs":
        # BSRoformer always adds learned value-residual mixing after the first layer; MSST has none.
        # Without the submodule, Attention.forward ignores the value residual: MSST's attention.
        for module in net.modules():
            if hasattr(module, "to_value_residual_mix"):
                module.to_value_residual_mix = None
    net._unbake_msst_layout = msst
    net._unbake_family = family
    net._unbake_linear = bool(kwargs.get("linear_transformer_depth", 0))
    return net.eval()


# -- key names ----------------------------------------------------------------------------------------
_MSST_BLOCK = re.compile(r"^layers\.(\d+)\.(\d+)\.layers\.(\d+)\.([01])\.(?!branch\.)(.+)$")
_MSST_NORM = re.compile(r"^layers\.(\d+)\.(\d+)\.(norm\..+)$")
_PKG_BLOCK = re.compile(r"^layers\.(\d+)\.(\d+)\.layers\.(\d+)\.([01])\.branch\.(.+)$")


def _shift(net: nn.Module) -> int:
    """MelBandRoformer without linear attention: package index = MSST index + 1."""
    return 1 if getattr(net, "_unbake_family", "") == "mel" and not getattr(net, "_unbake_linear", False) else 0


def msst_to_package_key(key: str, net: nn.Module) -> str:
    if not _msst_layout(net):
        return key
    shift = _shift(net)
    m = _MSST_BLOCK.match(key)
    if m:
        i, j, k, b, rest = m.groups()
        return f"layers.{i}.{int(j) + shift}.layers.{k}.{b}.branch.{rest}"
    m = _MSST_NORM.match(key)
    if m:
        i, j, rest = m.groups()
        return f"layers.{i}.{int(j) + shift}.{rest}"
    return key


def package_to_msst_key(key: str, net: nn.Module) -> str:
    if not _msst_layout(net):
        return key
    shift = _shift(net)
    m = _PKG_BLOCK.match(key)
    if m:
        i, j, k, b, rest = m.groups()
        return f"layers.{i}.{int(j) - shift}.layers.{k}.{b}.{rest}"
    m = _MSST_NORM.match(key)
    if m:
        i, j, rest = m.groups()
        return f"layers.{i}.{int(j) - shift}.{rest}"
    return key


def msst_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The network's state in MSST key names (what an MSST ``.ckpt`` holds)."""
    return {package_to_msst_key(k, net): v for k, v in net.state_dict().items()}


# -- the Separator ------------------------------------------------------------------------------------
class RoformerSeparator(nn.Module):
    """A ``BSRoformer`` / ``MelBandRoformer`` with its MSST config as a ``Separator``.

    segment_frames: ``chunk_size`` (the training length); default_overlap: MSST's step is
    ``chunk_size // num_overlap``, so overlap = 1 - 1 / num_overlap. The network takes any length
    (rotary positions), so ``max_segment_frames`` is None; ``valid_length`` feeds at least one
    full chunk (MSST always runs full chunks), rounded up to a multiple of the STFT hop.
    """

    def __init__(self, net: nn.Module, cfg: dict, name: str = "roformer"):
        super().__init__()
        self.net = net
        self.name = name
        model_cfg, audio, training, inference = cfg["model"], cfg["audio"], cfg["training"], cfg["inference"]
        self.audio_channels = int(net.audio_channels)
        channels = audio.get("num_channels")
        if channels is not None and int(channels) != self.audio_channels:
            raise RoformerCheckpointError(
                f"{name}: audio.num_channels={channels} but model.stereo gives {self.audio_channels}")
        self.sample_rate = int(audio.get("sample_rate", model_cfg.get("sample_rate", 44100)))
        chunk = audio.get("chunk_size", inference.get("chunk_size"))
        if chunk is None or int(chunk) <= 0:
            raise RoformerCheckpointError(f"{name}: no positive chunk_size in audio: or inference:")
        self.segment_frames = int(chunk)
        self.max_segment_frames = None
        num_overlap = inference.get("num_overlap", 4)
        if not (isinstance(num_overlap, int) and num_overlap >= 1):
            raise RoformerCheckpointError(f"{name}: inference.num_overlap must be an integer >= 1")
        self.default_overlap = 1.0 - 1.0 / num_overlap
        self.hop_frames = int(model_cfg.get("stft_hop_length", 512))
        instruments = list(training.get("instruments") or [])
        target = training.get("target_instrument")
        n_stems = int(net.num_stems)
        if target:
            if n_stems != 1:
                raise RoformerCheckpointError(
                    f"{name}: target_instrument={target!r} needs num_stems 1, got {n_stems}")
            self.sources = [str(target), COMPLEMENT_SOURCE]
            self.complement = True
        else:
            if len(instruments) != n_stems:
                raise RoformerCheckpointError(
                    f"{name}: training.instruments lists {len(instruments)} stems, the model has {n_stems}")
            self.sources = [str(s) for s in instruments]
            self.complement = False
        self.eval()

    def valid_length(self, frames: int) -> int:
        frames = int(frames)
        if frames <= 0:
            raise ValueError(f"{self.name}: frames must be positive, got {frames}")
        length = max(frames, self.segment_frames)
        return -(-length // self.hop_frames) * self.hop_frames

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        # mix: [batch, channels, frames]
        if mix.dim() != 3 or mix.shape[1] != self.audio_channels:
            raise ValueError(
                f"{self.name}: expected mix [batch, {self.audio_channels}, frames], got {tuple(mix.shape)}")
        batch, channels, frames = mix.shape
        pad = -frames % self.hop_frames  # BSRoformer's istft returns hop * (frames // hop) samples
        x = torch.nn.functional.pad(mix, (0, pad)) if pad else mix
        out = self.net(x)
        if out.dim() == 3:  # one stem: [batch, channels, samples]
            out = out.unsqueeze(1)
        assert out.shape[:3] == (batch, self.net.num_stems, channels), out.shape
        assert out.shape[-1] >= frames, (out.shape, frames)
        out = out[..., :frames]  # [batch, num_stems, channels, frames]
        if self.complement:
            out = torch.cat([out, mix.unsqueeze(1) - out], dim=1)
        assert out.shape == (batch, len(self.sources), channels, frames), out.shape
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()  # dropout stays off: inference only
        return self

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, sources={self.sources}, sample_rate={self.sample_rate}, "
                f"segment_frames={self.segment_frames}, default_overlap={self.default_overlap}")


# -- loading ------------------------------------------------------------------------------------------
def _read_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        raise RoformerCheckpointError(
            f"{path}: refused to unpickle (an MSST checkpoint holds tensors only): {_first_line(exc)}") from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise RoformerCheckpointError(f"{path}: cannot read the checkpoint: {_first_line(exc)}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RoformerCheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    bad = sorted(str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise RoformerCheckpointError(f"{path}: state entries that are not tensors: {bad}")
    return state


def _load_state(path: Path, net: nn.Module, state: dict) -> None:
    expected = msst_state_dict(net)  # MSST names -> tensors of the network
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} != model {tuple(v.shape)}"
                    for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if missing or unexpected or shapes:
        raise RoformerCheckpointError(
            f"{path}: state does not match {type(net).__name__} built from the yaml: "
            f"missing keys {missing}, unexpected keys {unexpected}, mis-shaped keys {shapes}")
    mapped = {msst_to_package_key(k, net): v for k, v in state.items()}
    net.load_state_dict(mapped, strict=True)  # half states are cast to the parameters' float32


def load_roformer(ckpt_path, yaml_path, device: str | torch.device = "cpu",
                  name: str | None = None) -> RoformerSeparator:
    """Load one MSST checkpoint + config pair into a ``RoformerSeparator`` (strictly).

    Raises RoformerCheckpointError (a CheckpointError) for a config the package cannot honour or a
    state whose keys or shapes do not match: the message lists every missing, unexpected and
    mis-shaped key (shapes shown). The caller verifies sha256 before this unpickles anything.
    """
    ckpt_path, yaml_path = Path(ckpt_path), Path(yaml_path)
    cfg = read_config(yaml_path)
    net = build_network(cfg, where=str(yaml_path))
    _load_state(ckpt_path, net, _read_state(ckpt_path))
    net.to(device)
    speed_up(net)  # float32 on the CPU: rotary embeddings and RMSNorm in fewer passes (roformer_cpu)
    return RoformerSeparator(net, cfg, name=name if name is not None else ckpt_path.stem)
