"""engine.models.htdemucs_cpu: demucs' DConv branches with the second GroupNorm's statistics taken from
the small hidden tensor, against demucs' own ops (relative error of the layer's output and of the
branch alone), the class swap (state dict unchanged, only standard branches), and where the fused
path is not taken."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from demucs.demucs import DConv
from engine.models import htdemucs_cpu as H
from engine.models.htdemucs import DemucsAdapter
from tests.engine import demucs_fixtures as F


def dconv(channels: int, compress: int = 8, depth: int = 2, seed: int = 0, **kw) -> DConv:
    """A DConv with every parameter random: LayerScale ~1 and GroupNorm affine far from (1, 0)."""
    torch.manual_seed(seed)
    d = DConv(channels, compress=compress, depth=depth, init=1.0, **kw).eval()
    with torch.no_grad():
        for m in d.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
    return d


def errors(d: DConv, x: torch.Tensor) -> tuple[float, float]:
    """(relative error of the output, of the residual branch alone) of the fused path vs demucs'."""
    with torch.inference_mode():
        ref = d(x)
        swapped = H.speed_up(d)
        with H.fused_dconv():
            out = d(x)
    assert swapped == 1 and out.shape == ref.shape and out.dtype == torch.float32
    return (float((out - ref).norm() / ref.norm()),
            float((out - ref).norm() / (ref - x).norm().clamp_min(1e-30)))


@pytest.mark.parametrize("shape", [(512, 48, 336), (128, 96, 336), (1, 48, 85995), (8, 384, 336)],
                         ids=["freq0", "freq1", "time0", "freq3"])
def test_htdemucs_shapes_within_1e_6(shape):
    """The branches of official-size htdemucs (batch = frequency bins; time branch: batch 1)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    out_err, branch_err = errors(dconv(shape[1]), x)
    assert out_err < 1e-6 and branch_err < 1e-6, (out_err, branch_err)


@pytest.mark.parametrize("offset,scale", [(1000.0, 1.0), (0.0, 1e-4), (0.0, 1e4), (300.0, 1e-3)])
def test_offsets_and_levels(offset, scale):
    """A large DC offset against a small spread (the variance is taken in float64: no cancellation),
    very quiet and very loud inputs."""
    x = offset + scale * torch.randn(64, 48, 200, generator=torch.Generator().manual_seed(2))
    out_err, branch_err = errors(dconv(48), x)
    assert out_err < 1e-6 and branch_err < 1e-5, (out_err, branch_err)


def test_constant_input_and_nan():
    """A constant input (zero variance: 1 / sqrt(eps), as GroupNorm) equals demucs'; a NaN stays in its
    item (never replaced), the others are untouched."""
    d = dconv(24, compress=4)
    x = torch.full((3, 24, 50), 0.25)
    assert errors(d, x)[0] < 1e-6
    x = torch.randn(3, 24, 50, generator=torch.Generator().manual_seed(3))
    x[1, 5, 7] = float("nan")
    with torch.inference_mode(), H.fused_dconv():
        out = d(x)
    ref = DConv.forward(d, x)
    assert torch.isnan(out[1]).all() and torch.isnan(ref[1]).all()
    assert torch.allclose(out[[0, 2]], ref[[0, 2]], rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 6), channels=st.sampled_from([8, 16, 48]), compress=st.sampled_from([2, 4, 8]),
       frames=st.integers(2, 300), depth=st.integers(1, 3), level=st.floats(1e-3, 1e3), seed=st.integers(0, 99))
def test_property_within_1e_5(batch, channels, compress, frames, depth, level, seed):
    x = level * torch.randn(batch, channels, frames, generator=torch.Generator().manual_seed(seed))
    out_err, _ = errors(dconv(channels, compress=compress, depth=depth, seed=seed), x)
    assert out_err < 1e-5, out_err


def test_swap_keeps_state_dict_and_skips_nonstandard():
    plain, lstm, relu = dconv(16), dconv(16, lstm=True), dconv(16, gelu=False)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    assert H.speed_up(plain) == 1 and type(plain) is H.FusedDConv
    after = plain.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert H.speed_up(lstm) == 0 and H.speed_up(relu) == 0 and type(lstm) is DConv and type(relu) is DConv
    assert H.speed_up(plain) == 0  # already swapped


def test_demucs_forward_outside_the_context_and_with_grad():
    """Called directly (as demucs runs it), with autograd on, or in float64, a swapped DConv is demucs'
    own forward, bit for bit."""
    d = dconv(16)
    x = torch.randn(4, 16, 120, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = d(x)
    H.speed_up(d)
    with torch.no_grad():
        assert torch.equal(d(x), ref)
    with H.fused_dconv():
        assert torch.equal(d(x), DConv.forward(d, x))  # grad enabled: demucs' path
        with torch.no_grad():
            assert not torch.equal(d(x), ref)  # the fused path: not bit-identical, within 1e-6
    d.double()
    with torch.no_grad(), H.fused_dconv():
        assert torch.equal(d(x.double()), DConv.forward(d, x.double()))


def test_adapter_swaps_the_models_branches():
    """DemucsAdapter swaps every DConv of htdemucs (encoder and decoder, both branches) and its CPU path
    takes them; the model called directly does not."""
    model = F.make_htdemucs(seed=0)
    adapter = DemucsAdapter(model)
    swapped = [m for m in model.modules() if isinstance(m, DConv)]
    assert swapped and all(type(m) is H.FusedDConv for m in swapped)
    x = 0.1 * torch.randn(1, 2, adapter.valid_length(adapter.segment_frames), generator=torch.Generator().manual_seed(5))
    calls = []
    original = H.fused_layer
    try:
        H.fused_layer = lambda layer, t: calls.append(t.shape) or original(layer, t)
        with torch.inference_mode():
            model(x)
            assert calls == []
            adapter(x)
    finally:
        H.fused_layer = original
    assert len(calls) == sum(len(m.layers) for m in swapped)
