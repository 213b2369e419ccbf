"""engine.models.htdemucs: official demucs package / bag files -> Separator adapters."""
from __future__ import annotations

import copy
import hashlib
import pickle
from fractions import Fraction

import pytest
import torch
from demucs.apply import BagOfModels
from demucs.apply import apply_model as demucs_apply_model
from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs
from demucs.repo import check_checksum

from engine.errors import CheckpointError
from engine.models.base import Bag, Separator
from engine.models.htdemucs import (DEMUCS_SAFE_GLOBALS, DemucsAdapter, DemucsPackageError,
                                    load_demucs_bag, load_demucs_package)
from tests.engine import demucs_fixtures as F

T = int(F.TRAINING_SEGMENT * 44100)  # 343980: the fixtures' training length, as the official htdemucs


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return F.build_fixture_repo(tmp_path_factory.mktemp("demucs_repo"))


def _noise(frames, batch=1, seed=0):
    return torch.randn(batch, 2, frames, generator=torch.Generator().manual_seed(seed))


# -- the fixture files are the official format --------------------------------------------------
def test_fixture_files_are_in_the_official_format(repo):
    path = repo["packages"][F.SIG_HT_A]
    sig, sha8 = path.stem.split("-")
    assert sig == F.SIG_HT_A and len(sha8) == 8
    assert sha8 == hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    check_checksum(path, sha8)  # demucs' own LocalRepo check
    with torch.serialization.safe_globals(DEMUCS_SAFE_GLOBALS):
        package = torch.load(path, map_location="cpu", weights_only=True)
    assert set(package) == {"klass", "args", "kwargs", "state", "training_args"}
    assert package["klass"] is HTDemucs
    assert package["kwargs"]["segment"] == Fraction(39, 5)
    assert all(v.dtype == torch.float16 for v in package["state"].values() if v.is_floating_point())


def test_official_format_needs_exactly_the_model_class_and_fraction(repo):
    path = repo["packages"][F.SIG_HT_A]
    with pytest.raises(pickle.UnpicklingError, match="demucs.htdemucs.HTDemucs"):
        torch.load(path, map_location="cpu", weights_only=True)
    with torch.serialization.safe_globals([HTDemucs]):
        with pytest.raises(pickle.UnpicklingError, match="fractions.Fraction"):
            torch.load(path, map_location="cpu", weights_only=True)
    with torch.serialization.safe_globals([HTDemucs, Fraction]):
        torch.load(path, map_location="cpu", weights_only=True)


# -- loading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [F.SIG_HT_A, F.SIG_HD, F.SIG_DM])
def test_loaded_adapter_equals_the_in_memory_model_exactly(repo, sig):
    adapter = load_demucs_package(repo["packages"][sig])
    original = repo["models"][sig]
    assert isinstance(adapter, Separator)
    assert adapter.name == sig
    assert adapter.sources == F.SOURCES and adapter.sample_rate == 44100 and adapter.audio_channels == 2
    assert type(adapter.model) is type(original)
    assert not adapter.model.training
    for (k, a), (k2, b) in zip(adapter.model.state_dict().items(), original.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    frames = adapter.valid_length(100_000)
    x = _noise(frames, batch=2)
    with torch.inference_mode():
        # the loaded network, run as demucs runs it, equals the original exactly; the adapter's own CPU
        # path (the attention fast path off) is within 1e-4 of it: test_htdemucs_cpu_path.py
        out = adapter.model(x)
        ref = original(x)
        assert adapter(x).shape == (2, 4, 2, frames)
    assert torch.equal(out, ref)


def test_htdemucs_adapter_attributes(repo):
    adapter = load_demucs_package(repo["packages"][F.SIG_HT_A])
    assert adapter.segment_frames == T
    assert adapter.max_segment_frames == T
    assert adapter.default_overlap == 0.25
    assert adapter.valid_length(1) == T and adapter.valid_length(T) == T
    with pytest.raises(ValueError, match="training length"):
        adapter.valid_length(T + 1)


def test_hdemucs_adapter_attributes(repo):
    adapter = load_demucs_package(repo["packages"][F.SIG_HD])
    assert adapter.segment_frames == 44 * 44100
    assert adapter.max_segment_frames is None
    assert adapter.valid_length(12345) == 12345  # HDemucs has no valid_length: demucs feeds the chunk


def _fed_length(model, frames, segment=None):
    """The input length demucs.apply.apply_model's non-split branch feeds ``model`` for a chunk."""
    seen = []
    handle = model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[-1]))
    try:
        out = demucs_apply_model(model, _noise(frames), shifts=0, split=False, segment=segment)
    finally:
        handle.remove()
    assert out.shape[-1] == frames
    return seen[0]


@pytest.mark.parametrize("frames", [1, 50_000, T - 1, T])
def test_valid_length_is_what_demucs_apply_model_feeds(repo, frames):
    model = repo["models"][F.SIG_HT_A]
    adapter = DemucsAdapter(model)
    assert adapter.valid_length(frames) == _fed_length(model, frames)
    # apply_model(segment=s): a window of int(s * samplerate); HTDemucs pads it to its training length.
    if frames <= 5 * 44100:
        adapter.set_segment(5.0)
        assert adapter.valid_length(frames) == _fed_length(model, frames, segment=5.0) == 5 * 44100
        assert adapter.segment_frames == 5 * 44100


@pytest.mark.parametrize("sig", [F.SIG_HD, F.SIG_DM])
def test_valid_length_hdemucs_demucs_is_what_demucs_feeds(repo, sig):
    model = repo["models"][sig]
    adapter = DemucsAdapter(model)
    for frames in (100, 30_001):  # (the tiny HDemucs' 1-channel DConv GroupNorms cannot take 1 frame)
        assert adapter.valid_length(frames) == _fed_length(model, frames)
        # apply_model(segment=...) changes only the grid for these models, not the window.
        adapter.set_segment(3.0)
        assert adapter.valid_length(frames) == _fed_length(model, frames, segment=3.0)
        adapter.set_segment(None)
    assert adapter.max_segment_frames is None


def test_unknown_constructor_arguments_are_dropped_like_demucs(repo, tmp_path):
    path = _broken(repo, tmp_path, lambda p: p["kwargs"].__setitem__("retired_option", 3), sig="badbad08")
    with pytest.warns(UserWarning, match="retired_option"):
        adapter = load_demucs_package(path)
    x = _noise(T)
    with torch.inference_mode():
        assert torch.equal(adapter.model(x), repo["models"][F.SIG_HT_A](x))  # the network as demucs runs it


def test_not_a_demucs_model_cannot_be_wrapped():
    with pytest.raises(TypeError):
        DemucsAdapter(torch.nn.Linear(2, 2))


def test_segment_override_follows_demucs_rules(repo):
    adapter = load_demucs_package(repo["packages"][F.SIG_HT_A])
    with pytest.raises(ValueError, match="training segment"):
        adapter.set_segment(8.0)
    with pytest.raises(ValueError):
        adapter.set_segment(0)
    adapter.set_segment(7.8)
    assert adapter.segment_frames == int(44100 * 7.8) == T
    adapter.set_segment(None)
    assert adapter.segment_frames == T
    hd = load_demucs_package(repo["packages"][F.SIG_HD], segment_s=60)  # no limit for HDemucs
    assert hd.segment_frames == 60 * 44100


def test_adapter_stays_in_eval_mode(repo):
    adapter = load_demucs_package(repo["packages"][F.SIG_HT_A])
    adapter.train()
    assert not adapter.model.training
    with torch.inference_mode():
        adapter(_noise(T))
    assert adapter.model.segment == Fraction(39, 5)  # training mode would have rewritten it


# -- refusals -----------------------------------------------------------------------------------
def _broken(repo, tmp_path, mutate, sig="badbad01"):
    package = F.package_of(repo["models"][F.SIG_HT_A])
    mutate(package)
    return F.write_raw_package(package, tmp_path, sig)


def test_extra_state_key_is_refused_and_listed(repo, tmp_path):
    path = _broken(repo, tmp_path, lambda p: p["state"].__setitem__("bogus.extra_weight", torch.zeros(3)))
    with pytest.raises(DemucsPackageError, match=r"unexpected keys \['bogus.extra_weight'\]"):
        load_demucs_package(path)


def test_missing_state_key_is_refused_and_listed(repo, tmp_path):
    key = "crosstransformer.layers.0.linear1.weight"
    path = _broken(repo, tmp_path, lambda p: p["state"].pop(key))
    with pytest.raises(DemucsPackageError, match=rf"missing keys \['{key}'\]") as info:
        load_demucs_package(path)
    assert isinstance(info.value, CheckpointError) and info.value.code == "E_CHECKPOINT"


def test_wrong_shape_is_refused(repo, tmp_path):
    key = "channel_upsampler.weight"
    path = _broken(repo, tmp_path, lambda p: p["state"].__setitem__(key, torch.zeros(1, 1, 1)))
    with pytest.raises(DemucsPackageError, match=key):
        load_demucs_package(path)


def test_klass_that_is_not_a_demucs_model_is_refused(repo, tmp_path):
    # A class outside the allow-list is never even unpickled...
    path = _broken(repo, tmp_path, lambda p: p.__setitem__("klass", torch.nn.Linear), sig="badbad02")
    with pytest.raises(DemucsPackageError, match="torch.nn.modules.linear.Linear"):
        load_demucs_package(path)
    # ...and an allowed global that is not a model class is refused by the check.
    path = _broken(repo, tmp_path, lambda p: p.__setitem__("klass", Fraction), sig="badbad03")
    with pytest.raises(DemucsPackageError, match="not one of the demucs model classes"):
        load_demucs_package(path)
    path = _broken(repo, tmp_path, lambda p: p.__setitem__("klass", "HTDemucs"), sig="badbad04")
    with pytest.raises(DemucsPackageError, match="not one of the demucs model classes"):
        load_demucs_package(path)


def test_arbitrary_code_in_the_pickle_is_refused(tmp_path):
    import os
    path = F.write_raw_package({"klass": os.system, "args": ["true"], "kwargs": {}, "state": {}},
                               tmp_path, "badbad05")
    with pytest.raises(DemucsPackageError, match="posix.system|os.system"):
        load_demucs_package(path)


def test_quantized_package_is_refused_clearly(repo, tmp_path):
    path = _broken(repo, tmp_path, lambda p: p.__setitem__(
        "state", {"__quantized": True, "quantized": [], "meta": {}, "other": {}}), sig="badbad06")
    with pytest.raises(DemucsPackageError, match="diffq"):
        load_demucs_package(path)


def test_not_a_package_is_refused(tmp_path):
    path = F.write_raw_package({"weights": torch.zeros(2)}, tmp_path, "badbad07")
    with pytest.raises(DemucsPackageError, match="missing keys"):
        load_demucs_package(path)
    garbage = tmp_path / "garbage-00000000.th"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DemucsPackageError):
        load_demucs_package(garbage)


# -- bags ---------------------------------------------------------------------------------------
def test_single_model_bag(repo):
    bag = load_demucs_bag(repo["bag_single"], repo["resolve"])
    assert isinstance(bag, Bag)
    assert bag.name == "tiny_htdemucs"
    assert [m.name for m in bag.members] == [F.SIG_HT_A]
    assert bag.weights == [[1.0] * 4]
    assert bag.segment_s is None
    assert bag.sources == F.SOURCES


def test_bag_with_weights_matches_demucs_bag_of_models(repo):
    bag = load_demucs_bag(repo["bag_ft"], repo["resolve"])
    ref = BagOfModels([repo["models"][F.SIG_HT_B], repo["models"][F.SIG_HT_C]],
                      [[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 0.5]])
    assert [m.name for m in bag.members] == [F.SIG_HT_B, F.SIG_HT_C]
    assert bag.weights == ref.weights
    x = _noise(T)
    with torch.inference_mode():
        for member, model in zip(bag.members, ref.models):
            assert torch.equal(member.model(x), model(x))  # each member's network as demucs runs it


@pytest.mark.parametrize("segment,expected", [(5, Fraction(5)), (7.8, 7.8), (10, Fraction(39, 5))])
def test_bag_segment_overrides_like_bag_of_models(repo, tmp_path, segment, expected):
    path = F.write_bag(tmp_path, "seg", [F.SIG_HT_A, F.SIG_HD], segment=segment)
    bag = load_demucs_bag(path, repo["resolve"])
    ref = BagOfModels([copy.deepcopy(repo["models"][F.SIG_HT_A]), copy.deepcopy(repo["models"][F.SIG_HD])],
                      segment=segment)
    for member, model in zip(bag.members, ref.models):
        assert member.model.segment == model.segment
        assert member.segment_frames == int(44100 * model.segment)
    assert bag.members[0].model.segment == expected
    assert bag.members[0].max_segment_frames == int(44100 * expected)
    assert bag.members[1].model.segment == segment
    assert bag.segment_s == float(segment)


def test_repeated_signature_shares_one_model(repo, tmp_path):
    path = F.write_bag(tmp_path, "twice", [F.SIG_HT_A, F.SIG_HT_A])
    bag = load_demucs_bag(path, repo["resolve"])
    assert bag.members[0].model is bag.members[1].model


@pytest.mark.parametrize("text,match", [
    ("models: []\n", "non-empty list"),
    ("models: [12345678]\n", "signature strings"),
    ("models: ['5eed0a01']\nweights: [[1, 1, 1, 1], [1, 1, 1, 1]]\n", "2 weight rows for 1 models"),
    ("models: ['5eed0a01']\nweights: [[1, 1]]\n", "weights must be"),
    ("models: ['5eed0a01']\nsegmnet: 10\n", "unknown keys"),
    ("models: ['5eed0a01']\nsegment: -1\n", "segment"),
    ("- just a list\n", "mapping"),
])
def test_bad_bag_files_are_refused(repo, tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DemucsPackageError, match=match):
        load_demucs_bag(path, repo["resolve"])


def test_bag_members_must_agree(repo, tmp_path):
    model = F.make_htdemucs(seed=9, sources=["vocals", "accompaniment"])
    F.write_package(model, tmp_path, "5eed0e05")
    path = F.write_bag(tmp_path, "mixed", [F.SIG_HT_A, "5eed0e05"])

    def resolve(sig):
        return F.resolver(tmp_path)(sig) if sig == "5eed0e05" else repo["resolve"](sig)

    with pytest.raises(DemucsPackageError, match="disagree"):
        load_demucs_bag(path, resolve)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loads_onto_cuda(repo):
    adapter = load_demucs_package(repo["packages"][F.SIG_HT_A], device="cuda")
    assert next(adapter.parameters()).device.type == "cuda"
    x = _noise(T)
    with torch.inference_mode():
        out = adapter(x.cuda()).cpu()
        ref = repo["models"][F.SIG_HT_A](x)
    assert torch.max(torch.abs(out - ref)).item() < 1e-3
