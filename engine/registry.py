"""Name -> loaded model: the catalog (verified weights) first, then demucs-style local repos.

``load_model("htdemucs")`` verifies every file's sha256 against the catalog before it is unpickled.
A ``--repo DIR`` may also hold models that are not in the catalog, in demucs' own layout
(``SIG-SHA8.th`` files, ``NAME.yaml`` bags): those are verified against the sha256 prefix in
their file name, exactly as demucs does.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from . import weights
from .errors import ChecksumMismatch, UnknownModel, WeightsMissing

DEFAULT_ORDER = ("htdemucs", "spleeter-2stems")


def _demucs_yaml(bag: str, root: Path) -> Path:
    local = root / f"{bag}.yaml"
    if local.is_file():
        return local
    import demucs
    return Path(demucs.__file__).parent / "remote" / f"{bag}.yaml"


def _local_demucs_file(sig: str, root: Path) -> Path:
    """SIG-SHA8.th in a local repo, verified against SHA8 like demucs' LocalRepo."""
    found = sorted(root.glob(f"{sig}-*.th")) + sorted(root.glob(f"{sig}.th"))
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

    Raises UnknownModel, WeightsMissing, ChecksumMismatch, CheckpointError.
    """
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
        return load_demucs_bag(root / f"{name}.yaml", lambda sig: _local_demucs_file(sig, root), device=device)
    if list(root.glob(f"{name}-*.th")):
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
    Never raises for a missing file (None).
    """
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
    found = sorted(root.glob(f"{name}-*.th")) + sorted(root.glob(f"{name}.th"))
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
    spec = weights.catalog().get(name)
    if spec is not None:
        return list(spec.sources)
    return list(load_model(name, repo).sources)
