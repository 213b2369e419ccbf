"""Benchmark: the HT-Demucs CPU paths against today's torch path, and against what this CPU can do.

Run with ``python tests/bench/bench_cpu_paths.py [--seconds 30] [--rounds 5] [--compile]`` (not collected by
pytest). Official-size HTDemucs with random weights (and "stress" weights: every LayerScale set to 1)
loaded through the engine's own loader; prints, in one run:

- the conv ceiling: GFLOP/s of a large fp32 conv2d through oneDNN on this CPU (torch's threads);
- per path, one 7.8 s segment: median time, achieved GFLOP/s and the fraction of the ceiling (on the
  FLOPs torch's FlopCounterMode counts: ~250 GFLOP; it misses ~85 GFLOP of attention matmuls, so the
  true rates are ~1.34x these),
  the relative error against torch fp32 with the attention fast path on (as demucs runs it) on random
  and on stress weights;
- per path, a whole ``--seconds`` song through ``engine.apply.apply_model`` (segment 7.8, overlap
  0.25): median wall time and the ratio to today's path (the fast path on).

Paths: ``fastpath on`` (torch eager as demucs runs it; the engine before issue 15), ``engine``
(``DemucsAdapter.forward``: the attention fast path off on the CPU; the default), ``onnx``
(``--cpu-runtime onnx``: the network on onnxruntime, engine.models.onnx_core, its artefacts built
here through the same cache users hit; when onnxruntime is installed) and, with ``--compile``,
``compiled`` (torch.compile with inductor freezing of the same network part; minutes to compile, so
not offered to users). Rounds alternate between paths.

With ``--roformer`` it measures BS-RoFormer instead (viperx ep_317's size: dim 512, depth 12, 160 M
parameters; random weights from the loader's ``build_network``): one 8 s chunk per round, bs-roformer's
own classes (``library``) against the engine's (``engine``: engine.models.roformer_cpu, what
``load_roformer`` gives every RoFormer), with GFLOP/s, the fraction of the ceiling and the relative
error. A whole 30 s song is ~6 chunks of the same work (MSST's overlap 4: 4x that), so it is not run.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine import registry  # noqa: E402
from engine.apply import apply_model  # noqa: E402
from engine.models import onnx_core  # noqa: E402
from engine.models.htdemucs import DemucsAdapter  # noqa: E402
from engine.models.htdemucs_core import HTDemucsCore, mha_fastpath, split_forward  # noqa: E402
from tests.engine import demucs_fixtures as F  # noqa: E402
from tests.engine.test_htdemucs_cpu_path import relative_error, stress  # noqa: E402

SR = 44100


def conv_ceiling_gflops(rounds: int = 5) -> float:
    """fp32 conv2d, 256 -> 256 channels, 3x3, on [1, 256, 64, 512]: 38.7 GFLOP a call."""
    x = torch.randn(1, 256, 64, 512)
    w = torch.randn(256, 256, 3, 3)
    flop = 2 * 256 * 256 * 9 * 62 * 510
    with torch.inference_mode():
        torch.nn.functional.conv2d(x, w)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            torch.nn.functional.conv2d(x, w)
            times.append(time.perf_counter() - t0)
    return flop / min(times) / 1e9


def count_gflop(adapter: DemucsAdapter, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.inference_mode(), mha_fastpath(False), FlopCounterMode(display=False) as counter:
        adapter.model(x)
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile (inductor, freezing) of the network part: minutes to compile")
    parser.add_argument("--roformer", action="store_true",
                        help="BS-RoFormer (viperx size): bs-roformer's classes against the engine's CPU paths")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")

    ceiling = conv_ceiling_gflops()
    print(f"conv ceiling (fp32 conv2d, oneDNN): {ceiling:.1f} GFLOP/s")
    if args.roformer:
        return roformer(args.rounds, ceiling)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cpu_paths."))
    adapters = {}
    for weights in ("random", "stress"):  # through the loader and the artefact cache users hit
        net = F.make_official_size_htdemucs(seed=0)
        F.write_package(stress(net) if weights == "stress" else net, tmp, f"5eedbe{len(adapters):02d}")
        adapters[weights] = registry.load_model(f"5eedbe{len(adapters):02d}", repo=tmp)
    adapter = adapters["random"]
    x = 0.1 * torch.randn(1, 2, adapter.valid_length(adapter.segment_frames), generator=torch.Generator().manual_seed(1))
    gflop = count_gflop(adapter, x)
    print(f"one {adapter.segment_s:.1f} s segment: {gflop:.1f} GFLOP as FlopCounterMode counts them (it misses "
          f"~85 GFLOP of attention matmuls)")

    paths = {"fastpath on": _path(True, None), "engine": _path(False, None)}
    cores = {}
    if onnx_core.onnxruntime_missing() is None:
        for weights, a in adapters.items():
            t0 = time.perf_counter()
            onnx_core.attach(a, lambda msg: None)
            cores[weights] = a.cpu_core
            print(f"onnx core ({weights} weights): built in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        onnx_core.OnnxCore(cores["random"].path, cores["random"].frames)
        print(f"onnx core: session start from the cached artefact {time.perf_counter() - t0:.2f} s")
        paths["onnx"] = _path(False, cores)
    else:
        print(onnx_core.onnxruntime_missing())
    if args.compile:
        paths["compiled"] = _compiled(adapters, x)

    # errors on random and stress weights, against the fast path on
    errors = {name: {} for name in paths}
    for weights, a in adapters.items():
        with torch.inference_mode():
            ref = paths["fastpath on"](a, x, weights)
            for name, fn in paths.items():
                errors[name][weights] = relative_error(fn(a, x, weights), ref)

    seg = {name: [] for name in paths}
    song = {name: [] for name in paths}
    mix = 0.1 * torch.randn(2, int(args.seconds * SR), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for fn in paths.values():  # warm
            fn(adapter, x, "random")
        for _ in range(args.rounds):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn(adapter, x, "random")
                seg[name].append(time.perf_counter() - t0)
        for _ in range(max(1, args.rounds // 2)):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                _song(adapter, mix, fn)
                song[name].append(time.perf_counter() - t0)
    shutil.rmtree(tmp, ignore_errors=True)
    base_seg = statistics.median(seg["fastpath on"])
    base_song = statistics.median(song["fastpath on"])
    print(f"{'path':<12} {'segment s':>9} {'GFLOP/s':>8} {'of ceiling':>10} {'rel.err random':>14} "
          f"{'rel.err stress':>14} {f'{args.seconds:g} s song':>10} {'ratio':>6}")
    for name in paths:
        s, w = statistics.median(seg[name]), statistics.median(song[name])
        print(f"{name:<12} {s:9.3f} {gflop / s:8.1f} {gflop / s / ceiling:10.2f} {errors[name]['random']:14.2e} "
              f"{errors[name]['stress']:14.2e} {w:10.2f} {w / base_song:6.3f}")
    for name in paths:
        if name != "fastpath on":
            vs_engine = statistics.median(seg[name]) / statistics.median(seg["engine"])
            print(f"segment time ratio {name} / fastpath on: {statistics.median(seg[name]) / base_seg:.3f}"
                  + (f"; {name} / engine: {vs_engine:.3f}" if name != "engine" else ""))


def roformer(rounds: int, ceiling: float) -> None:
    """BS-RoFormer, one 8 s chunk: bs-roformer's classes against engine.models.roformer_cpu."""
    import copy

    from bs_roformer.bs_roformer import DEFAULT_FREQS_PER_BANDS
    from torch.utils.flop_counter import FlopCounterMode

    from engine.models.roformer import build_network
    from engine.models.roformer_cpu import speed_up
    from tests.engine.test_roformer import VIPERX_MODEL
    torch.manual_seed(0)
    library = build_network({"model": dict(VIPERX_MODEL, freqs_per_bands=DEFAULT_FREQS_PER_BANDS)}).eval()
    engine = copy.deepcopy(library)
    speed_up(engine)
    x = 0.1 * torch.randn(1, 2, 352800, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            ref = library(x)
        gflop = counter.get_total_flops() / 1e9
        err = relative_error(engine(x), ref)
        times = {"library": [], "engine": []}
        for _ in range(max(1, rounds)):
            for name, net in (("library", library), ("engine", engine)):
                t0 = time.perf_counter()
                net(x)
                times[name].append(time.perf_counter() - t0)
    print(f"BS-RoFormer (viperx size, random weights), one 8 s chunk: {gflop:.1f} GFLOP as FlopCounterMode "
          f"counts them; {max(1, rounds)} rounds")
    print(f"{'path':<8} {'chunk s':>8} {'GFLOP/s':>8} {'of ceiling':>10} {'rel.err':>9}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<8} {t:8.2f} {gflop / t:8.1f} {gflop / t / ceiling:10.2f} "
              f"{0.0 if name == 'library' else err:9.2e}")
    print(f"chunk time ratio engine / library: "
          f"{statistics.median(times['engine']) / statistics.median(times['library']):.3f}")


def _song(adapter, mix, fn) -> None:
    """The whole song through engine.apply.apply_model, the adapter set up as ``fn`` runs it."""
    fastpath_on, core = fn.setup
    adapter.cpu_attention_fastpath, adapter.cpu_core = fastpath_on, core
    try:
        with mha_fastpath(True):  # the process-wide default, as demucs runs
            apply_model(adapter, mix, segment_s=7.8, overlap=0.25)
    finally:
        adapter.cpu_attention_fastpath, adapter.cpu_core = False, None


def _path(fastpath_on: bool, cores: dict | None):
    """A path: the adapter's forward with the attention fast path on (demucs' own) or off, and the
    network on ``cores[weights]`` (an onnx or compiled core) or torch."""
    def run(adapter: DemucsAdapter, x: torch.Tensor, weights: str) -> torch.Tensor:
        before = adapter.cpu_attention_fastpath, adapter.cpu_core
        adapter.cpu_attention_fastpath = fastpath_on
        adapter.cpu_core = None if cores is None else cores[weights]
        try:
            with mha_fastpath(True):
                return adapter(x)
        finally:
            adapter.cpu_attention_fastpath, adapter.cpu_core = before
    run.setup = (fastpath_on, None if cores is None else cores["random"])
    return run


def _compiled(adapters: dict, x: torch.Tensor):
    """torch.compile of the network part (HTDemucsCore) with freezing, compiled once per weights."""
    import torch._inductor.config as inductor
    inductor.freezing = True
    compiled = {}
    for weights, a in adapters.items():
        core = torch.compile(HTDemucsCore(a.model).eval(), dynamic=False)
        t0 = time.perf_counter()
        with torch.inference_mode(), mha_fastpath(False):
            split_forward(a.model, x, core)
        print(f"torch.compile + freezing ({weights} weights): compiled in {time.perf_counter() - t0:.1f} s")
        compiled[weights] = lambda mag, mix, c=core: c(mag, mix)  # not an nn.Module attribute
    return _path(False, compiled)


if __name__ == "__main__":
    main()
