"""Small randomly initialised demucs models written in exactly the official package format.

The official checkpoints (``SIG-SHA8.th``) are ``torch.save`` of the dict made by
``demucs.states.serialize_model`` (``klass``, ``args``, ``kwargs``, ``state`` in half precision,
``training_args``), written by ``demucs.states.save_with_checksum``; bags are yaml files like
``demucs/remote/htdemucs.yaml``. These helpers use those very demucs functions, so the loaders are
tested against the real format without the (unreachable) real weights.

``serialize_model`` converts the training config with ``omegaconf.OmegaConf.to_container``; omegaconf
is not a dependency of this project, so when it is missing a stand-in that returns a plain copy of the
(already plain) config is put in ``sys.modules`` for the duration of the call only.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import sys
import types
from fractions import Fraction
from pathlib import Path

import torch
import yaml
from demucs.demucs import Demucs
from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs
from demucs.states import save_with_checksum, serialize_model

SOURCES = ["drums", "bass", "other", "vocals"]
TRAINING_SEGMENT = Fraction(39, 5)  # 7.8 s, as the official htdemucs

# Signatures in the style of demucs' XP signatures (8 hex digits).
SIG_HT_A = "5eed0a01"
SIG_HT_B = "5eed0b02"
SIG_HT_C = "5eed0c03"
SIG_HD = "5eed0d04"
SIG_DM = "5eed0f06"

# The official htdemucs (955717e8) constructor kwargs, as stored in its package.
OFFICIAL_HTDEMUCS_KWARGS = {
    'sources': list(SOURCES), 'audio_channels': 2, 'samplerate': 44100, 'segment': TRAINING_SEGMENT,
    'channels': 48, 'channels_time': None, 'growth': 2, 'nfft': 4096, 'wiener_iters': 0, 'end_iters': 0,
    'wiener_residual': False, 'cac': True, 'depth': 4, 'rewrite': True, 'multi_freqs': [],
    'multi_freqs_depth': 3, 'freq_emb': 0.2, 'emb_scale': 10, 'emb_smooth': True, 'kernel_size': 8,
    'stride': 4, 'time_stride': 2, 'context': 1, 'context_enc': 0, 'norm_starts': 4, 'norm_groups': 4,
    'dconv_mode': 3, 'dconv_depth': 2, 'dconv_comp': 8, 'dconv_init': 0.001, 'bottom_channels': 512,
    't_layers': 5, 't_hidden_scale': 4.0, 't_heads': 8, 't_dropout': 0.02, 't_layer_scale': True,
    't_gelu': True, 't_emb': 'sin', 't_max_positions': 10000, 't_max_period': 10000.0,
    't_weight_pos_embed': 1.0, 't_cape_mean_normalize': True, 't_cape_augment': True,
    't_cape_glob_loc_scale': [5000.0, 1.0, 1.4], 't_sin_random_shift': 0, 't_norm_in': True,
    't_norm_in_group': False, 't_group_norm': False, 't_norm_first': True, 't_norm_out': True,
    't_weight_decay': 0.0, 't_lr': None, 't_sparse_self_attn': False, 't_sparse_cross_attn': False,
    't_mask_type': 'diag', 't_mask_random_seed': 42, 't_sparse_attn_window': 400, 't_global_window': 100,
    't_sparsity': 0.95, 't_auto_sparsity': False, 't_cross_first': False, 'rescale': 0.1,
}

# Same structure (bottom channels, dconv in encoder and decoder, cross transformer), much smaller.
TINY_HTDEMUCS_KWARGS = dict(OFFICIAL_HTDEMUCS_KWARGS, channels=4, bottom_channels=32, t_layers=2,
                            t_heads=4, dconv_comp=4)

# Like demucs.pretrained.demucs_unittest (HDemucs(channels=4)): hybrid, depth 6, the official STFT.
TINY_HDEMUCS_KWARGS = {
    'sources': list(SOURCES), 'audio_channels': 2, 'samplerate': 44100, 'segment': 44, 'channels': 4,
}

# Demucs v3 (time domain only), small.
TINY_DEMUCS_KWARGS = {
    'sources': list(SOURCES), 'audio_channels': 2, 'samplerate': 44100, 'segment': 10,
    'channels': 4, 'depth': 4,
}

# A plain stand-in for the hydra training config that serialize_model stores as 'training_args'.
TRAINING_ARGS = {
    'dset': {'segment': 7.8, 'samplerate': 44100, 'channels': 2, 'sources': list(SOURCES)},
    'epochs': 360, 'batch_size': 32, 'optim': {'lr': 3e-4, 'loss': 'l1'}, 'model_segment': None,
    'model': 'htdemucs', 'weights': [1.0, 1.0, 1.0, 1.0], 'seed': 42,
}


@contextlib.contextmanager
def _omegaconf_available():
    """serialize_model imports omegaconf; provide a stand-in only if it is not installed."""
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        pass
    else:
        yield
        return
    stub = types.ModuleType("omegaconf")

    class OmegaConf:
        @staticmethod
        def to_container(cfg, resolve=True):
            return copy.deepcopy(cfg)

    stub.OmegaConf = OmegaConf
    sys.modules["omegaconf"] = stub
    try:
        yield
    finally:
        if sys.modules.get("omegaconf") is stub:
            del sys.modules["omegaconf"]


def make_htdemucs(seed: int = 0, **overrides) -> HTDemucs:
    """A small random HTDemucs with the official structure and the official 7.8 s training segment."""
    torch.manual_seed(seed)
    model = HTDemucs(**dict(TINY_HTDEMUCS_KWARGS, **overrides))
    return model.eval()


def make_official_size_htdemucs(seed: int = 0) -> HTDemucs:
    """Random weights, the official htdemucs hyper-parameters (about 42 M parameters)."""
    torch.manual_seed(seed)
    return HTDemucs(**OFFICIAL_HTDEMUCS_KWARGS).eval()


def make_hdemucs(seed: int = 0) -> HDemucs:
    torch.manual_seed(seed)
    return HDemucs(**TINY_HDEMUCS_KWARGS).eval()


def make_demucs(seed: int = 0) -> Demucs:
    torch.manual_seed(seed)
    return Demucs(**TINY_DEMUCS_KWARGS).eval()


def round_to_half(model: torch.nn.Module) -> torch.nn.Module:
    """Round the weights to float16 and back, in place: the official packages store half states,
    so a model compared with its loaded package must hold the same (rounded) weights."""
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.copy_(value.half().float())
    return model


def write_package(model: torch.nn.Module, folder: Path, sig: str, half: bool = True) -> Path:
    """Write ``model`` as ``folder/SIG-SHA8.th`` with demucs' serialize_model + save_with_checksum."""
    folder.mkdir(parents=True, exist_ok=True)
    with _omegaconf_available():
        package = serialize_model(model, TRAINING_ARGS, half=half)
    save_with_checksum(package, folder / f"{sig}.th")
    found = sorted(folder.glob(f"{sig}-*.th"))
    assert len(found) == 1, found
    path = found[0]
    assert path.stem.split("-")[1] == hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    return path


def write_raw_package(package: dict, folder: Path, sig: str) -> Path:
    """Write an arbitrary (possibly broken) package dict the way save_with_checksum does."""
    folder.mkdir(parents=True, exist_ok=True)
    save_with_checksum(package, folder / f"{sig}.th")
    return next(folder.glob(f"{sig}-*.th"))


def package_of(model: torch.nn.Module, half: bool = True) -> dict:
    """serialize_model's dict, deep-copied: its 'args'/'kwargs' are the model's own captured objects."""
    with _omegaconf_available():
        return copy.deepcopy(serialize_model(model, TRAINING_ARGS, half=half))


def write_bag(folder: Path, name: str, sigs: list[str], weights: list[list[float]] | None = None,
              segment: float | None = None) -> Path:
    """A bag yaml like demucs/remote/htdemucs.yaml / htdemucs_ft.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"models: {sigs!r}"]
    if weights is not None:
        lines.append("weights: [")
        lines += [f"  [{', '.join(f'{w:.1f}' for w in row)}]," for row in weights]
        lines.append("]")
    if segment is not None:
        lines.append(f"segment: {segment}")
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert yaml.safe_load(path.read_text())["models"] == sigs
    return path


def resolver(folder: Path):
    """The ``resolve(sig) -> path`` callable for files written by ``write_package`` in ``folder``."""
    def resolve(sig: str) -> Path:
        found = sorted(folder.glob(f"{sig}-*.th"))
        if len(found) != 1:
            raise FileNotFoundError(f"no unique package for {sig} in {folder}: {found}")
        return found[0]
    return resolve


def build_fixture_repo(folder: Path) -> dict:
    """Write the standard fixtures into ``folder`` and return their paths and in-memory models.

    Returns a dict with keys: models {sig: model with half-rounded weights}, packages {sig: path},
    bag_single (like htdemucs.yaml), bag_ft (2 members with weights, like htdemucs_ft.yaml),
    bag_hd (an HDemucs bag with ``segment: 44``, like the mdx bags), resolve.
    """
    models = {
        SIG_HT_A: round_to_half(make_htdemucs(seed=1)),
        SIG_HT_B: round_to_half(make_htdemucs(seed=2)),
        SIG_HT_C: round_to_half(make_htdemucs(seed=3)),
        SIG_HD: round_to_half(make_hdemucs(seed=4)),
        SIG_DM: round_to_half(make_demucs(seed=5)),
    }
    packages = {sig: write_package(m, folder, sig) for sig, m in models.items()}
    return {
        "models": models,
        "packages": packages,
        "bag_single": write_bag(folder, "tiny_htdemucs", [SIG_HT_A]),
        "bag_ft": write_bag(folder, "tiny_htdemucs_ft", [SIG_HT_B, SIG_HT_C],
                            weights=[[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 0.5]]),
        "bag_hd": write_bag(folder, "tiny_hdemucs", [SIG_HD], segment=44),
        "resolve": resolver(folder),
    }
