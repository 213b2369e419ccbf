"""engine.models.roformer_cpu: RoFormer's rotary embeddings and RMSNorms in fewer passes on the CPU.

The loader (``load_roformer``) gives every BS-/Mel-RoFormer these paths. Each network here is
loaded through it from MSST-format files; the reference is the same network as bs-roformer builds
it (its own classes). The RMSNorm gains are set away from 1 and the checkpoint's other weights are
random, so a path that dropped a factor or rotated the wrong pairs is far outside the bound.
"""
from __future__ import annotations

import copy

import pytest
import torch

from engine.models import roformer_cpu
from engine.models.roformer import load_roformer
from tests.engine.test_htdemucs_cpu_path import relative_error
from tests.engine.test_roformer import BS_YAML, MEL_YAML, write_msst_pair


def _library_twin(model):
    """The loaded network with bs-roformer's own classes back (same parameters)."""
    net = copy.deepcopy(model.net)
    for m in net.modules():
        if type(m).__module__ == roformer_cpu.__name__:
            m.__class__ = type(m).__bases__[0]
    return net


def _gains_off_one(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name, yaml_text", [("bs", BS_YAML), ("mel", MEL_YAML)])
def test_cpu_paths_within_1e_5_of_the_library(tmp_path, name, yaml_text):
    ckpt, cfg, _ = write_msst_pair(tmp_path, name, yaml_text, seed=4)
    model = load_roformer(ckpt, cfg)
    swapped = [type(m).__name__ for m in model.net.modules() if type(m).__module__ == roformer_cpu.__name__]
    assert "CpuRotaryEmbedding" in swapped and "CpuRMSNorm" in swapped, swapped
    _gains_off_one(model)
    library = _library_twin(model)
    x = 0.1 * torch.randn(2, 2, 4096, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got, ref = model.net(x), library(x)
        err = relative_error(got, ref)
        print(f"{name}: relative error {err:.2e} against bs-roformer's classes")
        assert 0 < err <= 1e-5  # 0 would mean the CPU paths did not run
        # float64 (or CUDA, or half precision): the library's own path, bit for bit
        net64, lib64 = copy.deepcopy(model.net).double(), copy.deepcopy(library).double()
        assert torch.equal(net64(x.double()), lib64(x.double()))


def test_state_dict_unchanged_and_idempotent(tmp_path):
    ckpt, cfg, _ = write_msst_pair(tmp_path, "bs", BS_YAML, seed=6)
    model = load_roformer(ckpt, cfg)
    library = _library_twin(model)
    assert list(model.net.state_dict()) == list(library.state_dict())
    assert roformer_cpu.speed_up(model.net) == 0  # already done
    assert roformer_cpu.speed_up(library) == 18  # the library's classes: swapped again, to the same ones
    assert {type(m) for m in model.net.modules()} == {type(m) for m in library.modules()}


def test_rotation_is_the_librarys_on_odd_layouts():
    """A query that is a strided view (as bs-roformer's rearrange makes them), one of odd storage
    offset, and a sequence longer than the rotary cache was first filled for."""
    from rotary_embedding_torch import RotaryEmbedding
    lib = RotaryEmbedding(dim=16)
    fast = copy.deepcopy(lib)
    roformer_cpu.speed_up(torch.nn.ModuleList([fast]))
    g = torch.Generator().manual_seed(7)
    # to_qkv's output [b, n, (qkv h d)] rearranged to q, k, v [b, h, n, d]: k is a strided view
    k = torch.randn(2, 37, 3 * 4 * 16, generator=g).view(2, 37, 3, 4, 16).permute(2, 0, 3, 1, 4)[1]
    columns = torch.randn(2, 4, 16, 37, generator=g).transpose(-1, -2)  # the pairs not adjacent
    flat = torch.randn(1 + 2 * 4 * 50 * 16, generator=g)[1:].view(2, 4, 50, 16)  # storage offset 1
    for t in (k, columns, flat, flat[:, :, :9]):
        ref, got = lib.rotate_queries_or_keys(t), fast.rotate_queries_or_keys(t)
        assert got.shape == ref.shape and float((got - ref).abs().max()) <= 1e-6
