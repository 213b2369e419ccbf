"""Shared fixtures: the ../shared folder beside the repo, real song excerpts, installed weights."""
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
EVAL = SHARED / "eval-audio" / "real-dev-v1"
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def eval_dir() -> Path:
    if not EVAL.is_dir():
        pytest.skip(f"needs the real songs in {EVAL} (../shared beside the repository)")
    return EVAL


@pytest.fixture(scope="session")
def song_excerpt(eval_dir, tmp_path_factory) -> Path:
    """3 s of a real song (44.1 kHz stereo PCM16), written to a temp folder (never into the repo)."""
    data, sr = sf.read(str(eval_dir / "cristina-vane-so-easy" / "mixture.wav"), dtype="float32",
                       frames=3 * 44100, start=10 * 44100)
    path = tmp_path_factory.mktemp("audio") / "excerpt.wav"
    sf.write(str(path), data, sr, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def spleeter_repo() -> Path:
    """The weights folder with spleeter-2stems installed through the user's code path (`unbake fetch`)."""
    from engine import weights
    weights.fetch("spleeter-2stems")
    return weights.repo_dir()


@pytest.fixture(scope="session")
def spleeter(spleeter_repo):
    from engine.registry import load_model
    return load_model("spleeter-2stems")


def read(path) -> tuple[np.ndarray, int]:
    """float32 [channels, frames] and the sample rate."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), sr


@pytest.fixture(scope="session", autouse=True)
def _no_daemon_at_the_users_endpoint():
    """No test may start an engine at the user's real default endpoint (tests use private sockets)."""
    from engine import protocol
    endpoint = protocol.default_endpoint()
    sock = Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None
    existed = sock is not None and sock.exists()
    yield
    if sock is not None and not existed and sock.exists():
        pytest.fail(f"a test started an engine at the user's default endpoint {endpoint}")
