"""engine.weights: catalog schema, verified atomic downloads, offline messages; engine.registry lookup."""
import hashlib
import os
import re
from pathlib import Path

import pytest

from engine import registry, weights
from engine.errors import ChecksumMismatch, DownloadError, UnknownModel, WeightsMissing


def test_catalog_schema_and_official_checksums():
    cat = weights.catalog()
    assert {"spleeter-2stems", "htdemucs", "htdemucs_ft", "htdemucs_6s", "hdemucs_mmi"} <= set(cat)
    for name, spec in cat.items():
        assert spec.family in {"spleeter", "demucs"}, name
        assert spec.sample_rate == 44100 and len(spec.sources) >= 2 and spec.licence
        for f in spec.files + spec.archives:
            assert re.fullmatch(r"[0-9a-f]{64}", f.sha256), (name, f.name)
            assert f.size > 0, (name, f.name)
            if spec.family == "demucs":
                # Official demucs files are named SIG-SHA8.th with SHA8 = the sha256 prefix.
                sig, sha8 = Path(f.name).stem.split("-")
                assert f.sha256.startswith(sha8), (name, f.name)
                assert f.url == f"https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/{f.name}"
    assert cat["htdemucs_6s"].sources[-2:] == ("guitar", "piano")
    assert cat["spleeter-2stems"].archives[0].url.startswith("https://github.com/deezer/spleeter/releases/")


def test_bad_catalog_is_refused_naming_model_and_key():
    with pytest.raises(ValueError, match="'x'.*sha256"):
        weights.parse_catalog('[models.x]\nfamily="demucs"\nsources=["a"]\nsample_rate=1\nlicence="l"\n'
                              '[[models.x.files]]\nname="f"\nsha256="abc"\nsize=1\nurl="u"\n')
    with pytest.raises(ValueError, match="'y'.*family"):
        weights.parse_catalog('[models.y]\nsources=["a"]\n')


def test_repo_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(weights.ENV_REPO, str(tmp_path / "env"))
    assert weights.repo_dir(tmp_path / "arg") == tmp_path / "arg"
    assert weights.repo_dir() == tmp_path / "env"
    monkeypatch.delenv(weights.ENV_REPO)
    assert weights.repo_dir().name == "models" and "unbake" in str(weights.repo_dir())


def _spec(tmp_path, payload: bytes, sha=None):
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    return weights.FileSpec(name="w.bin", sha256=sha or hashlib.sha256(payload).hexdigest(),
                            size=len(payload), url=src.as_uri())


def test_fetch_file_verifies_and_renames_atomically(tmp_path):
    repo = tmp_path / "repo"
    spec = _spec(tmp_path, b"weights" * 1000)
    path = weights.fetch_file(spec, repo)
    assert path == repo / "w.bin" and path.read_bytes() == b"weights" * 1000
    assert sorted(os.listdir(repo)) == ["w.bin"]


def test_fetch_file_refuses_a_mismatch_with_both_hashes_and_leaves_nothing(tmp_path):
    repo = tmp_path / "repo"
    wrong = "0" * 64
    spec = _spec(tmp_path, b"tampered", sha=wrong)
    with pytest.raises(ChecksumMismatch) as e:
        weights.fetch_file(spec, repo)
    assert wrong in str(e.value) and hashlib.sha256(b"tampered").hexdigest() in str(e.value)
    assert os.listdir(repo) == []


def test_offline_names_the_url_and_where_to_put_the_file(tmp_path):
    spec = weights.FileSpec(name="w.bin", sha256="1" * 64, size=1, url="http://127.0.0.1:9/w.bin")
    with pytest.raises(DownloadError) as e:
        weights.fetch_file(spec, tmp_path, timeout_s=2)
    msg = str(e.value)
    assert "http://127.0.0.1:9/w.bin" in msg and str(tmp_path / "w.bin") in msg and "\n" not in msg
    assert os.listdir(tmp_path) == []


def test_missing_weights_say_how_to_fetch(tmp_path):
    with pytest.raises(WeightsMissing, match="unbake fetch htdemucs"):
        registry.load_model("htdemucs", repo=tmp_path)


def test_unknown_model_lists_known_names(tmp_path):
    with pytest.raises(UnknownModel, match="spleeter-2stems"):
        registry.load_model("no-such-model", repo=tmp_path)


def test_a_file_that_does_not_match_the_catalog_is_never_unpickled(tmp_path):
    # Not even a valid pickle: a ChecksumMismatch (not an unpickling error) proves the order.
    (tmp_path / "955717e8-8726e21a.th").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ChecksumMismatch, match="8726e21a993978c7ba086d3872e7608d7d5bfca646ca4aca459ffda844faa8b4"):
        registry.load_model("htdemucs", repo=tmp_path)


def test_default_model_is_spleeter_until_htdemucs_is_installed(tmp_path):
    assert registry.default_model(tmp_path) == "spleeter-2stems"
    spec = weights.spec_for("htdemucs")
    with open(tmp_path / spec.files[0].name, "wb") as f:
        f.truncate(spec.files[0].size)  # right size: counts as installed (loading still verifies)
    assert registry.default_model(tmp_path) == "htdemucs"
