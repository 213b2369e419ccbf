#!/usr/bin/env python3
"""unbake for Audacity: separate the current selection into stems, one new track per stem, aligned.

Needs Audacity 3.x (tested with 3.2.4) running with mod-script-pipe enabled (Edit > Preferences >
Modules: mod-script-pipe "Enabled", then restart Audacity). Select a time range on one or more audio
tracks, then run, with the unbake virtual environment's Python:

    .venv/bin/python install/daw/audacity_unbake.py [--model M] [--endpoint E] [--start S --end E]

The selection is read and checked first (a problem is one line on stderr, exit status 1, within
seconds, before any engine starts), exported as float WAV (Export2; the user's WAV format preference
is put back), separated by the engine (started in the background when none runs, as `unbake
separate` does), and each stem is imported (Import2) as a track "<name> - <stem>" whose clip starts at
the selection start (SetClip). --start/--end (seconds) set the selection instead of reading it. The
work is done by ``plugin_bridge.audacity``.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if (REPO / "plugin_bridge").is_dir() and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def default_work_dir() -> Path:
    try:
        import platformdirs
        return Path(platformdirs.user_data_dir("unbake")) / "audacity"
    except ImportError:
        return Path.home() / ".unbake-audacity"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="audacity_unbake.py",
                                     description="Separate Audacity's selection into stem tracks (mod-script-pipe).")
    parser.add_argument("-n", "--model", help="model name (default: the engine's default)")
    parser.add_argument("--endpoint", help="engine endpoint (default: $UNBAKE_ENDPOINT or the per-user socket, "
                                           "where an engine is started when none runs)")
    parser.add_argument("--start", type=float, help="selection start, seconds (sets Audacity's selection)")
    parser.add_argument("--end", type=float, help="selection end, seconds")
    parser.add_argument("--name", help="names the stem tracks and files (default: the selected track's name)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help=f"where the stem files are kept (default: {default_work_dir()})")
    parser.add_argument("--segment", type=float, help="segment length in seconds (model default)")
    parser.add_argument("--shifts", type=int, help="test-time augmentation passes (model default)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="engine reply timeout (default 60)")
    parser.add_argument("--pipe-to", help="mod-script-pipe's command pipe (default: the platform's)")
    parser.add_argument("--pipe-from", help="mod-script-pipe's reply pipe (default: the platform's)")
    args = parser.parse_args(argv)
    if (args.start is None) != (args.end is None):
        parser.error("--start and --end go together")

    from engine.errors import UnbakeError
    from plugin_bridge.audacity import PipeTransport, audacity_selection_plan, audacity_separate_selection
    from plugin_bridge.daw import connect
    work_dir = args.work_dir or default_work_dir()
    try:
        with PipeTransport(args.pipe_to, args.pipe_from) as pipe:
            # read and check the selection before the engine starts: a problem is reported in seconds
            plan = audacity_selection_plan(pipe, args.start, args.end)
            with connect(args.endpoint, timeout_s=args.timeout_s) as client:
                result = audacity_separate_selection(
                    pipe, client, work_dir, model=args.model, plan=plan,
                    name=args.name, segment_s=args.segment, shifts=args.shifts)
    except UnbakeError as e:
        print(f"unbake: {e}", file=sys.stderr)
        return 1
    past = f" (the selection runs to {plan.end_s:.3f} s, past the end of the audio)" if plan.end_s > result.end_s else ""
    print(f"unbake: {result.end_s - result.start_s:.3f} s from {result.start_s:.3f} s{past} "
          f"({result.channels} channel(s)) -> {len(result.stems)} stem tracks")
    for track, path in zip(result.tracks, result.stems.values()):
        print(f"  {track}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
