"""``open.repo``: a session's weights folder, however the engine was started.

A real daemon started without ``--repo`` (its own folder is empty) serves a model that exists only in
the folder a peer of its ipc:// socket names; a model of the same name in another folder is another
model (the cache is keyed by (folder, name)); the files are verified as in the engine's own folder;
a peer of a tcp:// engine gets E_NOT_PERMITTED and the daemon goes on serving; malformed paths are
E_BAD_REQUEST before anything is opened.
"""
import socket

import numpy as np
import pytest
import torch
from demucs.apply import apply_model

from engine import protocol as P
from tests.engine import demucs_fixtures as fx
from tests.engine.engine_proc import EngineProcess, Peer

SIG_A, SIG_B = "5eed1a01", "5eed1b02"
NAME = "mine"  # the same model name in two folders, different weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """Two folders, each with a bag ``mine`` of one tiny HTDemucs (seeds 1 and 2), and the models
    with their half-rounded weights as the packages hold them."""
    out = {}
    for key, sig, seed in (("a", SIG_A, 1), ("b", SIG_B, 2)):
        folder = tmp_path_factory.mktemp(f"repo-{key}")
        model = fx.round_to_half(fx.make_htdemucs(seed=seed))
        fx.write_package(model, folder, sig)
        fx.write_bag(folder, NAME, [sig])
        out[key] = (folder, model)
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """An engine whose own weights folder is empty, started without --repo, on a private ipc socket."""
    tmp = tmp_path_factory.mktemp("engine-repo")
    own = tmp / "own-weights"
    own.mkdir()
    with EngineProcess(f"ipc://{tmp}/e.sock", "-d", "cpu", "-j", "2", env={"UNBAKE_REPO": str(own)},
                       log=tmp / "daemon.log") as proc:
        yield proc


def _separate(peer: Peer, x: np.ndarray, **open_fields) -> tuple[dict, dict[str, np.ndarray]]:
    """One whole-track session: ready header and {stem: float32 [channels, frames]}."""
    ready = peer.call(P.OPEN, sample_rate=44100, channels=x.shape[0], **open_fields)
    assert ready["kind"] == "ready", ready
    blocks = {s: [] for s in ready["stems"]}
    for rid in (peer.request(P.PUSH, [x], session=ready["session"], channels=x.shape[0], frames=x.shape[1]),
                peer.request(P.CLOSE, session=ready["session"])):
        replies = peer.replies(rid, timeout_s=120)
        assert replies[-1][0]["kind"] == "done", replies[-1][0]
        for header, pcm in replies:
            if header["kind"] == "stems":
                for stem, frame in zip(header["stems"], pcm):
                    blocks[stem].append(np.frombuffer(frame, "<f4").reshape(header["channels"], header["frames"]))
    return ready, {s: np.concatenate(b, axis=1) for s, b in blocks.items()}


def _reference(model, x: np.ndarray) -> np.ndarray:
    """demucs' own apply_model on the same weights: [sources, channels, frames]."""
    with torch.no_grad():
        return apply_model(model, torch.from_numpy(x)[None], segment=None, overlap=0.25, shifts=0, split=True)[0].numpy()


def test_a_model_only_in_the_named_folder_is_used_and_equals_demucs(engine, repos):
    x = (np.random.default_rng(0).standard_normal((2, 3 * 44100)) * 0.1).astype(np.float32)
    with Peer(engine.endpoint) as peer:
        err = peer.call(P.OPEN, sample_rate=44100, channels=2, model=NAME)  # not in the engine's own folder
        assert err["kind"] == "error" and err["code"] == "E_UNKNOWN_MODEL", err
        for key in ("a", "b"):
            folder, model = repos[key]
            ready, stems = _separate(peer, x, model=NAME, repo=str(folder))
            assert ready["model"] == NAME and ready["repo"] == str(folder)
            assert ready["stems"] == fx.SOURCES
            ref = _reference(model, x)
            for i, stem in enumerate(fx.SOURCES):
                assert stems[stem].shape == x.shape
                diff = float(np.abs(stems[stem] - ref[i]).max())
                assert diff <= 1e-4, (key, stem, diff)
        # the two folders' models of the same name are two cache entries with different outputs
        _, a = _separate(peer, x, model=NAME, repo=str(repos["a"][0]))
        _, b = _separate(peer, x, model=NAME, repo=str(repos["b"][0]) + "/")  # the same folder, another spelling
        assert float(np.abs(a["vocals"] - b["vocals"]).max()) > 1e-3
    models = engine.status()["models"]
    assert sorted((m["name"], m["repo"]) for m in models) == [(NAME, str(repos["a"][0])),
                                                              (NAME, str(repos["b"][0]))]


def test_the_named_folders_files_are_verified(engine, tmp_path):
    folder = tmp_path / "tampered"
    path = fx.write_package(fx.make_htdemucs(seed=3), folder, "5eed1c03")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    fx.write_bag(folder, NAME, ["5eed1c03"])
    with Peer(engine.endpoint) as peer:
        err = peer.call(P.OPEN, sample_rate=44100, channels=2, model=NAME, repo=str(folder))
        assert err["kind"] == "error" and err["code"] == "E_CHECKSUM", err
        assert "sha256 mismatch" in err["message"] and path.name in err["message"]
        missing = tmp_path / "no-such-folder"
        err = peer.call(P.OPEN, sample_rate=44100, channels=2, model=NAME, repo=str(missing))
        assert err["code"] == "E_UNKNOWN_MODEL" and str(missing) in err["message"], err
        err = peer.call(P.OPEN, sample_rate=44100, channels=2, model="htdemucs", repo=str(missing))
        assert err["code"] == "E_WEIGHTS_MISSING" and "unbake fetch htdemucs" in err["message"], err


@pytest.mark.parametrize("repo, says", [("relative/weights", "absolute path"), ("", "1 to 4096"),
                                        ("/a\0b", "NUL"), ("/" + "x" * 4096, "1 to 4096")])
def test_malformed_paths_are_bad_requests(engine, repo, says):
    with Peer(engine.endpoint) as peer:
        err = peer.call(P.OPEN, sample_rate=44100, channels=2, model=NAME, repo=repo)
        assert err["kind"] == "error" and err["code"] == "E_BAD_REQUEST" and says in err["message"], err
        err = peer.call(P.OPEN, sample_rate=44100, channels=2, model=NAME, repo=7)
        assert err["code"] == "E_PROTOCOL", err
    assert engine.status()["sessions"] == 0


def test_a_tcp_peer_may_not_name_a_folder(tmp_path, repos):
    folder, _ = repos["a"]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # the engine's own folder holds the model too: the same open without 'repo' is served
    with EngineProcess(endpoint, "-d", "cpu", "--allow-any-local-user", env={"UNBAKE_REPO": str(folder)},
                       log=tmp_path / "log") as proc:
        with Peer(endpoint) as peer:
            for repo in (str(folder), str(tmp_path), "/etc"):
                err = peer.call(P.OPEN, sample_rate=44100, channels=2, model=NAME, repo=repo)
                assert err["kind"] == "error" and err["code"] == "E_NOT_PERMITTED", err
                assert f"this engine listens on {endpoint}" in err["message"]
            assert peer.call(P.HELLO)["kind"] == "hello"  # still serving
            ready = peer.call(P.OPEN, sample_rate=44100, channels=2, model=NAME)
            assert ready["kind"] == "ready" and ready["repo"] is None, ready
            assert peer.call(P.CANCEL, session=ready["session"])["kind"] == "done"
        status = proc.status()
        assert status["sessions"] == 0 and [m["repo"] for m in status["models"]] == [None]
        assert proc.proc.poll() is None


def test_ipc_is_private_only_for_socket_files():
    assert P.ipc_is_private("ipc:///run/user/1000/unbake/engine.sock")
    assert P.ipc_is_private("inproc://engine")
    for endpoint in ("ipc://@unbake", "ipc://", "tcp://127.0.0.1:5555", "tcp://0.0.0.0:5555", "tcp://[::1]:1"):
        assert not P.ipc_is_private(endpoint), endpoint


def test_hello_states_the_engines_settings(engine):
    with Peer(engine.endpoint) as peer:
        hello = peer.call(P.HELLO)
    assert (hello["device"], hello["fp16"], hello["threads"], hello["max_batch"]) == ("cpu", False, 2, 1)
    assert hello["pid"] == engine.proc.pid
