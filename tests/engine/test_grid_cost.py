"""Issue 12 item 11: overlap=0.999999 made a stride of one frame (ETA 2,907 s for 1 s of audio).
The grid's overlap and its segments per second of audio are bounded, on the wire
(``protocol.check_options``) and where the grid is made (``apply.grid_for``, which also sees the
model's own segment length). The daemon-level check (a real engine answering E_BAD_REQUEST) is in
test_daemon_quotas.py."""
import pytest

from engine import protocol as P
from engine.apply import grid_for
from engine.errors import BadRequest
from tests.engine.toy_models import ConvSeparator


@pytest.mark.parametrize("overlap", [0.999999, 0.96, 1 - 1e-12])
def test_wire_rejects_overlap_above_the_bound_naming_it(overlap):
    with pytest.raises(BadRequest, match="0.95"):
        P.check_options({"overlap": overlap}, "open #1")


@pytest.mark.parametrize("segment_s, overlap", [(0.01, 0.0), (0.1, 0.9), (0.3, 0.95), (0.02, 0.5)])
def test_wire_rejects_more_than_50_segments_per_second(segment_s, overlap):
    with pytest.raises(BadRequest, match="50 segments per second"):
        P.check_options({"segment_s": segment_s, "overlap": overlap}, "open #1")


def test_wire_accepts_the_bounds_themselves():
    assert P.check_options({"overlap": 0.95, "segment_s": 1.0 / 0.05 / 50 * 1.001}, "w")["overlap"] == 0.95
    assert P.check_options({"overlap": 0.0, "segment_s": 0.02}, "w")


def test_grid_bounds_overlap_and_segments_per_second_with_the_models_own_segment():
    model = ConvSeparator(segment_frames=8000)  # 1 s at the toy's 8 kHz
    assert model.sample_rate == 8000
    assert grid_for(model, overlap=0.95) == (8000, 400)  # 20 segments per second: allowed
    with pytest.raises(ValueError, match="above 0.95"):
        grid_for(model, overlap=0.999999)
    with pytest.raises(ValueError, match="segments per second of audio, the limit is 50"):
        grid_for(model, segment_s=0.01, overlap=0.0)  # 100 per second
    with pytest.raises(ValueError, match="the limit is 50"):
        grid_for(ConvSeparator(segment_frames=200), overlap=0.5)  # the model's own 25 ms segment
    # ... but the model's own default grid is its authors' choice, even past 50 per second (a tiny
    # RoFormer test model has 86): only overrides that cost more than it and the bound are refused.
    tiny = ConvSeparator(segment_frames=200)  # default overlap 0.25: stride 150, 53 per second
    assert grid_for(tiny) == (200, 150)
    assert grid_for(tiny, overlap=0.2) == (200, 160)
