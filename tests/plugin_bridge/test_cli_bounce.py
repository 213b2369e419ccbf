"""`unbake bounce` end to end through the real command and the test engine daemon: resume (and how
fast a run with nothing to do is), SIGKILL mid-run, sidecars against the shipped schema, bad inputs,
--jobs, list files / globs / folders, name collisions, chains.

The real songs are read from ../shared (never copied into the repository; copies go to tmp_path).
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REPO, read

jsonschema = pytest.importorskip("jsonschema", reason="the sidecar schema tests need jsonschema (pip install -e .[test])")

MODEL = "spleeter-2stems"
SCHEMA = REPO / "presets" / "schemas" / "bounce-sidecar.schema.json"
SONGS = ("bearlin-roads", "cristina-vane-so-easy", "music-delta-80s-rock")


def unbake(*args, cwd=None, timeout=600, endpoint=None):
    """Run the CLI; ``endpoint`` (else $UNBAKE_ENDPOINT, which the conftest sets for each test, but
    not yet while module fixtures run) is the test engine: never the user's default one."""
    env = dict(os.environ)
    if endpoint is not None:
        env["UNBAKE_ENDPOINT"] = endpoint
    assert env.get("UNBAKE_ENDPOINT"), "a CLI test must talk to the test engine"
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=env)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rows(stdout: str) -> dict[str, tuple[str, str]]:
    """{input: (status, error)} from the summary table."""
    out = {}
    for line in stdout.splitlines()[1:-1]:
        parts = line.split(None, 3)
        out[parts[0]] = (parts[1], parts[3] if len(parts) > 3 else "")
    return out


def sidecars(out: Path) -> list[Path]:
    return sorted(out.rglob("bounce.json"))


def partials(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if ".partial" in p.name)


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture(scope="module")
def catalog_sha():
    from engine import weights
    return weights.spec_for(MODEL).files[0].sha256


def check_sidecar(path: Path, validator, catalog_sha, chain=None) -> dict:
    """Schema-valid, and its numbers are the files' own."""
    side = json.loads(path.read_text())
    validator.validate(side)
    inp = Path(side["input"]["path"])
    info = sf.info(str(inp))
    assert side["frames"] == info.frames and side["sample_rate"] == info.samplerate
    assert side["channels"] == info.channels
    assert side["input"]["sha256"] == sha256(inp) and side["input"]["size"] == inp.stat().st_size
    assert side["model"] == {"name": MODEL, "weights_sha256": catalog_sha}
    assert side["latency_samples"] == 0
    import engine
    assert side["engine_version"] == engine.__version__
    outputs = [*side["stems"].values(), *([side["remix"]] if side["remix"] else [])]
    assert set(side["stems"]) == {"vocals", "accompaniment"}
    for rec in outputs:
        p = Path(rec["path"])
        assert p.is_file() and sha256(p) == rec["sha256"] and p.stat().st_size == rec["size"]
        assert rec["frames"] == side["frames"] == sf.info(str(p)).frames
        assert sf.info(str(p)).samplerate == side["sample_rate"]
    assert (side["remix"] is not None) == (chain is not None)
    return side


# -- the eval set, twice ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_bounce(eval_dir, engine_endpoint, tmp_path_factory):
    """`unbake bounce EVAL -n spleeter-2stems -o OUT` twice, timed (the model warm in the engine
    before the first, so the ratio compares bouncing with skipping, not with loading the model)."""
    from plugin_bridge.client import Client
    with Client(engine_endpoint, autostart=False, timeout_s=60) as c:
        c.open(MODEL, 44100, 2).cancel()
    out = tmp_path_factory.mktemp("bounce-eval")
    t0 = time.perf_counter()
    first = unbake("bounce", eval_dir, "-n", MODEL, "-o", out, endpoint=engine_endpoint)
    t1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = unbake("bounce", eval_dir, "-n", MODEL, "-o", out, endpoint=engine_endpoint)
    t2 = time.perf_counter() - t0
    print(f"\nbounce {eval_dir} -n {MODEL}: first run {t1:.2f} s, second run {t2:.2f} s, ratio {t2 / t1:.3f}")
    return out, first, t1, second, t2


def test_second_run_skips_every_input_in_under_a_tenth_of_the_time(eval_bounce, eval_dir):
    out, first, t1, second, t2 = eval_bounce
    assert first.returncode == 0, first.stderr
    n = len(list(eval_dir.rglob("*.wav")))
    got = rows(first.stdout)
    assert len(got) == n and all(s == "ok" for s, _ in got.values()), first.stdout
    assert first.stdout.splitlines()[-1].startswith(f"{n} ok, 0 skipped, 0 failed")
    assert second.returncode == 0, second.stderr
    assert all(s == "skipped" for s, _ in rows(second.stdout).values()) and len(rows(second.stdout)) == n
    assert t2 < 0.1 * t1, f"second run {t2:.2f} s, first {t1:.2f} s"


def test_every_sidecar_validates_and_its_numbers_are_right(eval_bounce, eval_dir, validator, catalog_sha):
    out, *_ = eval_bounce
    found = sidecars(out)
    assert len(found) == len(list(eval_dir.rglob("*.wav")))
    inputs = {json.loads(p.read_text())["input"]["path"] for p in found}
    assert inputs == {str(p.resolve()) for p in eval_dir.rglob("*.wav")}
    for p in found:
        check_sidecar(p, validator, catalog_sha)
    assert partials(out) == []


def test_colliding_names_get_their_folder_name(eval_bounce):
    """Every song is mixture.wav: {track} becomes <song folder>-mixture for those."""
    out, *_ = eval_bounce
    for song in SONGS:
        side = json.loads((out / MODEL / f"{song}-mixture" / "bounce.json").read_text())
        assert side["input"]["path"].endswith(f"{song}/mixture.wav")
        assert side["stems"]["vocals"]["path"] == str(out.resolve() / MODEL / f"{song}-mixture" / "vocals.wav")


def test_stems_match_unbake_separate(eval_bounce, eval_dir, tmp_path):
    out, *_ = eval_bounce
    song = eval_dir / "music-delta-80s-rock" / "mixture.wav"
    r = unbake("separate", "-n", MODEL, "-o", tmp_path, "-q", song)
    assert r.returncode == 0, r.stderr
    for stem in ("vocals", "accompaniment"):
        a, _ = read(tmp_path / MODEL / "mixture" / f"{stem}.wav")
        b, _ = read(out / MODEL / "music-delta-80s-rock-mixture" / f"{stem}.wav")
        np.testing.assert_array_equal(a, b)


# -- SIGKILL and resume -------------------------------------------------------------------------

@pytest.fixture
def songs(eval_dir, tmp_path) -> Path:
    """The three mixtures, copied to tmp_path/songs/<song>/mixture.wav."""
    root = tmp_path / "songs"
    for song in SONGS:
        (root / song).mkdir(parents=True)
        shutil.copy(eval_dir / song / "mixture.wav", root / song / "mixture.wav")
    return root


def test_sigkill_mid_run_then_resume_completes_without_partials(songs, tmp_path, engine_endpoint, validator,
                                                               catalog_sha):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "plugin_bridge.cli", "bounce", songs, "-n", MODEL, "-o", out,
                             "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not (out.is_dir() and partials(out)):
            assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "no partial file appeared"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = partials(out)
    assert left, "the kill left no temporary file behind (it should have, mid-write)"
    done_before = len(sidecars(out))
    assert done_before < len(SONGS)

    r = unbake("bounce", songs, "-n", MODEL, "-o", out)
    assert r.returncode == 0, r.stderr
    statuses = [s for s, _ in rows(r.stdout).values()]
    assert statuses.count("skipped") == done_before and statuses.count("ok") == len(SONGS) - done_before
    assert partials(out) == []  # anywhere under OUT
    assert len(sidecars(out)) == len(SONGS)
    for p in sidecars(out):
        check_sidecar(p, validator, catalog_sha)


def test_a_changed_input_option_or_output_is_redone_the_rest_skipped(songs, tmp_path, engine_endpoint):
    out = tmp_path / "out"
    r = unbake("bounce", songs, "-n", MODEL, "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    # an output deleted: that input only
    (out / MODEL / "bearlin-roads-mixture" / "vocals.wav").unlink()
    # an input rewritten with other content (same name): that input only
    data, sr = sf.read(str(songs / "music-delta-80s-rock" / "mixture.wav"), dtype="float32")
    sf.write(str(songs / "music-delta-80s-rock" / "mixture.wav"), data * 0.5, sr, subtype="PCM_16")
    r = unbake("bounce", songs, "-n", MODEL, "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    got = {Path(k).parent.name: s for k, (s, _) in rows(r.stdout).items()}
    assert got == {"bearlin-roads": "ok", "cristina-vane-so-easy": "skipped", "music-delta-80s-rock": "ok"}
    # an option that changes the output (--int24): every input
    r = unbake("bounce", songs, "-n", MODEL, "-o", out, "-q", "--int24")
    assert {s for s, _ in rows(r.stdout).values()} == {"ok"}
    assert sf.info(str(out / MODEL / "bearlin-roads-mixture" / "vocals.wav")).subtype == "PCM_24"
    # an output edited in place, same size, mtime moved: caught by its sha256
    p = out / MODEL / "cristina-vane-so-easy-mixture" / "accompaniment.wav"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    p.write_bytes(bytes(raw))
    r = unbake("bounce", songs, "-n", MODEL, "-o", out, "-q", "--int24")
    got = {Path(k).parent.name: s for k, (s, _) in rows(r.stdout).items()}
    assert got["cristina-vane-so-easy"] == "ok" and got["bearlin-roads"] == "skipped"


# -- bad inputs ---------------------------------------------------------------------------------

def test_a_bad_input_fails_alone_with_one_line(songs, tmp_path, engine_endpoint):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + os.urandom(2000))
    missing = tmp_path / "gone" / "missing.wav"
    good = sorted(songs.rglob("mixture.wav"))
    listing = tmp_path / "targets.txt"
    # REAPER's RENDER_TARGETS: ';'-separated; plus one path a line, a comment, a blank line
    listing.write_text(f"# render targets\n{good[0]};{corrupt}\n\n{missing}\n{good[1]}\n")
    out = tmp_path / "out"
    r = unbake("bounce", listing, "-n", MODEL, "-o", out)
    assert r.returncode == 1
    got = rows(r.stdout)
    assert got[str(good[0])][0] == "ok" and got[str(good[1])][0] == "ok"
    status, error = got[str(corrupt)]
    assert status == "failed" and "cannot read audio" in error and "\n" not in error
    assert got[str(missing)] == ("failed", "no such file or folder")
    assert r.stdout.splitlines()[-1].startswith("2 ok, 0 skipped, 2 failed")
    assert f"error: {corrupt}: " in r.stderr and f"error: {missing}: no such file or folder" in r.stderr
    assert len(sidecars(out)) == 2 and partials(out) == []


# -- --jobs -------------------------------------------------------------------------------------

def test_jobs_2_gives_the_same_outputs_as_jobs_1(songs, tmp_path, engine_endpoint):
    outs = {}
    for jobs in (1, 2):
        outs[jobs] = tmp_path / f"out{jobs}"
        r = unbake("bounce", songs, "-n", MODEL, "-o", outs[jobs], "--float32", "--jobs", jobs, "-q")
        assert r.returncode == 0, r.stderr
        assert {s for s, _ in rows(r.stdout).values()} == {"ok"}
    for side1 in sidecars(outs[1]):
        side2 = outs[2] / side1.relative_to(outs[1])
        s1, s2 = json.loads(side1.read_text()), json.loads(side2.read_text())
        for stem in s1["stems"]:
            a, _ = read(s1["stems"][stem]["path"])
            b, _ = read(s2["stems"][stem]["path"])
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# -- inputs: folders, globs, list files; names ----------------------------------------------------

def test_expand_inputs_folders_globs_lists(tmp_path, monkeypatch):
    from plugin_bridge.bounce import expand_inputs
    monkeypatch.chdir(tmp_path)
    for name in ("a/song.wav", "a/deep/er/x.FLAC", "a/.hidden.wav", "a/.partials/y.wav", "a/notes.txt",
                 "b/song.mp3", "b/cover.jpg", "out/model/song/vocals.wav", "c d/odd name.aiff"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "targets.lst").write_text("../a/song.wav;../b/song.mp3\n# comment\n\n\"../c d/odd name.aiff\"\n")
    (tmp_path / "plain").write_text(f"{tmp_path / 'b'}\n")

    def found(*args, **kw):
        return [(i.source, i.error) if i.error else i.source for i in expand_inputs(args, **kw)]

    assert found("a") == ["a/deep/er/x.FLAC", "a/song.wav"]  # recursive, hidden skipped, audio only
    assert found(".", exclude=[tmp_path / "out"]) == ["./a/deep/er/x.FLAC", "./a/song.wav", "./b/song.mp3",
                                                      "./c d/odd name.aiff"]
    # the output folder is the folder searched: only its model folder is skipped
    assert found("out", exclude=[tmp_path / "out", tmp_path / "out" / "model"]) == [("out", "no audio files in folder")]
    assert found("out", exclude=[tmp_path / "out", tmp_path / "out" / "other"]) == ["out/model/song/vocals.wav"]
    assert found("**/*.wav", exclude=[tmp_path / "out"]) == ["a/song.wav"]
    assert found("*/song.*") == ["a/song.wav", "b/song.mp3"]  # globs keep audio files
    assert found("**/*.wav") == ["a/song.wav", "out/model/song/vocals.wav"]
    assert found("a/notes.txt") == [("a/x", "no such file or folder")]  # a .txt is a list file
    assert found("lists/targets.lst") == ["lists/../a/song.wav", "lists/../b/song.mp3", "lists/../c d/odd name.aiff"]
    assert found(lists=["plain"]) == [f"{tmp_path / 'b'}/song.mp3"]
    assert found("a/song.wav", "./a/song.wav", "a") == ["a/song.wav", "a/deep/er/x.FLAC"]  # each file once
    assert found("nope.wav", "zz*", "out/model/song") == [("nope.wav", "no such file or folder"),
                                                           ("zz*", "no audio file matches"),
                                                           "out/model/song/vocals.wav"]
    assert found("b/cover.jpg", "lists/missing.txt") == ["b/cover.jpg", ("lists/missing.txt", "no such file or folder")]


def test_track_names_keep_colliding_inputs_apart():
    from plugin_bridge.bounce import track_names
    paths = [Path("/m/a/mixture.wav"), Path("/m/b/mixture.wav"), Path("/x/s/v.wav"), Path("/y/s/v.wav"),
             Path("/z/s/v.flac"), Path("/q/solo.wav"), Path("/z/s/v.wav")]
    assert track_names(paths) == {
        Path("/m/a/mixture.wav"): "a-mixture", Path("/m/b/mixture.wav"): "b-mixture",
        Path("/x/s/v.wav"): "x-s-v-wav", Path("/y/s/v.wav"): "y-s-v-wav", Path("/z/s/v.flac"): "z-s-v-flac",
        Path("/z/s/v.wav"): "z-s-v-wav", Path("/q/solo.wav"): "solo"}
    assert track_names([Path("/x/s/v.wav"), Path("/y/s/v.wav")]) == {Path("/x/s/v.wav"): "x-s-v",
                                                                      Path("/y/s/v.wav"): "y-s-v"}


def test_plan_parent_variable_and_collisions(tmp_path):
    from engine.errors import BadRequest
    from engine.stemfiles import OutputFormat
    from plugin_bridge.bounce import Input, plan
    ins = [Input("a", Path("/m/a/mix.wav")), Input("b", Path("/m/b/mix.wav")), Input("c", None, "no such file or folder")]
    jobs = plan(ins, tmp_path, MODEL, ["vocals", "accompaniment"], OutputFormat(),
                template="{parent}/{stem}.{ext}")
    assert jobs[0].dests["vocals"] == tmp_path / MODEL / "a" / "vocals.wav"
    assert jobs[0].sidecar == tmp_path / MODEL / "a" / "bounce.json"
    assert jobs[2].error == "no such file or folder"
    jobs = plan(ins[:2], tmp_path, MODEL, ["vocals", "accompaniment"], OutputFormat(ext="flac"),
                template="{stem}.wav", remix=True)
    assert [j.error is not None and "collide" in j.error for j in jobs] == [True, True]
    assert jobs[0].remix == tmp_path / MODEL / "remix.wav" and jobs[0].sidecar == tmp_path / MODEL / "bounce.wav.json"
    with pytest.raises(BadRequest, match="unknown variable"):
        plan(ins[:1], tmp_path, MODEL, ["vocals"], OutputFormat(), template="{song}/{stem}.{ext}")


def test_glob_and_list_file_through_the_command(songs, tmp_path, engine_endpoint):
    out = tmp_path / "out"
    r = unbake("bounce", str(songs / "*" / "mixture.wav"), "-n", MODEL, "-o", out, "-q",
               "--filename", "{parent}/{stem}.{ext}")
    assert r.returncode == 0, r.stderr
    assert sorted(p.parent.name for p in sidecars(out)) == sorted(SONGS)
    listing = tmp_path / "render.list"
    listing.write_text("\n".join(str(p) for p in sorted(songs.rglob("mixture.wav"))) + "\n")
    r = unbake("bounce", "--list", listing, "-n", MODEL, "-o", out, "-q", "--filename", "{parent}/{stem}.{ext}")
    assert r.returncode == 0, r.stderr
    assert [s for s, _ in rows(r.stdout).values()] == ["skipped"] * len(SONGS)


# -- the engine says which weights -------------------------------------------------------------

def test_ready_reply_carries_the_weights_sha256(engine_endpoint, catalog_sha):
    from plugin_bridge.client import Client
    with Client(engine_endpoint, autostart=False, timeout_s=60) as c:
        session = c.open(MODEL, 44100, 2)
        session.cancel()
    assert session.weights_sha256 == catalog_sha


# -- chains -------------------------------------------------------------------------------------

def test_chain_writes_processed_stems_remix_and_resumes(song_excerpt, tmp_path, engine_endpoint, validator,
                                                       catalog_sha):
    preset = tmp_path / "quiet-vocals.toml"
    preset.write_text('description = "test"\n[stems.vocals]\ngain_db = -6.0\n')
    out = tmp_path / "out"
    args = ("bounce", song_excerpt, "-n", MODEL, "--chain", preset, "-o", out, "--float32", "-q")
    r = unbake(*args)
    assert r.returncode == 0, r.stderr
    folder = out / f"{MODEL}+quiet-vocals" / "excerpt"
    side = check_sidecar(folder / "bounce.json", validator, catalog_sha, chain=preset)
    assert side["chain"] == {"name": "quiet-vocals", "path": str(preset.resolve()), "sha256": sha256(preset)}
    voc, _ = read(folder / "vocals.wav")
    acc, _ = read(folder / "accompaniment.wav")
    remix, _ = read(folder / "remix.wav")
    np.testing.assert_allclose(remix, voc + acc, atol=1e-6)
    plain = tmp_path / "plain"
    assert unbake("bounce", song_excerpt, "-n", MODEL, "-o", plain, "--float32", "-q").returncode == 0
    raw, _ = read(plain / MODEL / "excerpt" / "vocals.wav")
    np.testing.assert_allclose(voc, raw * 10 ** (-6 / 20), atol=1e-5)
    np.testing.assert_allclose(acc, read(plain / MODEL / "excerpt" / "accompaniment.wav")[0], atol=1e-5)
    assert rows(unbake(*args).stdout)[str(song_excerpt)][0] == "skipped"
    preset.write_text('description = "test"\n[stems.vocals]\ngain_db = -12.0\n')  # new bytes: redone
    assert rows(unbake(*args).stdout)[str(song_excerpt)][0] == "ok"


def test_weights_sha256_outside_the_catalog(tmp_path):
    from engine import registry, weights
    th = tmp_path / "mine-0123abcd.th"
    th.write_bytes(b"not really a checkpoint")
    (tmp_path / "bag.yaml").write_text("models: [mine]\n")
    assert registry.weights_sha256("mine", tmp_path) == sha256(th)
    assert registry.weights_sha256("bag", tmp_path) is None  # a --repo bag: unknown
    assert registry.weights_sha256("nothing", tmp_path) is None
    ft = weights.spec_for("htdemucs_ft")  # several files: the sha256 of their "NAME SHA256" lines
    lines = "".join(f"{f.name} {f.sha256}\n" for f in ft.files)
    assert registry.weights_sha256("htdemucs_ft") == hashlib.sha256(lines.encode()).hexdigest()
