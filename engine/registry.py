"""Name -> loaded model: the catalog (verified weights) first, then demucs-style local repos.

``load_model("htdemucs")`` verifies every file's sha256 against the catalog before it is unpickled.
A ``--repo DIR`` may also hold models that are not in the catalog, in demucs' own layout
(``SIG-SHA8.th`` files, ``NAME.yaml`` bags): those are verified against the sha256 prefix in
their file name, exactly as demucs does.

A model name is a name, never a path: every function here checks it (``protocol.check_model_name``:
BadRequest, code E_BAD_REQUEST) before it builds ``root / NAME...`` from it, and files are found by
listing the folder and comparing names, never by a glob (a name cannot be a pattern). A bag yaml's
member signatures are checked the same way (CheckpointError for a yaml that lists another).
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from . import weights
from .errors import BadRequest, CheckpointError, ChecksumMismatch, UnknownModel, WeightsMissing
from .protocol import check_model_name

DEFAULT_ORDER = ("htdemucs", "spleeter-2stems")


def _demucs_yaml(bag: str, root: Path) -> Path:
    local = root / f"{bag}.yaml"
    if local.is_file():
        return local
    import demucs
    return Path(demucs.__file__).parent / "remote" / f"{bag}.yaml"


def _packages(root: Path, name: str) -> list[Path]:
    """The files ``NAME-*.th`` (sorted), then ``NAME.th``, in ``root`` (Path), found by listing the
    folder (no glob: ``name`` must already be checked). Regular files only; [] when the folder
    cannot be listed."""
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return []
    hashed = [n for n in entries if n.startswith(f"{name}-") and n.endswith(".th") and len(n) >= len(name) + 4]
    plain = [n for n in entries if n == f"{name}.th"]
    return [root / n for n in hashed + plain if (root / n).is_file()]


def _local_demucs_file(sig: str, root: Path, where: str | None = None) -> Path:
    """SIG-SHA8.th in a local repo, verified against SHA8 like demucs' LocalRepo. ``where``: the bag
    yaml that named ``sig`` (a signature that is not a name is then CheckpointError, naming it)."""
    try:
        check_model_name(sig, "model signature")
    except BadRequest as e:
        if where is None:
            raise
        raise CheckpointError(f"{where}: {e}") from None
    found = _packages(root, sig)
    if not found:
        raise WeightsMissing(f"model signature {sig!r}: no file {sig}-*.th in {root}")
    path = found[0]
    stem = path.stem
    if "-" in stem:
        prefix = stem.rsplit("-", 1)[1]
        actual = weights.sha256_of(path)
        if not actual.startswith(prefix):
            raise ChecksumMismatch(f"{path}: sha256 mismatch: file name says {prefix}..., got {actual}")
    return path


def load_model(name: str, repo=None, device="cpu"):
    """Load a Separator or Bag by catalog name, or from demucs-style files in ``repo``.

    Raises BadRequest (``name`` is not a name: ``protocol.check_model_name``), UnknownModel,
    WeightsMissing, ChecksumMismatch, CheckpointError.
    """
    check_model_name(name)
    root = weights.repo_dir(repo)
    spec = weights.catalog().get(name)
    if spec is not None:
        paths = weights.verified_files(name, repo)
        if spec.family == "spleeter":
            from .models.spleeter import load_spleeter
            return load_spleeter(paths[spec.files[0].name], device=device)
        if spec.family == "demucs":
            from .models.htdemucs import load_demucs_bag
            by_sig = {p.name.split("-", 1)[0]: p for p in paths.values()}

            def resolve(sig: str) -> Path:
                if sig not in by_sig:
                    raise WeightsMissing(f"{name}: bag member {sig} is not among the catalog's files")
                return by_sig[sig]
            return load_demucs_bag(_demucs_yaml(spec.bag, root), resolve, device=device)
        if spec.family == "roformer":
            from .models.roformer import load_roformer
            ckpt = [p for n, p in paths.items() if not n.endswith((".yaml", ".yml"))]
            cfg = [p for n, p in paths.items() if n.endswith((".yaml", ".yml"))]
            if len(ckpt) != 1 or len(cfg) != 1:
                raise UnknownModel(f"{name}: a roformer catalog entry lists one checkpoint and one yaml")
            return load_roformer(ckpt[0], cfg[0], device=device, name=name)
        raise UnknownModel(f"{name}: unknown family {spec.family!r} in the catalog")
    if (root / f"{name}.ckpt").is_file() and (root / f"{name}.yaml").is_file():
        # An MSST pair (NAME.ckpt + NAME.yaml): no checksum to check it against (like a bag yaml).
        from .models.roformer import load_roformer
        return load_roformer(root / f"{name}.ckpt", root / f"{name}.yaml", device=device, name=name)
    if (root / f"{name}.yaml").is_file():
        from .models.htdemucs import load_demucs_bag
        bag = root / f"{name}.yaml"
        return load_demucs_bag(bag, lambda sig: _local_demucs_file(sig, root, str(bag)), device=device)
    if any(p.name != f"{name}.th" for p in _packages(root, name)):
        from .models.htdemucs import load_demucs_package
        return load_demucs_package(_local_demucs_file(name, root), device=device)
    raise UnknownModel(f"unknown model {name!r}; known: {', '.join(sorted(weights.catalog()))}"
                       f" (or put {name}.yaml / {name}-*.th / {name}.ckpt + {name}.yaml in {root})")


def weights_sha256(name: str, repo=None) -> str | None:
    """The sha256 that identifies a model's weights (64 hex digits), or None where unknown.

    Catalog model: its file's sha256 from the catalog (verified when the model was loaded); for a
    model of several files (a demucs bag), the sha256 of the lines ``"NAME SHA256\\n"`` of its
    files in catalog order. Outside the catalog: the sha256 of a ``--repo`` ``NAME-*.th`` package
    (hashed once per file version); None for a ``NAME.yaml`` bag from ``--repo`` or an unknown name.
    Never raises for a missing file (None); BadRequest when ``name`` is not a name.
    """
    check_model_name(name)
    spec = weights.catalog().get(name)
    if spec is not None:
        if len(spec.files) == 1:
            return spec.files[0].sha256
        return hashlib.sha256("".join(f"{f.name} {f.sha256}\n" for f in spec.files).encode()).hexdigest()
    root = weights.repo_dir(repo)
    if (root / f"{name}.ckpt").is_file() and (root / f"{name}.yaml").is_file():
        try:
            ck, ym = (root / f"{name}.ckpt").stat(), (root / f"{name}.yaml").stat()
        except OSError:
            return None
        a = _file_sha256(str(root / f"{name}.ckpt"), ck.st_size, ck.st_mtime_ns)
        b = _file_sha256(str(root / f"{name}.yaml"), ym.st_size, ym.st_mtime_ns)
        if a is None or b is None:
            return None
        return hashlib.sha256(f"{name}.ckpt {a}\n{name}.yaml {b}\n".encode()).hexdigest()
    if (root / f"{name}.yaml").is_file():
        return None
    found = _packages(root, name)
    if not found:
        return None
    try:
        st = found[0].stat()
    except OSError:
        return None
    return _file_sha256(str(found[0]), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str | None:
    """sha256 of a file, cached by (path, size, mtime_ns)."""
    try:
        return weights.sha256_of(Path(path))
    except OSError:
        return None


def default_model(repo=None) -> str:
    """htdemucs when its weights are installed, otherwise spleeter-2stems."""
    for name in DEFAULT_ORDER:
        if weights.is_installed(weights.spec_for(name), repo):
            return name
    return DEFAULT_ORDER[-1]


def model_sources(name: str, repo=None) -> list[str]:
    """The model's sources (stem names, list of str). Raises as ``load_model``."""
    check_model_name(name)
    spec = weights.catalog().get(name)
    if spec is not None:
        return list(spec.sources)
    return list(load_model(name, repo).sources)
