"""HTDemucs' network on onnxruntime (engine.models.onnx_core, ``--cpu-runtime onnx``): the split forward
is demucs' forward op for op; the exported core is within 1e-4 (relative) of torch on random and on
stress weights; its artefact is built once per weights file beside it, rebuilt when corrupt or when
the weights change, refused (and remembered) when it disagrees with torch; without onnxruntime one
line and torch."""
import json
import sys

import pytest
import torch

from engine import registry, weights
from engine.models import onnx_core
from engine.models.htdemucs_core import HTDemucsCore, split_forward
from tests.engine import demucs_fixtures as F
from tests.engine.test_htdemucs_cpu_path import relative_error, stress
from tests.plugin_bridge.test_disk_full import tmpfs  # noqa: F401 (a fixture)

pytest.importorskip("onnxruntime")


def _input(model, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, 2, model.valid_length(model.segment_frames), generator=g)


def _repo(tmp_path, model, sig="5eed0e01"):
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    F.write_package(model, repo, sig)
    return repo, sig


def _attach(repo, sig):
    lines = []
    model = registry.load_model(sig, repo=repo)
    n = onnx_core.attach(model, lines.append)
    return model, n, lines


def _artefacts(repo):
    return sorted(p.name for p in (repo / onnx_core.ARTEFACT_DIR).iterdir())


def test_split_forward_is_demucs_forward_op_for_op():
    model = F.make_htdemucs(seed=3)
    x = 0.1 * torch.randn(2, 2, 100_000, generator=torch.Generator().manual_seed(0))  # padded inside
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # as on the engine's CPU path (both sides)
    try:
        with torch.inference_mode():
            ref = model(x)
            out = split_forward(model, x, HTDemucsCore(model))
            precise = split_forward(model, x, HTDemucsCore(model, precise=True))
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    assert out.shape == ref.shape == (2, 4, 2, 100_000)
    assert float((out - ref).abs().max()) == 0.0
    assert relative_error(precise, ref) <= 1e-6


@pytest.mark.parametrize("weights", ["random", "stress"])
def test_onnx_core_within_1e_4_of_torch(tmp_path, weights):
    net = F.make_htdemucs(seed=0)
    if weights == "stress":
        stress(net)
    repo, sig = _repo(tmp_path, net)
    model, n, lines = _attach(repo, sig)
    assert n == 1 and model.cpu_core is not None
    assert len(lines) == 1 and lines[0].startswith(f"{sig}: built its onnx core in ")
    x = _input(model, batch=2)  # the batch axis is dynamic
    with torch.inference_mode():
        out = model(x)
        core, model.cpu_core = model.cpu_core, None
        ref = model(x)
        model.cpu_core = core
    err = relative_error(out, ref)
    print(f"\n{weights} weights: onnx core vs torch, relative error {err:.2e}")
    assert 0 < err <= 1e-4  # not 0: the onnx path really ran


def test_artefact_is_cached_verified_and_rebuilt(tmp_path):
    repo, sig = _repo(tmp_path, F.make_htdemucs(seed=1))
    _, _, lines = _attach(repo, sig)
    names = _artefacts(repo)
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith(".onnx")
    record = json.loads((repo / onnx_core.ARTEFACT_DIR / names[0]).read_text())
    sha = registry.weights_sha256(sig, repo)
    assert record["weights_sha256"] == sha and names[1] == f"{sha}-{record['frames']}.onnx"
    assert record["relative_error"] <= 1e-4 and record["frames"] == 343980
    onnx = repo / onnx_core.ARTEFACT_DIR / names[1]
    mtime = onnx.stat().st_mtime_ns

    model, n, lines = _attach(repo, sig)  # loaded, not rebuilt: no line at all
    assert n == 1 and lines == [] and onnx.stat().st_mtime_ns == mtime

    data = bytearray(onnx.read_bytes())  # corrupt one byte of the artefact
    data[len(data) // 2] ^= 0x55
    onnx.write_bytes(bytes(data))
    model, n, lines = _attach(repo, sig)
    assert n == 1 and len(lines) == 2
    assert lines[0] == (f"{sig}: the onnx artefact {onnx} is missing or does not match its record; "
                        "rebuilding it")
    assert lines[1].startswith(f"{sig}: built its onnx core in ")
    assert weights.sha256_of(onnx) == record["onnx_sha256"]  # the same export, byte for byte

    onnx.unlink()  # gone: rebuilt too
    assert _attach(repo, sig)[1] == 1 and onnx.is_file()
    assert not [p for p in (repo / onnx_core.ARTEFACT_DIR).iterdir() if p.name.endswith(".partial")]


def test_other_weights_get_their_own_artefact(tmp_path):
    repo, sig = _repo(tmp_path, F.make_htdemucs(seed=1))
    _attach(repo, sig)
    _repo(tmp_path, F.make_htdemucs(seed=2), "5eed0e02")
    _attach(repo, "5eed0e02")
    assert len([n for n in _artefacts(repo) if n.endswith(".onnx")]) == 2


def test_disagreement_is_refused_and_remembered(tmp_path, monkeypatch):
    repo, sig = _repo(tmp_path, F.make_htdemucs(seed=1))
    monkeypatch.setattr(onnx_core, "MAX_RELATIVE_ERROR", 0.0)  # nothing can pass
    model, n, lines = _attach(repo, sig)
    assert n == 0 and model.cpu_core is None
    assert len(lines) == 1 and lines[0].startswith(f"{sig}: --cpu-runtime onnx refused (relative error ")
    assert lines[0].endswith("against torch, over 0); using torch")
    assert [n for n in _artefacts(repo) if n.endswith(".onnx")] == []  # nothing untrusted is kept
    model, n, lines = _attach(repo, sig)  # remembered: no second export
    assert n == 0 and len(lines) == 1 and "refused for these weights" in lines[0]


def test_without_onnxruntime_one_line_and_torch(tmp_path, monkeypatch):
    repo, sig = _repo(tmp_path, F.make_htdemucs(seed=1))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    model, n, lines = _attach(repo, sig)
    assert n == 0 and model.cpu_core is None
    assert lines == ["--cpu-runtime onnx needs onnxruntime, an optional extra: pip install 'unbake[onnx]'; "
                     "using torch"]
    assert not (repo / onnx_core.ARTEFACT_DIR).exists()


def test_full_disk_one_line_torch_and_nothing_left(tmpfs):  # noqa: F811
    """The weights on a disk with no room for the artefact: the export fails in one line, no partial
    file stays, and the model separates on torch."""
    net = F.make_htdemucs(seed=1)
    probe = F.write_package(net, tmpfs(1 << 24), "5eed0e01")  # its size, on a roomy tmpfs
    repo = tmpfs(probe.stat().st_size + (64 << 10))
    F.write_package(net, repo, "5eed0e01")
    model, n, lines = _attach(repo, "5eed0e01")
    assert n == 0 and model.cpu_core is None
    assert len(lines) == 1, lines
    assert lines[0].startswith("5eed0e01: --cpu-runtime onnx failed (OSError: [Errno 28] No space left on device")
    assert lines[0].endswith("; using torch")
    assert list((repo / onnx_core.ARTEFACT_DIR).iterdir()) == []
    with torch.inference_mode():
        assert torch.isfinite(model(_input(model))).all()


def test_not_on_other_devices_or_families(spleeter):
    lines = []
    assert onnx_core.use_cpu_runtime(spleeter, "cpu", "onnx", lines.append) == 0 and lines == []
    assert onnx_core.use_cpu_runtime(spleeter, "cuda", "onnx", lines.append) == 0
    assert lines == ["--cpu-runtime onnx applies to the CPU; the models run on cuda with torch"]
    assert onnx_core.use_cpu_runtime(spleeter, "cpu", "torch", lines.append) == 0
    with pytest.raises(ValueError):
        onnx_core.use_cpu_runtime(spleeter, "cpu", "tvm")


@pytest.mark.slow
def test_official_size_stress_weights_within_1e_4(tmp_path):
    """The official size, every LayerScale 1: the big reductions (GroupNorm over 48 x 86k time
    samples, the transformer's output norm over 2688 x 512) are where a plain export loses ~3e-4."""
    repo, sig = _repo(tmp_path, stress(F.make_official_size_htdemucs(seed=0)))
    model, n, lines = _attach(repo, sig)
    assert n == 1, lines
    x = _input(model)
    with torch.inference_mode():
        out = model(x)
        model.cpu_core = None
        ref = model(x)
    err = relative_error(out, ref)
    print(f"\nofficial size, stress weights: onnx core vs torch, relative error {err:.2e}")
    assert 0 < err <= 1e-4
