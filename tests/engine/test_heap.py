"""engine.heap's glibc policy, observed through glibc's own counters (``mallinfo2``) in real processes:
the daemon's ``tune_heap`` and ``unbake separate --in-process`` keep large temporaries in the heap
(neither unmapped at free nor trimmed) until ``release_free_memory``; a setting the user made in the
environment wins."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20

# Eight 30 MiB blocks allocated then freed (a forward pass's temporaries): under glibc's defaults
# each is unmapped at free (mmap) or the heap is trimmed after them; under the policy they stay.
PROBE = """
import ctypes, json
libc = ctypes.CDLL(None)
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def probe(mib=30):
    before = libc.mallinfo2()
    blocks = [libc.malloc(mib << 20) for _ in range(8)]
    held = libc.mallinfo2()
    for b in blocks:
        libc.free(b)
    freed = libc.mallinfo2()
    from engine.heap import release_free_memory
    release_free_memory()
    released = libc.mallinfo2()
    return {"mmapped": held.hblkhd - before.hblkhd, "heap_grew": held.arena - before.arena,
            "kept_after_free": freed.arena - before.arena, "kept_after_release": released.arena - before.arena}
"""


def run_probe(code: str, env: dict | None = None) -> dict:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **(env or {})}
    r = subprocess.run([sys.executable, "-c", PROBE + code + "\nprint(json.dumps(result))"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_kept_until_released(got: dict, mib: int = 30) -> None:
    assert got["mmapped"] == 0, got
    # the heap grew by the blocks (less what free room it had at its top) and kept that at free
    assert got["kept_after_free"] == got["heap_grew"] >= 7 * mib * MIB, got
    assert got["kept_after_release"] < 30 * MIB, got  # malloc_trim gave them back


def test_glibc_defaults_unmap_or_trim_large_temporaries():
    got = run_probe("result = probe()")
    assert got["mmapped"] >= 8 * 30 * MIB or got["kept_after_free"] < 30 * MIB, got


@pytest.mark.parametrize("mib", [30, 66])  # 66 MiB: over glibc's largest mmap threshold (htdemucs' first layers)
def test_tune_heap_keeps_them_in_the_heap_until_released(mib):
    got = run_probe(f"from engine.heap import tune_heap\ntune_heap()\nresult = probe({mib})")
    assert_kept_until_released(got, mib)


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": str(128 * 1024)},
                                 {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_MMAP_MAX_": "65536"}])
def test_a_setting_in_the_environment_wins(env):
    got = run_probe("from engine.heap import tune_heap\ntune_heap()\nresult = probe()", env)
    assert got["mmapped"] >= 8 * 30 * MIB or got["kept_after_free"] < 30 * MIB, got


def test_separate_in_process_runs_under_the_policy(song_excerpt, spleeter_repo, tmp_path):
    """The CLI's in-process path (a process that runs the model, like the daemon) tunes the heap
    before it loads the model: HT-Demucs' 30 s took 0.79-0.87 of demucs' time, 0.961 without (bench_process.py)."""
    code = (f"from plugin_bridge.cli import main\n"
            f"assert main(['separate', '--in-process', '-q', '-n', 'spleeter-2stems', '-o', {str(tmp_path)!r}, "
            f"{str(song_excerpt)!r}]) == 0\n"
            f"result = probe()")
    got = run_probe(code)
    assert sorted(p.name for p in tmp_path.rglob("*.wav")) == ["accompaniment.wav", "vocals.wav"]
    # (the heap may have had room for some of the blocks already: what it grew by, it kept)
    assert got["mmapped"] == 0 and got["kept_after_free"] == got["heap_grew"] > 0, got


@pytest.mark.parametrize("mib", [30, 66])
def test_policy_env_is_the_same_policy(mib):
    """What the benchmarks give a process that does not call tune_heap (a demucs process)."""
    from engine.heap import policy_env
    got = run_probe(f"result = probe({mib})", policy_env())
    assert_kept_until_released(got, mib)
