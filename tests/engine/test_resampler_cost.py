"""Issue 12 item 10: a sample rate coprime with the model's must not make the resampler's kernel
grow with the reduced fraction (44,056 Hz cost 1.9 GB at ``open``, 7,919 Hz 5.4 GB, 767,999 Hz
about 250 GiB). The common rates keep their exact fractions, so their output is what it was.

The memory is measured in a fresh process each (VmHWM before and after), so one rate's peak does
not hide another's."""
import json
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest

from engine import audio
from tests.conftest import REPO

COMMON = (8000, 16000, 22050, 32000, 44100, 48000, 88200, 96000, 176400, 192000)
AWKWARD = (44056, 7919, 767999)
PEAK_LIMIT_MB = 200  # the 5 s of audio at 768 kHz and its stems alone are ~60 MB of it


@pytest.mark.parametrize("model_rate", [44100, 48000])
def test_common_rates_keep_their_exact_fraction(model_rate):
    for rate in COMMON:
        for a, b in ((rate, model_rate), (model_rate, rate)):
            old, new = audio.ratio_terms(a, b)
            assert Fraction(new, old) == Fraction(b, a), (a, b, old, new)


def test_any_rate_gives_bounded_terms_close_to_the_ratio():
    rates = list(range(1000, 768001, 997)) + list(AWKWARD) + [44078, 749320, 768000, 1000]
    for rate in rates:
        for a, b in ((rate, 44100), (44100, rate)):
            old, new = audio.ratio_terms(a, b)
            assert 1 <= old <= audio.MAX_RATIO_TERM and 1 <= new <= audio.MAX_RATIO_TERM, (a, b, old, new)
            assert abs(Fraction(new, old) / Fraction(b, a) - 1) <= 5.1e-4, (a, b, old, new)
        # the way back is the exact inverse: stems line up with the input
        assert audio.ratio_terms(rate, 44100) == audio.ratio_terms(44100, rate)[::-1]


_PROBE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from engine.heap import peak_rss_bytes
    from engine import audio
    import torch, julius  # imported before the baseline: their import is not the resampler's cost
    rate = int(sys.argv[1])
    t = np.arange(rate * 5) / rate
    x = np.stack([np.sin(2 * np.pi * 440 * t), np.cos(2 * np.pi * 330 * t)]).astype(np.float32) * 0.5
    base = peak_rss_bytes()
    t0 = time.monotonic()
    up, down = audio.Resampler(rate, 44100, 2), audio.Resampler(44100, rate, 2)
    t_open = time.monotonic() - t0
    y = np.concatenate([up.process(x[:, i:i + 7777]) for i in range(0, x.shape[1], 7777)] + [up.flush()], 1)
    z = np.concatenate([down.process(y[:, i:i + 5000]) for i in range(0, y.shape[1], 5000)] + [down.flush()], 1)
    mid = slice(rate // 2, x.shape[1] - rate // 2)
    print(json.dumps({"peak_mb": (peak_rss_bytes() - base) / 2 ** 20, "open_s": t_open,
                      "total_s": time.monotonic() - t0, "terms": [up.old, up.new],
                      "model_frames": y.shape[1], "back_frames": z.shape[1], "frames": x.shape[1],
                      "err": float(np.abs(z[:, :x.shape[1]][:, mid] - x[:, mid]).max())}))
""")


@pytest.mark.parametrize("rate", AWKWARD)
def test_awkward_rates_cost_little_memory_and_stay_aligned(rate):
    done = subprocess.run([sys.executable, "-c", _PROBE, str(rate)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    print(rate, got)
    assert got["peak_mb"] < PEAK_LIMIT_MB, got
    assert got["open_s"] < 5, got
    assert got["frames"] == rate * 5
    old, new = got["terms"]
    assert got["model_frames"] == -(-got["frames"] * new // old)  # ceil: the flush's promise
    assert got["back_frames"] >= got["frames"]  # a session cuts the tail to the input's length
    assert got["err"] < 2e-2, got  # 440/330 Hz through and back: the same signal, aligned


def test_engine_opens_awkward_rates_within_budget_and_others_are_served(tmp_path, spleeter_repo):
    """Through a real engine: sessions at 44,056, 7,919 and 767,999 Hz open and separate a little
    audio; the engine's peak RSS stays under its budget + 500 MB and another client's separation,
    run meanwhile, takes at most twice its unloaded time."""
    import threading
    import time

    from engine import protocol as P
    from plugin_bridge.client import Client
    from tests.engine.engine_proc import EngineProcess, Peer

    budget_gb = 0.5
    x = (0.1 * np.random.default_rng(1).standard_normal((2, 10 * 44100))).astype(np.float32)
    with EngineProcess(f"ipc://{tmp_path}/e.sock", "--preload", "spleeter-2stems", "--memory-budget-gb",
                       str(budget_gb), log=tmp_path / "log", env={"UNBAKE_REPO": str(spleeter_repo)}) as proc:
        with Client(proc.endpoint, autostart=False, timeout_s=60) as client:
            def separate_s():
                t0 = time.monotonic()
                assert client.separate(x, 44100, model="spleeter-2stems")["vocals"].shape == x.shape
                return time.monotonic() - t0
            unloaded = min(separate_s() for _ in range(2))
            errors = []

            def attack():
                try:
                    with Peer(proc.endpoint) as peer:
                        for rate in AWKWARD:
                            ready = peer.call(P.OPEN, sample_rate=rate, channels=2, model="spleeter-2stems",
                                              timeout_s=60)
                            assert ready["kind"] == "ready", ready
                            n = rate // 5
                            got = peer.replies(peer.request(P.PUSH, [np.full((2, n), 0.01, np.float32)],
                                                            session=ready["session"], channels=2, frames=n), 60)
                            got += peer.replies(peer.request(P.CLOSE, session=ready["session"]), 60)
                            assert got[-1][0]["kind"] == "done" and got[-1][0]["frames_out"] == n, got[-1]
                except Exception as e:  # reported below
                    errors.append(e)
            attacker = threading.Thread(target=attack)
            attacker.start()
            loaded = separate_s()
            attacker.join(120)
            assert not errors, errors
            peak = proc.status()["peak_rss_mb"]
            print(f"separation unloaded {unloaded:.2f} s, with the awkward rates {loaded:.2f} s; peak {peak} MB")
            assert peak < budget_gb * 1024 + 500
            assert loaded <= 2 * unloaded + 0.2, (unloaded, loaded)
