"""The memory of a process that runs the models: glibc heap policy, giving freed memory back, RSS
readings. Torch-free.

A daemon serves many sessions for hours, each with its own segment lengths; what its peak RSS is,
and how long each forward pass spends faulting memory in, depends on how the allocator reuses and
returns the forward passes' temporaries:

- ``tune_heap`` (at the start of the daemon and of the CLI's in-process commands): one arena, no
  mmap for large blocks, no automatic trim;
- ``release_free_memory`` (``malloc_trim``): once idle (engine.daemon), after loading a model
  (engine.cache), and before a forward pass of another shape than the last (engine.scheduler),
  whose temporaries would not fit in the holes the last ones left.
"""
from __future__ import annotations

import os
import resource


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """This process's peak RSS since it started (Linux: VmHWM). Not ru_maxrss: on Linux that keeps
    the high-water mark of the image before exec, i.e. of the parent a (v)fork-and-exec came from."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``): a long-running server otherwise
    keeps the high-water mark of every session it served (RSS grew from 0.65 to 0.84 GB over 5
    sessions of 30 s). Not after every forward pass: back-to-back requests of one shape then fault
    their memory in again (1.15x slower on spleeter). No effect where glibc is not the allocator."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None

# glibc mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
MMAP_THRESHOLD_BYTES = 32 << 20   # glibc's own upper bound for its dynamic threshold
TRIM_THRESHOLD_BYTES = 1 << 30    # in effect never: release_free_memory trims once idle
# The policy: (glibc's environment variable, its mallopt parameter, the value).
POLICY = [("MALLOC_ARENA_MAX", M_ARENA_MAX, 1),
          ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
          ("MALLOC_MMAP_MAX_", M_MMAP_MAX, 0),
          ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)]


def tune_heap() -> None:
    """The allocator policy of a process that runs the models (glibc only; a setting the user made
    with ``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` wins). Call
    before threads start.

    - One arena for every thread (the socket thread, zmq's I/O thread, the scheduler, torch's
      workers): memory one frees, another reuses.
    - No automatic trimming while busy, every block from the heap (no mmap; the threshold stays
      at 32 MiB for a user who sets ``MALLOC_MMAP_MAX_``): the forward passes run in the scheduler
      thread, and glibc shrinks a thread arena's heap after every large free, so each pass faulted
      its activations in anew. HT-Demucs through the daemon went from 1.07-1.16x to 0.88-1.02x the
      in-process time (bench_daemon_overhead.py --model htdemucs); the in-process CLI on a 30 s
      song from 0.961 to 0.79-0.87 of demucs' time (bench_process.py). Blocks over 32 MiB (htdemucs'
      first layers: 33-66 MB) were still mapped and unmapped each time: on an Intel VM that cost
      0.11-0.23 s of system time per 7.8 s segment (45-60 k minor faults); without mmap 0.03-0.09 s
      and ~1-10 k faults, the segment 0.96-0.97x, RSS the same (an AMD host: no change, RSS +3%).
      Freed memory goes back to the OS at chosen points instead (``release_free_memory``, see above).
    - Tried and left out: a fixed 1-8 MiB mmap threshold (lower RSS, but HT-Demucs 1.6-2x slower);
      jemalloc (1.8x slower: it gives memory back by itself) and tcmalloc (as fast, one more
      library to preload).
    """
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    for env, param, value in POLICY:
        if env not in os.environ:
            mallopt(param, value)


def policy_env() -> dict[str, str]:
    """``tune_heap``'s policy as glibc's environment variables, for a process that does not call it
    (the benchmarks run demucs and in-process tools under it, to tell its share of a difference)."""
    return {env: str(value) for env, _, value in POLICY}
