"""The CPU path of the HT-Demucs family (engine.models.htdemucs.DemucsAdapter.forward: the attention
fast path off) against torch fp32 as demucs runs it (the fast path on), on the official size with
random weights and with "stress" weights (every LayerScale set to 1, so that no layer is nearly idle,
as random init leaves them at 1e-4 / 1e-3). Bar: relative error <= 1e-4 (issue 15)."""
import pytest
import torch

from engine.models.htdemucs import DemucsAdapter
from tests.engine import demucs_fixtures as F

pytestmark = pytest.mark.slow


def stress(model: torch.nn.Module) -> torch.nn.Module:
    """Every LayerScale (demucs.transformer's and demucs.demucs') set to 1, in place."""
    import demucs.demucs as dd
    import demucs.transformer as dt
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (dt.LayerScale, dd.LayerScale)):
                m.scale.fill_(1.0)
                n += 1
    assert n > 0
    return model


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("weights", ["random", "stress"])
def test_cpu_path_is_within_1e_4_of_demucs_torch_fp32(weights):
    model = F.make_official_size_htdemucs(seed=0)
    if weights == "stress":
        stress(model)
    adapter = DemucsAdapter(model, name="htdemucs")
    x = 0.1 * torch.randn(1, 2, adapter.valid_length(adapter.segment_frames), generator=torch.Generator().manual_seed(1))
    before = torch.backends.mha.get_fastpath_enabled()
    with torch.inference_mode():
        torch.backends.mha.set_fastpath_enabled(True)
        ref = model(x)  # demucs' own forward, as its apply_model runs it
        out = adapter(x)  # the engine's CPU path
    assert torch.backends.mha.get_fastpath_enabled() == before  # the process-wide switch is put back
    err = relative_error(out, ref)
    print(f"\n{weights} weights: relative error of the engine's CPU path vs demucs fp32: {err:.2e}")
    assert out.shape == ref.shape
    assert err <= 1e-4
