"""A full disk under `unbake separate` (issue 12, items 1 and 2), on a real tmpfs of a few pages too few.

Item 1: near the end of the writes, pedalboard's close() does not report the final flush that
failed; the stems must be read back before the rename. Item 2: earlier, pedalboard's RuntimeError
must become one line, the next input must still be separated, and no empty folder may be left.
Each case runs the real CLI (through the session's engine, and in process) on the real 6.8 s song.

Mounting a tmpfs needs root (CI runs the tests as root); elsewhere these tests skip and say why.
"""
import math
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

MODEL = "spleeter-2stems"
PAGE = os.sysconf("SC_PAGE_SIZE")
FRAMES = 299880  # music-delta-80s-rock/mixture.wav: 6.8 s at 44.1 kHz, stereo


@pytest.fixture(scope="module")
def song(eval_dir) -> Path:
    path = eval_dir / "music-delta-80s-rock" / "mixture.wav"
    assert sf.info(str(path)).frames == FRAMES
    return path


@pytest.fixture
def tmpfs(tmp_path):
    """mount(bytes) -> a fresh tmpfs of that size (rounded up to pages by the kernel); unmounted after."""
    mounted = []

    def mount(size_bytes: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a small tmpfs (CI runs the tests as root)")
        where = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in mounted:
            if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)


def stem_pages(frames: int) -> int:
    """Pages one 16-bit stereo WAV stem of ``frames`` takes, written as unbake writes it."""
    from pedalboard.io import AudioFile
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"unbake-probe-{uuid.uuid4().hex}.wav"
    try:
        with AudioFile(str(probe), "w", samplerate=44100, num_channels=2, bit_depth=16) as f:
            f.write(np.zeros((2, frames), np.float32))
        return math.ceil(probe.stat().st_size / PAGE)
    finally:
        probe.unlink(missing_ok=True)


def unbake(*args):
    return subprocess.run([sys.executable, "-m", "plugin_bridge.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("path,short_pages", [("daemon", 1), ("in-process", 4)])
def test_disk_full_near_the_end_is_one_line_and_nothing_is_renamed(song, spleeter_repo, engine_endpoint, tmpfs,
                                                                    monkeypatch, path, short_pages):
    monkeypatch.setenv("UNBAKE_ENDPOINT", engine_endpoint)
    pages = 2 * stem_pages(FRAMES) - short_pages  # both stems but a few pages
    out = tmpfs(pages * PAGE)
    r = unbake("separate", *(["--in-process"] if path == "in-process" else []), "-n", MODEL, "-q", "-o", out, song)
    assert r.returncode == 1, r.stderr
    track = out / MODEL / "mixture"
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and lines[1] == "error: 1 of 1 file(s) failed", r.stderr
    # Either a write fails (pedalboard raises), or only the final flush at close does, which pedalboard
    # does not report: then the frames read back from disk are fewer than those handed over.
    m = re.fullmatch(rf"error: {re.escape(str(song))}: {re.escape(str(track))}/(?:vocals|accompaniment)\.wav: "
                     rf"cannot write"
                     rf"(?:: (\d+) of {FRAMES} frames reached the disk)? \(the disk is full, (\d+) bytes free\)",
                     lines[0])
    assert m, r.stderr
    if m.group(1) is not None:
        assert int(m.group(1)) < FRAMES
    assert int(m.group(2)) < PAGE
    assert everything_under(out) == []  # no stem, no temp file, no folder


def test_disk_full_earlier_is_one_line_and_the_next_input_is_separated(song, spleeter_repo, engine_endpoint,
                                                                       tmpfs, tmp_path, monkeypatch):
    monkeypatch.setenv("UNBAKE_ENDPOINT", engine_endpoint)
    short = tmp_path / "short.wav"  # 0.25 s: its stems fit where the song's do not
    data, sr = sf.read(str(song), dtype="float32", frames=11025)
    sf.write(str(short), data, sr, subtype="PCM_16")
    out = tmpfs(64 * PAGE)  # a quarter of one stem of the song
    r = unbake("separate", "-n", MODEL, "-q", "-o", out, song, short)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and lines[1] == "error: 1 of 2 file(s) failed", r.stderr
    assert re.fullmatch(rf"error: {re.escape(str(song))}: {re.escape(str(out / MODEL / 'mixture'))}/"
                        rf"(vocals|accompaniment)\.wav: cannot write \(the disk is full, \d+ bytes free\)",
                        lines[0]), r.stderr
    # the next input was separated; no folder left for the song (OUT/MODEL/mixture)
    assert everything_under(out) == [MODEL, f"{MODEL}/short", f"{MODEL}/short/accompaniment.wav",
                                     f"{MODEL}/short/vocals.wav"]
    assert sf.info(str(out / MODEL / "short" / "vocals.wav")).frames == 11025
