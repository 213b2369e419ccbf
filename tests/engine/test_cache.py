"""engine.cache.ModelCache: loaded once however many ask at once, idle models unloaded least recently
used first to stay under the memory budget, models in use never unloaded."""
import threading

import pytest

from engine import weights
from engine.cache import ModelCache, model_bytes
from engine.errors import QueueFull, UnknownModel
from tests.engine import demucs_fixtures as fx


@pytest.fixture(scope="module")
def repo(spleeter_repo, tmp_path_factory):
    """A weights folder with spleeter-2stems (linked from the installed one) and tiny demucs models."""
    folder = tmp_path_factory.mktemp("repo")
    for name, path in weights.verified_files("spleeter-2stems").items():
        (folder / name).symlink_to(path)
    fx.build_fixture_repo(folder)
    return folder


def test_loaded_once_for_concurrent_sessions(repo):
    cache = ModelCache(repo)
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.acquire("tiny_htdemucs")[1])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.loads == 1 and len({id(m) for m in got}) == 1
    [info] = cache.info()
    assert info["sessions"] == 4 and info["memory_mb"] == pytest.approx(model_bytes(got[0]) / 2 ** 20, abs=0.1)


def test_lru_eviction_under_the_budget_and_models_in_use_are_kept(repo):
    sizes = {}
    for name in ["spleeter-2stems", "tiny_htdemucs", fx.SIG_HD]:
        probe = ModelCache(repo)
        sizes[name] = model_bytes(probe.acquire(name)[1])
    budget = sizes["spleeter-2stems"] + max(sizes["tiny_htdemucs"], sizes[fx.SIG_HD]) + 1
    cache = ModelCache(repo, memory_budget_bytes=budget)
    cache.acquire("spleeter-2stems")
    cache.acquire("tiny_htdemucs")
    cache.release("tiny_htdemucs")  # idle now, spleeter still in use
    cache.acquire(fx.SIG_HD)  # over budget: the idle tiny_htdemucs goes, spleeter stays
    assert sorted(cache.loaded()) == sorted(["spleeter-2stems", fx.SIG_HD]) and cache.evictions == 1
    with pytest.raises(QueueFull, match="memory budget"):  # both in use: refuse rather than overcommit
        cache.acquire("tiny_htdemucs")
    cache.release(fx.SIG_HD)
    cache.release("spleeter-2stems")
    cache.acquire("spleeter-2stems")  # the most recently used is now spleeter; the idle HD model goes
    cache.acquire("tiny_htdemucs")
    assert sorted(cache.loaded()) == sorted(["spleeter-2stems", "tiny_htdemucs"]) and cache.evictions == 2


def test_unknown_model_is_not_cached(repo):
    cache = ModelCache(repo)
    with pytest.raises(UnknownModel):
        cache.acquire("nope")
    assert cache.info() == []
