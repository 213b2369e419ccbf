"""engine.models.roformer: MSST-format RoFormer checkpoints (ckpt + yaml) through bs-roformer's classes.

The public checkpoints cannot be downloaded here: small random BSRoformer / MelBandRoformer models are
written in exactly MSST's format (torch.save of the state dict in MSST's key names, a yaml with
audio/model/training/inference sections, freqs_per_bands as !!python/tuple) and loaded through the
user's path (``registry.load_model`` with a --repo folder, or a catalog entry).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from engine import registry, weights
from engine.apply import Streamer, apply_model
from engine.errors import CheckpointError
from engine.models import roformer
from engine.models.roformer import build_network, load_roformer, msst_state_dict

CHUNK = 2048
HOP = 16

BS_YAML = f"""\
audio:
  chunk_size: {CHUNK}
  dim_f: 1024
  hop_length: {HOP}
  n_fft: 64
  num_channels: 2
  sample_rate: 44100
  min_mean_abs: 0.000
model:
  dim: 16
  depth: 2
  stereo: true
  num_stems: 1
  time_transformer_depth: 1
  freq_transformer_depth: 1
  linear_transformer_depth: 0
  freqs_per_bands: !!python/tuple
    - 4
    - 4
    - 4
    - 4
    - 8
    - 8
    - 1
  dim_head: 8
  heads: 2
  attn_dropout: 0.1
  ff_dropout: 0.1
  flash_attn: true
  dim_freqs_in: 33
  stft_n_fft: 64
  stft_hop_length: {HOP}
  stft_win_length: 64
  stft_normalized: false
  mask_estimator_depth: 2
  multi_stft_resolution_loss_weight: 1.0
  multi_stft_resolutions_window_sizes: !!python/tuple
  - 4096
  - 2048
  multi_stft_hop_size: 147
  multi_stft_normalized: False
training:
  batch_size: 2
  instruments:
  - vocals
  - other
  target_instrument: vocals
  use_amp: true
inference:
  batch_size: 4
  num_overlap: 2
"""

# Like Kimberley Jensen's config_vocals_mel_band_roformer.yaml: no audio: section, chunk_size under
# inference:, sample_rate under model:.
MEL_YAML = f"""\
model:
  dim: 16
  depth: 2
  stereo: true
  num_stems: 1
  time_transformer_depth: 1
  freq_transformer_depth: 1
  num_bands: 8
  dim_head: 8
  heads: 2
  attn_dropout: 0
  ff_dropout: 0
  flash_attn: True
  dim_freqs_in: 129
  sample_rate: 44100
  stft_n_fft: 256
  stft_hop_length: {HOP}
  stft_win_length: 256
  stft_normalized: False
  mask_estimator_depth: 2
  multi_stft_resolution_loss_weight: 1.0
  multi_stft_resolutions_window_sizes: !!python/tuple
  - 4096
  multi_stft_hop_size: 147
  multi_stft_normalized: False
training:
  instruments:
  - vocals
  - other
  target_instrument: vocals
inference:
  num_overlap: 4
  chunk_size: {CHUNK}
"""

# Several stems, no target: sources are training.instruments.
MULTI_YAML = BS_YAML.replace("num_stems: 1", "num_stems: 3").replace(
    "  - vocals\n  - other\n  target_instrument: vocals", "  - vocals\n  - drums\n  - other\n  target_instrument: null")


# viperx's ep_317 BS-RoFormer, the model: section of its published yaml (freqs_per_bands: bs-roformer's
# DEFAULT_FREQS_PER_BANDS); also the size tests/bench/bench_cpu_paths.py --roformer measures
VIPERX_MODEL = {"dim": 512, "depth": 12, "stereo": True, "num_stems": 1, "time_transformer_depth": 1,
                "freq_transformer_depth": 1, "linear_transformer_depth": 0, "dim_head": 64, "heads": 8,
                "attn_dropout": 0.1, "ff_dropout": 0.1, "flash_attn": True, "dim_freqs_in": 1025, "stft_n_fft": 2048,
                "stft_hop_length": 441, "stft_win_length": 2048, "stft_normalized": False, "mask_estimator_depth": 2,
                "multi_stft_resolution_loss_weight": 1.0,
                "multi_stft_resolutions_window_sizes": (4096, 2048, 1024, 512, 256),
                "multi_stft_hop_size": 147, "multi_stft_normalized": False}


def write_msst_pair(folder, name, yaml_text, seed=0, state_edit=None, wrap=False):
    """NAME.yaml + NAME.ckpt as MSST writes them: torch.save(model.state_dict()) in MSST key names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml_text)
    cfg = roformer.read_config(folder / f"{name}.yaml")
    torch.manual_seed(seed)
    net = build_network(cfg)
    state = msst_state_dict(net)
    if state_edit:
        state_edit(state)
    torch.save({"state_dict": state} if wrap else state, folder / f"{name}.ckpt")
    return folder / f"{name}.ckpt", folder / f"{name}.yaml", state


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("msst")
    write_msst_pair(folder, "tiny_bs", BS_YAML, seed=1)
    write_msst_pair(folder, "tiny_mel", MEL_YAML, seed=2, wrap=True)
    write_msst_pair(folder, "tiny_multi", MULTI_YAML, seed=3)
    return folder


def test_msst_key_names_have_no_hyper_connection_or_value_residual_weights(repo):
    for name in ("tiny_bs", "tiny_mel"):
        state = torch.load(repo / f"{name}.ckpt", weights_only=True)
        state = state.get("state_dict", state)
        keys = list(state)
        assert not [k for k in keys if ".branch." in k or "value_residual" in k or "hyper" in k], name
        # MSST's layout: layers.I.0 is the time transformer, layers.I.1 the freq transformer.
        assert "layers.1.0.layers.0.0.to_qkv.weight" in keys and "layers.1.1.layers.0.1.net.1.weight" in keys
        assert not [k for k in keys if k.startswith("layers.0.2.")], name
    mel = torch.load(repo / "tiny_mel.ckpt", weights_only=True)["state_dict"]
    assert "layers.0.0.norm.gamma" in mel and "final_norm.gamma" not in mel
    bs = torch.load(repo / "tiny_bs.ckpt", weights_only=True)
    assert "final_norm.gamma" in bs and "layers.0.0.layers.0.0.rotary_embed.freqs" in bs


@pytest.mark.parametrize("name, sources, overlap", [
    ("tiny_bs", ["vocals", "instrumental"], 0.5),
    ("tiny_mel", ["vocals", "instrumental"], 0.75),
    ("tiny_multi", ["vocals", "drums", "other"], 0.5),
])
def test_load_through_the_repo_and_separate(repo, name, sources, overlap):
    model = registry.load_model(name, repo=repo)
    assert model.name == name and model.sources == sources
    assert (model.sample_rate, model.audio_channels, model.segment_frames) == (44100, 2, CHUNK)
    assert model.max_segment_frames is None and model.default_overlap == overlap
    assert model.valid_length(100) == CHUNK and model.valid_length(CHUNK + 1) == CHUNK + HOP
    torch.manual_seed(0)
    mix = torch.randn(3, 2, CHUNK)  # [batch, channels, frames]
    with torch.no_grad():
        out = model(mix)
        assert out.shape == (3, len(sources), 2, CHUNK)
        assert torch.isfinite(out).all()
        if sources[-1] == "instrumental":
            torch.testing.assert_close(out[:, 0] + out[:, 1], mix, atol=1e-5, rtol=0)
        # Each batch item is independent.
        torch.testing.assert_close(model(mix[1:2]), out[1:2], atol=1e-5, rtol=1e-4)
        # A length that is no multiple of the hop keeps its length.
        assert model(mix[..., :CHUNK - 5]).shape[-1] == CHUNK - 5
    assert registry.weights_sha256(name, repo) is not None


def test_loaded_weights_equal_the_saved_ones(repo, tmp_path):
    ckpt, yml, state = write_msst_pair(tmp_path, "again", BS_YAML, seed=7)
    model = load_roformer(ckpt, yml)
    loaded = msst_state_dict(model.net)
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    # Same weights, fresh build, the package's own forward: the adapter only reshapes.
    torch.manual_seed(7)
    ref = build_network(roformer.read_config(yml))
    mix = torch.randn(1, 2, CHUNK)
    with torch.no_grad():
        torch.testing.assert_close(model(mix)[:, 0], ref(mix), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["tiny_bs", "tiny_mel"])
def test_chunked_equals_one_shot(repo, name):
    model = registry.load_model(name, repo=repo)
    torch.manual_seed(1)
    mix = torch.randn(2, 3 * CHUNK + 777)
    with torch.no_grad():
        whole = apply_model(model, mix)
        chunked = apply_model(model, mix, chunk_frames=1000)
        streamer = Streamer(model, overlap=0.25)
        pieces = [streamer.push(mix[:, i:i + 613]) for i in range(0, mix.shape[1], 613)]
        streamed = torch.cat(pieces + [streamer.close()], dim=-1)
        reference = apply_model(model, mix, overlap=0.25)
    assert whole.shape == (2, 2, mix.shape[1])
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(streamed, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole.sum(0), mix, atol=1e-5, rtol=0)  # vocals + instrumental == mix


def _rename(state):
    state["layers.0.0.layers.0.0.to_qkv.weight_renamed"] = state.pop("layers.0.0.layers.0.0.to_qkv.weight")


def _reshape(state):
    state["final_norm.gamma"] = torch.ones(17)


def _extra(state):
    state["layers.1.0.layers.0.0.to_value_residual_mix.weight"] = torch.zeros(2, 16)


@pytest.mark.parametrize("edit, expected", [
    (_rename, ["missing keys ['layers.0.0.layers.0.0.to_qkv.weight']",
               "unexpected keys ['layers.0.0.layers.0.0.to_qkv.weight_renamed']"]),
    (_reshape, ["mis-shaped keys ['final_norm.gamma: checkpoint (17,) != model (16,)']"]),
    (_extra, ["unexpected keys ['layers.1.0.layers.0.0.to_value_residual_mix.weight']"]),
])
def test_mismatching_checkpoint_lists_the_keys(tmp_path, edit, expected):
    write_msst_pair(tmp_path, "broken", BS_YAML, state_edit=edit)
    with pytest.raises(CheckpointError) as info:
        registry.load_model("broken", repo=tmp_path)
    assert info.value.code == "E_CHECKPOINT"
    for text in expected:
        assert text in str(info.value)


def test_all_problems_reported_at_once(tmp_path):
    def edit(state):
        _rename(state), _reshape(state), _extra(state)
    write_msst_pair(tmp_path, "broken", BS_YAML, state_edit=edit)
    with pytest.raises(CheckpointError) as info:
        registry.load_model("broken", repo=tmp_path)
    msg = str(info.value)
    assert "to_qkv.weight_renamed" in msg and "final_norm.gamma: checkpoint (17,)" in msg
    assert "to_value_residual_mix" in msg and "broken.ckpt" in msg


def test_hyper_connection_defaults_are_mapped_off(tmp_path):
    """bs-roformer 1.2 defaults to 4 residual streams and value residuals; an MSST yaml (which never
    names them) builds a network whose state has none, and a checkpoint without them loads."""
    cfg = roformer.read_config(_write(tmp_path / "a.yaml", BS_YAML))
    net = build_network(cfg)
    assert not [k for k in net.state_dict() if "hyper" in k or "value_residual" in k or "static_" in k]
    mel = build_network(roformer.read_config(_write(tmp_path / "m.yaml", MEL_YAML)))
    assert not [k for k in mel.state_dict() if "value_residual" in k or "static_" in k]
    # Asking for hyper-connections explicitly gives the package's own (different) layout, which an
    # MSST checkpoint does not fit: refused with the key lists, never loaded loosely.
    write_msst_pair(tmp_path, "plain", BS_YAML, seed=3)
    _write(tmp_path / "plain.yaml", BS_YAML.replace("  dim: 16\n", "  dim: 16\n  num_residual_streams: 4\n"))
    with pytest.raises(CheckpointError, match="missing keys"):
        registry.load_model("plain", repo=tmp_path)


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("bad, match", [
    ("  mlp_expansion_factor: 2\n", "mlp_expansion_factor=2"),
    ("  skip_connection: true\n", "skip_connection=True"),
    ("  some_new_option: 1\n", "some_new_option"),
])
def test_unsupported_settings_are_refused(tmp_path, bad, match):
    path = _write(tmp_path / "x.yaml", BS_YAML.replace("  dim: 16\n", "  dim: 16\n" + bad))
    with pytest.raises(CheckpointError, match=match):
        build_network(roformer.read_config(path))


def test_msst_training_only_settings_are_accepted(tmp_path):
    extra = "  mlp_expansion_factor: 4\n  use_torch_checkpoint: true\n  skip_connection: false\n  sage_attention: true\n"
    path = _write(tmp_path / "x.yaml", BS_YAML.replace("  dim: 16\n", "  dim: 16\n" + extra))
    build_network(roformer.read_config(path))


def test_catalog_entry_loads_verified_files(repo, tmp_path, monkeypatch):
    ckpt, yml = repo / "tiny_bs.ckpt", repo / "tiny_bs.yaml"
    text = f"""
[models.tiny-roformer]
family = "roformer"
sources = ["vocals", "instrumental"]
sample_rate = 44100
licence = "test"
[[models.tiny-roformer.files]]
name = "tiny_bs.ckpt"
url = "https://example.invalid/tiny_bs.ckpt"
sha256 = "{weights.sha256_of(ckpt)}"
size = {ckpt.stat().st_size}
[[models.tiny-roformer.files]]
name = "tiny_bs.yaml"
url = "https://example.invalid/tiny_bs.yaml"
sha256 = "{weights.sha256_of(yml)}"
size = {yml.stat().st_size}
"""
    cat = dict(weights.catalog(), **weights.parse_catalog(text))
    monkeypatch.setattr(weights, "catalog", lambda: cat)
    model = registry.load_model("tiny-roformer", repo=repo)
    assert model.name == "tiny-roformer" and model.sources == list(cat["tiny-roformer"].sources)
    # A file that does not match its sha256 is never unpickled.
    bad = dataclasses.replace(cat["tiny-roformer"].files[0], sha256="0" * 64)
    cat["tiny-roformer"] = dataclasses.replace(cat["tiny-roformer"], files=(bad, cat["tiny-roformer"].files[1]))
    with pytest.raises(Exception, match="sha256 mismatch"):
        registry.load_model("tiny-roformer", repo=repo)


def test_real_public_configs_build(tmp_path):
    """The published yamls' model: sections (viperx ep_317, Kimberley Jensen) map onto the package."""
    bs = yaml.load(BS_YAML, Loader=roformer._MsstYamlLoader)
    assert isinstance(bs["model"]["freqs_per_bands"], tuple)
    from bs_roformer.bs_roformer import DEFAULT_FREQS_PER_BANDS
    viperx = dict(VIPERX_MODEL, freqs_per_bands=DEFAULT_FREQS_PER_BANDS)
    kwargs = roformer._constructor_kwargs("viperx", viperx, __import__("bs_roformer").BSRoformer)
    assert kwargs["num_residual_streams"] == 1 and "linear_transformer_depth" not in kwargs
    kim = {"dim": 384, "depth": 6, "stereo": True, "num_stems": 1, "time_transformer_depth": 1,
           "freq_transformer_depth": 1, "num_bands": 60, "dim_head": 64, "heads": 8, "attn_dropout": 0,
           "ff_dropout": 0, "flash_attn": True, "dim_freqs_in": 1025, "sample_rate": 44100,
           "stft_n_fft": 2048, "stft_hop_length": 441, "stft_win_length": 2048, "stft_normalized": False,
           "mask_estimator_depth": 2, "multi_stft_resolution_loss_weight": 1.0,
           "multi_stft_resolutions_window_sizes": (4096, 2048, 1024, 512, 256),
           "multi_stft_hop_size": 147, "multi_stft_normalized": False}
    kwargs = roformer._constructor_kwargs("kim", kim, __import__("bs_roformer").MelBandRoformer)
    assert kwargs["num_residual_streams"] == 1 and kwargs["linear_transformer_depth"] == 0
    assert kwargs["add_value_residual"] is False
