"""HTDemucs' network on onnxruntime (``--cpu-runtime onnx``), the STFT and iSTFT left in torch.

``attach(model)`` gives every HTDemucs of a loaded model (a ``DemucsAdapter`` or the members of a
``Bag``) an ``OnnxCore``: ``engine.models.htdemucs_core.HTDemucsCore`` exported with its reductions
one axis at a time (``precise=True``; onnxruntime's fp32 reductions over millions of elements lose
~3e-4 otherwise), run by an ``onnxruntime.InferenceSession`` on the CPU. ``DemucsAdapter.forward``
then runs ``split_forward`` with it; every other path (CUDA, other families, a window of another
length) stays torch.

The artefact is built once per weights file and cached beside it (``WEIGHTS_DIR/.onnx-cores/``):
``SHA256-FRAMES.onnx`` and its record ``SHA256-FRAMES.json`` (the weights' sha256, the window, the
versions, the artefact's own sha256 and the error measured when it was built). Both are written to a
temporary file and renamed, the record last. At load, the record must match and the artefact's sha256
must equal the recorded one, else it is rebuilt. A new artefact is checked against torch on a fixed
input before it is recorded (relative error <= ``MAX_RELATIVE_ERROR``); one that fails is recorded as
refused, and the model stays on torch.

Without onnxruntime (an extra: ``pip install 'unbake[onnx]'``) ``attach`` says so in one line and
leaves the models on torch. The choice of runtime is the caller's; torch stays the default: on the
CPU this was measured on (2 cores, AVX2) onnxruntime gained little and holds a second copy of the
weights (tests/bench/bench_cpu_paths.py).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .htdemucs_core import HTDemucsCore, mha_fastpath, spec_in

__all__ = ["ARTEFACT_DIR", "CPU_RUNTIMES", "MAX_RELATIVE_ERROR", "OnnxCore", "attach", "onnxruntime_missing",
           "use_cpu_runtime"]

ARTEFACT_DIR = ".onnx-cores"
MAX_RELATIVE_ERROR = 1e-4
OPSET = 17
FORMAT = 2  # bump when the export changes: old artefacts are then rebuilt
INSTALL_HINT = "pip install 'unbake[onnx]'"

_build_lock = threading.Lock()


def onnxruntime_missing() -> str | None:
    """None when onnxruntime imports, else the one line that says how to get it."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return f"--cpu-runtime onnx needs onnxruntime, an optional extra: {INSTALL_HINT}; using torch"
    return None


class OnnxCore:
    """``core(mag [B, 2C, Fq, T], mix [B, C, L]) -> (x [B, S, 2C, Fq, T], xt [B, S, C, L])`` on
    onnxruntime, as ``HTDemucsCore``; float32 CPU tensors in and out; any batch size. ``frames``: the
    only window length (L) it takes. ``sha256``: the artefact's recorded hash; the session is made
    from the very bytes that were checked (bytes that do not match raise ``RuntimeError``).
    Thread-safe (``InferenceSession.run`` is)."""

    def __init__(self, path: Path, frames: int, threads: int | None = None, sha256: str | None = None):
        import onnxruntime as ort
        self.path, self.frames = Path(path), int(frames)
        data = self.path.read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(f"{self.path} does not match its recorded sha256")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])

    def __call__(self, mag: torch.Tensor, mix: torch.Tensor):
        assert mix.shape[-1] == self.frames, (mix.shape, self.frames)  # [B, C, frames]
        x, xt = self.session.run(None, {"mag": mag.detach().contiguous().numpy(),
                                        "mix": mix.detach().contiguous().numpy()})
        return torch.from_numpy(x), torch.from_numpy(xt)

    def __repr__(self) -> str:
        return f"OnnxCore({self.path.name}, frames={self.frames})"


CPU_RUNTIMES = ("torch", "onnx")


def use_cpu_runtime(model, device, cpu_runtime: str | None, log: Callable[[str], None] | None = None) -> int:
    """``--cpu-runtime``: "onnx" attaches onnx cores (``attach``) to a model on the CPU; "torch" or
    None does nothing. On another device it says in one line that the option is for the CPU."""
    if cpu_runtime in (None, "torch"):
        return 0
    if cpu_runtime not in CPU_RUNTIMES:
        raise ValueError(f"cpu runtime must be torch or onnx, got {cpu_runtime!r}")
    if torch.device(device).type != "cpu":
        (log or _stderr)(f"--cpu-runtime onnx applies to the CPU; the models run on {device} with torch")
        return 0
    return attach(model, log)


def _stderr(msg: str) -> None:
    print(f"unbake: {msg}", file=sys.stderr, flush=True)


def attach(model, log: Callable[[str], None] | None = None) -> int:
    """Give each HTDemucs in ``model`` (a DemucsAdapter or a Bag of them; anything else is left as it
    is) an ``OnnxCore``, building or loading its artefact. Returns how many got one. Never raises for
    a runtime problem: it logs one line (default: stderr) and that model stays on torch."""
    from .htdemucs import DemucsAdapter
    log = log or _stderr
    adapters = [m for m in _members(model) if isinstance(m, DemucsAdapter) and m.is_htdemucs]
    if not adapters:
        return 0
    missing = onnxruntime_missing()
    if missing:
        log(missing)
        return 0
    n, cores = 0, {}
    for adapter in adapters:
        path = getattr(adapter, "weights_path", None)
        if path is None or next(adapter.model.parameters()).device.type != "cpu":
            continue
        try:
            key = (id(adapter.model), _frames(adapter))  # a bag that lists one model twice: one core
            if key not in cores:
                cores[key] = _core_for(adapter, Path(path), log)
            adapter.cpu_core = cores[key]
        except Exception as e:  # a failed export or session: say it, keep torch
            adapter.cpu_core = None
            log(f"{adapter.name}: --cpu-runtime onnx failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); using torch")
        n += adapter.cpu_core is not None
    return n


def _members(model) -> list:
    members = getattr(model, "members", None)
    return list(members) if members is not None else [model]


def _frames(adapter) -> int:
    """The window the network itself sees: HTDemucs pads every input to its training length."""
    m = adapter.model
    if m.use_train_segment:
        return int(m.segment * m.samplerate)
    return adapter.valid_length(adapter.segment_frames)


def _versions() -> dict:
    import onnxruntime
    return {"format": FORMAT, "opset": OPSET, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _core_for(adapter, weights_path: Path, log) -> OnnxCore | None:
    from ..registry import _file_sha256
    st = weights_path.stat()
    sha = _file_sha256(str(weights_path), st.st_size, st.st_mtime_ns)
    frames = _frames(adapter)
    folder = weights_path.parent / ARTEFACT_DIR
    stem = f"{sha}-{frames}"
    onnx_path, record_path = folder / f"{stem}.onnx", folder / f"{stem}.json"
    want = {"weights_sha256": sha, "frames": frames, **_versions()}
    with _build_lock:  # one build at a time in this process (two processes: the last rename wins)
        record = _read_record(record_path)
        if record is not None and all(record.get(k) == v for k, v in want.items()):
            if record.get("refused"):
                log(f"{adapter.name}: --cpu-runtime onnx refused for these weights ({record['refused']}); "
                    f"using torch")
                return None
            try:
                return OnnxCore(onnx_path, frames, sha256=record.get("onnx_sha256"))
            except (OSError, RuntimeError):  # missing, unreadable or changed: rebuilt below
                pass
            log(f"{adapter.name}: the onnx artefact {onnx_path} is missing or does not match its "
                f"record; rebuilding it")
        return _build(adapter, frames, onnx_path, record_path, want, log)


def _build(adapter, frames: int, onnx_path: Path, record_path: Path, want: dict, log) -> OnnxCore | None:
    folder = onnx_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    # The temporary file first: a folder that cannot be written fails now, not after the export.
    fd, tmp = tempfile.mkstemp(prefix=onnx_path.name + ".", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            t0 = time.monotonic()
            model = adapter.model
            gen = torch.Generator().manual_seed(0)
            mix = 0.1 * torch.randn(1, model.audio_channels, frames, generator=gen)
            with torch.no_grad(), mha_fastpath(False):
                padded, _, mag, _ = spec_in(model, mix)
                data = _export(HTDemucsCore(model, precise=True).eval(), mag, padded)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        core = OnnxCore(Path(tmp), frames, sha256=hashlib.sha256(data).hexdigest())
        with torch.inference_mode(), mha_fastpath(False):
            ref = HTDemucsCore(model)(mag, padded)
            out = core(mag, padded)
        err = max(float((o - r).norm() / r.norm().clamp_min(1e-30)) for o, r in zip(out, ref))
        record = dict(want, onnx_sha256=hashlib.sha256(data).hexdigest(), relative_error=err,
                      built_s=round(time.monotonic() - t0, 1))
        if not np.isfinite(err) or err > MAX_RELATIVE_ERROR:
            record["refused"] = f"relative error {err:.1e} against torch, over {MAX_RELATIVE_ERROR:g}"
            os.unlink(tmp)
            _write_record(record_path, record)
            log(f"{adapter.name}: --cpu-runtime onnx refused ({record['refused']}); using torch")
            return None
        os.replace(tmp, onnx_path)
        _write_record(record_path, record)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    log(f"{adapter.name}: built its onnx core in {record['built_s']} s ({onnx_path}, relative error "
        f"{err:.1e} against torch)")
    core.path = onnx_path  # the session read the file before it was renamed
    return core


def _export(core: HTDemucsCore, mag: torch.Tensor, mix: torch.Tensor) -> bytes:
    """The ONNX bytes of ``core`` for inputs shaped like (mag, mix), the batch axis dynamic."""
    buf = io.BytesIO()
    batch = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on demucs' Python asserts and ints
        torch.onnx.export(core, (mag, mix), buf, input_names=["mag", "mix"], output_names=["x", "xt"],
                          dynamic_axes={"mag": batch, "mix": batch, "x": batch, "xt": batch},
                          opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(path: Path, record: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
