"""unbake for REAPER (Python ReaScript): separate the selected media items into stems.

Each selected item's stems land on new tracks right below its track ("<take> - <stem>"), at the
item's position, sample-aligned; the stem files go to "<project media folder>/unbake". The work is
done by ``plugin_bridge.daw.reaper_separate_selected`` (see there for what is skipped or rendered).

Install: Preferences > Plug-ins > ReaScript: enable Python, pointing REAPER at the libpython of the
same version as the unbake virtual environment (3.11). Then Actions > Show action list > New action >
Load ReaScript... > this file.

Configuration: edit the constants below, or set these environment variables before starting REAPER:

  UNBAKE_PYTHONPATH  folders to put on sys.path, separated by os.pathsep. Default: the unbake checkout
                     that holds this file (install/daw/ is two levels below it) and its .venv's
                     site-packages for REAPER's Python version.
  UNBAKE_PYTHON      the interpreter that starts the engine when none runs (default: the checkout's
                     .venv/bin/python; REAPER's own executable cannot).
  UNBAKE_MODEL       the model (default: the engine's default).
  UNBAKE_ENDPOINT    the engine's endpoint (default: the per-user socket, as `unbake`).
  UNBAKE_AUTOSTART   0: never start an engine, only use a running one.
  UNBAKE_STEMS_DIR   where the stem files go (default: <project media folder>/unbake).
"""
import os
import sys

# -- configuration (the environment variables above override these) ------------------------------
CHECKOUT = ""     # e.g. "/home/me/src/unbake"; "" = the checkout this file is in
PYTHON = ""       # e.g. "/home/me/src/unbake/.venv/bin/python"
MODEL = ""        # e.g. "htdemucs"; "" = the engine's default
# ---------------------------------------------------------------------------------------------------


def _reaper_api():
    """The ReaScript API REAPER put in this script's globals (``from reaper_python import *``), as an
    object with the ``RPR_*`` functions as attributes."""
    import types
    names = {k: v for k, v in globals().items() if k.startswith("RPR_")}
    if "RPR_ShowConsoleMsg" not in names:
        import reaper_python  # outside a ReaScript's globals, REAPER's module itself
        names = {k: getattr(reaper_python, k) for k in dir(reaper_python) if k.startswith("RPR_")}
    return types.SimpleNamespace(**names)


def _checkout():
    where = os.environ.get("UNBAKE_CHECKOUT") or CHECKOUT
    if where:
        return os.path.abspath(where)
    here = globals().get("__file__")
    if here:
        return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(here))))
    return ""


def _add_paths(say):
    """Put unbake and its dependencies on sys.path; returns False (after saying why) when it cannot."""
    import glob
    import site
    extra = os.environ.get("UNBAKE_PYTHONPATH")
    if extra:
        for folder in reversed([p for p in extra.split(os.pathsep) if p]):
            site.addsitedir(folder)
            if folder in sys.path:
                sys.path.remove(folder)
            sys.path.insert(0, folder)
        return True
    checkout = _checkout()
    if not checkout or not os.path.isdir(os.path.join(checkout, "plugin_bridge")):
        say("unbake: cannot find the unbake checkout: set CHECKOUT at the top of this script, "
            "or UNBAKE_PYTHONPATH")
        return False
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    venv = os.path.join(checkout, ".venv")
    wanted = [os.path.join(venv, "lib", version, "site-packages"), os.path.join(venv, "Lib", "site-packages")]
    found = [p for p in wanted if os.path.isdir(p)]
    if found:
        site.addsitedir(found[0])
        return True
    others = sorted(glob.glob(os.path.join(venv, "lib", "python*", "site-packages")))
    if others:
        say(f"unbake: REAPER runs Python {sys.version_info[0]}.{sys.version_info[1]}, the unbake virtual "
            f"environment is {others[0].split(os.sep)[-2]}: point REAPER at that libpython "
            f"(Preferences > Plug-ins > ReaScript), or set UNBAKE_PYTHONPATH")
        return False
    return True  # no .venv: the packages may be installed for REAPER's Python itself


def main():
    rpr = _reaper_api()

    def say(line):
        rpr.RPR_ShowConsoleMsg(f"{line}\n")

    if not _add_paths(say):
        return
    try:
        from engine.errors import UnbakeError
        from plugin_bridge import daw
    except ImportError as e:
        say(f"unbake: cannot import unbake ({e}); set UNBAKE_PYTHONPATH or CHECKOUT (see the top of this script)")
        return
    checkout = _checkout()
    python = os.environ.get("UNBAKE_PYTHON") or PYTHON
    if not python and checkout:
        candidate = os.path.join(checkout, ".venv", "bin", "python")
        python = candidate if os.path.exists(candidate) else ""
    model = os.environ.get("UNBAKE_MODEL") or MODEL or None
    autostart = os.environ.get("UNBAKE_AUTOSTART", "1") != "0"
    try:
        out_dir = os.environ.get("UNBAKE_STEMS_DIR") or daw.reaper_stems_dir(rpr)
        with daw.connect(None, autostart=autostart, python=python or None) as client:
            daw.reaper_separate_selected(rpr, client, out_dir, model=model, log=say)
    except UnbakeError as e:
        say(f"unbake: {e}")
    except Exception as e:  # a bug: the line first, then where it happened
        import traceback
        say(f"unbake: unexpected {type(e).__name__}: {e}")
        say("".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip())


main()
