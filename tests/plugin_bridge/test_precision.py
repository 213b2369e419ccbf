"""``precision`` (session option; ``--precision`` of `unbake separate`): bf16 only where verified
(spleeter-2stems) and native on the device, else one line; never a slow emulation chosen silently."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine import devices
from engine.errors import BadRequest
from engine.protocol import check_options
from tests.engine.engine_proc import REPO


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())


def test_native_bf16_reads_the_cpu_flags():
    ok, what = devices.native_bf16(torch.device("cpu"))
    assert ok == bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    assert "CPU" in what


def test_unverified_family_is_refused_before_the_device(spleeter):
    from tests.engine import demucs_fixtures as F
    from engine.models.htdemucs import DemucsAdapter
    ht = DemucsAdapter(F.make_htdemucs(seed=0), name="htdemucs")
    with pytest.raises(BadRequest) as e:
        devices.precision_dtype(torch.device("cpu"), "bf16", [spleeter, ht])
    assert str(e.value) == ("precision bf16 is not verified for htdemucs (it is for spleeter-2stems: dev-set SDR "
                            "within 0.05 dB of fp32); use fp32")
    assert devices.precision_dtype(torch.device("cpu"), "fp32", [ht]) is None
    assert devices.precision_dtype(torch.device("cpu"), None, [ht]) is None


def test_spleeter_bf16_on_this_cpu(spleeter):
    """Native bf16: autocast dtype bfloat16. Without (this machine: AVX2 only): refused in one line."""
    cpu = torch.device("cpu")
    if devices.native_bf16(cpu)[0]:
        assert devices.precision_dtype(cpu, "bf16", [spleeter]) is torch.bfloat16
    else:
        with pytest.raises(BadRequest) as e:
            devices.precision_dtype(cpu, "bf16", [spleeter])
        assert str(e.value).startswith("precision bf16: this CPU (no avx512_bf16 or amx_bf16) has no native bf16")


def test_protocol_takes_fp32_and_bf16_only():
    assert check_options({"precision": "bf16"}, "o") == {"precision": "bf16"}
    with pytest.raises(BadRequest):
        check_options({"precision": "fp16"}, "o")


def test_through_the_engine(engine_endpoint, spleeter):
    from plugin_bridge.client import Client
    x = 0.1 * np.random.default_rng(0).standard_normal((2, 44100)).astype(np.float32)
    with Client(engine_endpoint, timeout_s=60) as client:
        default = client.separate(x, 44100, "spleeter-2stems")
        fp32 = client.separate(x, 44100, "spleeter-2stems", precision="fp32")
        assert all(float(np.abs(default[k] - fp32[k]).max()) == 0.0 for k in default)
        if not devices.native_bf16(torch.device("cpu"))[0]:
            with pytest.raises(BadRequest) as e:
                client.separate(x, 44100, "spleeter-2stems", precision="bf16")
            assert e.value.code == "E_BAD_REQUEST" and "has no native bf16" in str(e.value)


def test_cli_in_process_one_line(song_excerpt, spleeter_repo, tmp_path):
    if devices.native_bf16(torch.device("cpu"))[0]:
        pytest.skip("this CPU has native bf16: nothing to refuse")
    r = subprocess.run([sys.executable, "-m", "plugin_bridge.cli", "separate", "--in-process", "--precision", "bf16",
                        str(song_excerpt), "-o", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "UNBAKE_REPO": str(spleeter_repo)}, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "precision bf16: this CPU (no avx512_bf16 or amx_bf16) has no native bf16" in lines[0], lines
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.wav"))
