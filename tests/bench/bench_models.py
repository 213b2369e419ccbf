"""The models the benchmarks run (``--model spleeter-2stems|htdemucs``): where their weights are."""
from __future__ import annotations

from pathlib import Path

CHOICES = ["spleeter-2stems", "htdemucs"]


def bench_model(model: str, tmp: Path) -> tuple[Path, str]:
    """(weights folder, model name) for ``model``: spleeter-2stems, its real weights (fetched as
    ``unbake fetch`` does); htdemucs, the official architecture and size with random weights, written
    into ``tmp/repo`` in the official package format as ``bench0ht`` (the real ones cannot be
    downloaded here)."""
    if model == "htdemucs":
        from tests.engine import demucs_fixtures as F
        repo = tmp / "repo"
        repo.mkdir(exist_ok=True)
        F.write_package(F.make_official_size_htdemucs(seed=0), repo, "bench0ht")
        return repo, "bench0ht"
    from engine import weights
    weights.fetch(model)
    return weights.repo_dir(), model
