"""A model name is a name, never a path (issue 12 item 7), tested as a hostile peer would: a real
engine on a private ipc socket whose weights folder sits next to an ``outside`` folder of files with a
unique marker (a demucs bag yaml, a package, an MSST pair). Names like ``../outside/secret``, absolute
paths, globs, NUL, 10 kB get ``E_BAD_REQUEST`` (never ``E_INTERNAL``), the marker never appears in any
reply, and the outside files are never read: their access time, set before their modification time so
that a read would update it under ``relatime``, stays put (checked against a control file read on
purpose; where the file system keeps no access times that part is skipped, with the reason)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from engine import protocol as P
from engine import registry
from engine.errors import BadRequest, CheckpointError
from tests.engine.engine_proc import EngineProcess, Peer

MARKER = "hunter2marker"
OLD_ATIME = 1_000_000_000  # 2001: before the files' mtime, so that a read moves it (relatime)


def hostile_names(outside: Path) -> list[str]:
    return ["../outside/secret", f"{outside}/secret", "*", "*-*", "x/../../outside/secret", "a\0b",
            "n" * 10_000, "..", "../outside/msst", "../outside/pkg", f"{outside}/pkg", "~/secret",
            "[s]ecret", "secret?", ".", "-", "./secret", "secret/", "\\..\\outside\\secret"]


@pytest.fixture
def layout(tmp_path):
    """weights/ (the engine's folder: empty), outside/ (files with the marker), and whether reads
    move access times here."""
    weights, outside = tmp_path / "weights", tmp_path / "outside"
    weights.mkdir()
    outside.mkdir()
    files = {
        "secret.yaml": f"models: ['{MARKER}']\n",                       # a demucs bag naming the marker
        f"{MARKER}-0badc0de.th": f"{MARKER} not a pickle\n",
        "pkg-0badc0de.th": f"{MARKER} not a pickle\n",                 # a demucs package
        "msst.ckpt": f"{MARKER}\n", "msst.yaml": f"{MARKER}: [1, 2]\n",  # an MSST pair
    }
    for name, text in files.items():
        (outside / name).write_text(text)
    control = outside / "control.txt"
    control.write_text("read on purpose\n")
    for path in outside.iterdir():
        os.utime(path, (OLD_ATIME, time.time()))
    control.read_text()
    atimes_work = os.stat(control).st_atime != OLD_ATIME
    return weights, outside, atimes_work


def assert_not_read(outside: Path, atimes_work: bool) -> None:
    for path in outside.iterdir():
        if path.name != "control.txt" and atimes_work:
            assert os.stat(path).st_atime == OLD_ATIME, f"{path} was read"


def test_hostile_names_through_a_real_engine(layout, tmp_path):
    weights, outside, atimes_work = layout
    endpoint = f"ipc://{tmp_path}/engine.sock"
    with EngineProcess(endpoint, "-d", "cpu", env={"UNBAKE_REPO": str(weights)}, log=tmp_path / "log") as proc:
        with Peer(endpoint) as peer:
            for name in hostile_names(outside):
                for repo in (None, str(weights)):  # the engine's own folder, and a session's (open.repo)
                    fields = {} if repo is None else {"repo": repo}
                    reply = peer.call(P.OPEN, sample_rate=44100, channels=2, model=name, timeout_s=30, **fields)
                    assert reply["kind"] == "error" and reply["code"] == "E_BAD_REQUEST", (name[:40], reply)
                    message = reply["message"]
                    assert "is not a name: " + P.MODEL_NAME_RULE in message, message
                    assert MARKER not in message and "\n" not in message and len(message) < 300
            # a name that is a name is looked up in the folder, and only there
            reply = peer.call(P.OPEN, sample_rate=44100, channels=2, model="secret", timeout_s=30)
            assert reply["code"] == "E_UNKNOWN_MODEL" and MARKER not in reply["message"], reply
            assert peer.call(P.HELLO)["kind"] == "hello"  # still serving
        assert proc.status()["sessions"] == 0
        assert proc.proc.poll() is None
    assert "internal error" not in proc.log_text()
    assert_not_read(outside, atimes_work)
    if not atimes_work:
        pytest.skip("this file system keeps no access times: the no-read check was skipped (replies checked)")


def test_hostile_names_in_process(layout):
    """The same names straight into the registry (what `unbake separate --in-process -n NAME` and the
    engine's model cache call): BadRequest before any path is built."""
    weights, outside, atimes_work = layout
    for name in hostile_names(outside):
        for call in (registry.load_model, registry.weights_sha256, registry.model_sources):
            with pytest.raises(BadRequest) as info:
                call(name, weights)
            assert info.value.code == "E_BAD_REQUEST" and MARKER not in str(info.value)
    assert_not_read(outside, atimes_work)


def test_a_bag_in_the_folder_cannot_name_a_file_outside_it(layout):
    """A bag yaml in the weights folder lists member signatures: they are names too."""
    weights, outside, atimes_work = layout
    for sig in ("../outside/" + MARKER, str(outside / MARKER), "*"):
        (weights / "bag.yaml").write_text(f"models: [{sig!r}]\n")
        with pytest.raises(CheckpointError) as info:
            registry.load_model("bag", weights)
        assert str(info.value).startswith(f"{weights / 'bag.yaml'}: model signature: model name ")
        assert "is not a name" in str(info.value)
    assert_not_read(outside, atimes_work)
