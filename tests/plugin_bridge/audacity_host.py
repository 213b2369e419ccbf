"""The real Audacity (Debian's package, 3.2.4 on Debian 12) under Xvfb, scriptable through mod-script-pipe,
for the tests: one instance for the whole session, with a private HOME, so that nothing of a user's
Audacity set-up is read or changed.

Starting it takes two runs. The first run of a fresh profile has Audacity's plugin validator (a second
process) scan the plugins; were mod-script-pipe enabled then, that process would recreate the pipes
while the main one is already waiting on the old ones. So the first run has the module disabled, only
writes the profile (audacity.cfg, pluginregistry.cfg) and is stopped; then the profile gets:
``[Module] mod-script-pipe=1``, ``[ModulePath]`` (the .so) and ``[ModuleDateTime]`` (its mtime, without
which Audacity resets the module to "new" and does not load it), ``[GUI] ShowSplashScreen=0`` (no
Welcome dialog; the first run rewrites [GUI], so this goes in after it), no ``[ActiveProjects]`` (no
recovery dialog after the first run was stopped) and a private ``[Directories] TempDir``.

The pipes are per user (``/tmp/audacity_script_pipe.to.<uid>``): only one Audacity at a time. A stale
one left by an earlier test session (its pids are kept in ``STALE_FILE``, and its environment carries
``UNBAKE_TEST_AUDACITY=1``) is killed first; another Audacity listening on the pipes fails the tests.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from plugin_bridge.audacity import PipeTransport, audacity_command

STALE_FILE = Path(f"/tmp/unbake-test-audacity.{os.getuid()}.json")
MARK = "UNBAKE_TEST_AUDACITY"
START_TIMEOUT_S = 60.0


def missing() -> str | None:
    """Why the real Audacity cannot run here, or None."""
    for tool, package in (("audacity", "audacity"), ("Xvfb", "xvfb")):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install {package}; install/install.sh --test does it as root)"
    if module_path() is None:
        return "needs Audacity's mod-script-pipe module (Debian's audacity package ships it)"
    return None


def module_path() -> str | None:
    for pattern in ("/usr/lib/audacity/modules/mod-script-pipe.so", "/usr/lib/*/audacity/modules/mod-script-pipe.so",
                    "/usr/local/lib/audacity/modules/mod-script-pipe.so"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def _pipes() -> tuple[str, str]:
    uid = os.getuid()
    return f"/tmp/audacity_script_pipe.to.{uid}", f"/tmp/audacity_script_pipe.from.{uid}"


def someone_listening() -> bool:
    """True when a process reads the per-user command pipe (an Audacity with mod-script-pipe)."""
    to_path = _pipes()[0]
    if not os.path.exists(to_path):
        return False
    try:
        os.close(os.open(to_path, os.O_WRONLY | os.O_NONBLOCK))
        return True
    except OSError:
        return False


def _ours(pid: int) -> bool:
    try:
        return f"{MARK}=1".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def kill_stale() -> None:
    """Kill the Audacity and Xvfb an earlier test session left running (only processes marked as ours)."""
    if not STALE_FILE.exists():
        return
    try:
        pids = json.loads(STALE_FILE.read_text()).get("pids", [])
    except (OSError, ValueError):
        pids = []
    for pid in pids:
        if isinstance(pid, int) and _ours(pid):
            os.kill(pid, signal.SIGKILL)
    STALE_FILE.unlink(missing_ok=True)


def _read_cfg(path: Path) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {"": {}}
    current = ""
    for line in path.read_text(errors="replace").splitlines():
        if m := re.fullmatch(r"\[(.*)\]", line.strip()):
            current = m[1]
            sections.setdefault(current, {})
        elif "=" in line:
            key, _, value = line.partition("=")
            sections[current][key] = value
    return sections


def _write_cfg(path: Path, sections: dict[str, dict[str, str]]) -> None:
    lines = [f"{k}={v}" for k, v in sections.get("", {}).items()]
    for name, values in sections.items():
        if name:
            lines.append(f"[{name}]")
            lines.extend(f"{k}={v}" for k, v in values.items())
    path.write_text("\n".join(lines) + "\n")


class AudacityHost:
    """A running Audacity: ``command(text)`` sends one scripting command (``audacity_command``),
    ``dialogs()`` lists the windows that appeared since it started (a dialog: none should),
    ``close_dialogs()`` closes them (Escape), ``reset()`` empties the project, ``stop()`` ends it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.home = self.root / "home"
        self.cfg_dir = self.home / ".audacity-data"
        self.temp = self.root / "audacity-temp"
        self.env = dict(os.environ, HOME=str(self.home), **{MARK: "1"})
        for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
            self.env.pop(var, None)
        self.xvfb = self.proc = None
        self.main_windows: set[str] = set()
        self.pipe: PipeTransport | None = None

    # -- processes
    def _start_xvfb(self) -> None:
        read_fd, write_fd = os.pipe()
        self.xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1280x1024x24",
                                      "-nolisten", "tcp"], pass_fds=(write_fd,), env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(write_fd)
        with os.fdopen(read_fd) as f:
            display = f.readline().strip()
        if not display:
            raise RuntimeError("Xvfb did not start")
        self.env["DISPLAY"] = f":{display}"

    def _launch(self) -> None:
        log = open(self.root / "audacity.log", "ab")
        self.proc = subprocess.Popen(["audacity"], env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        STALE_FILE.write_text(json.dumps({"pids": [self.proc.pid, self.xvfb.pid]}))

    def _end_audacity(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: Audacity and its validator child
            self.proc.wait()
        self.proc = None

    def _write_profile(self, enabled: bool) -> None:
        cfg = self.cfg_dir / "audacity.cfg"
        sections = _read_cfg(cfg) if cfg.exists() else {"": {}}
        so = module_path()
        sections.pop("ActiveProjects", None)
        sections.setdefault("Module", {})["mod-script-pipe"] = "1" if enabled else "0"
        sections.setdefault("ModulePath", {})["mod-script-pipe"] = so
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.path.getmtime(so)))
        sections.setdefault("ModuleDateTime", {})["mod-script-pipe"] = stamp
        sections.setdefault("GUI", {})["ShowSplashScreen"] = "0"
        sections.setdefault("Directories", {})["TempDir"] = str(self.temp)
        _write_cfg(cfg, sections)

    def start(self) -> AudacityHost:
        if someone_listening():
            raise RuntimeError(f"another Audacity is listening on {_pipes()[0]}: close it to run these tests "
                               f"(the pipes are per user, so only one Audacity at a time)")
        self.cfg_dir.mkdir(parents=True, exist_ok=True)
        self.temp.mkdir(parents=True, exist_ok=True)
        self._start_xvfb()
        # 1: a first run writes the profile and the plugin registry, with the module off
        self._write_profile(enabled=False)
        self._launch()
        deadline = time.monotonic() + START_TIMEOUT_S
        registry = self.cfg_dir / "pluginregistry.cfg"
        while not (registry.exists() and "[Version]" in (self.cfg_dir / "audacity.cfg").read_text(errors="replace")
                   and not self._children()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"Audacity's first run did not write its profile: {self.log_tail()}")
            time.sleep(0.2)
        time.sleep(0.5)
        self._end_audacity()
        # 2: the real run, with mod-script-pipe
        shutil.rmtree(self.temp, ignore_errors=True)
        self.temp.mkdir()
        self._write_profile(enabled=True)
        self._launch()
        while True:
            try:
                self.pipe = PipeTransport(timeout_s=10)
                audacity_command(self.pipe, "Message: Text=ready")
                break
            except Exception:
                if self.pipe is not None:
                    self.pipe.close()
                    self.pipe = None
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"Audacity did not answer on its pipes: {self.log_tail()}") from None
                time.sleep(0.2)
        self.main_windows = set(self.windows())
        return self

    def _children(self) -> list[str]:
        try:
            return [c for t in Path(f"/proc/{self.proc.pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
        except OSError:
            return []

    def stop(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None
        self._end_audacity()
        if self.xvfb is not None and self.xvfb.poll() is None:
            self.xvfb.terminate()
            try:
                self.xvfb.wait(10)
            except subprocess.TimeoutExpired:
                self.xvfb.kill()
                self.xvfb.wait()
        STALE_FILE.unlink(missing_ok=True)

    def log_tail(self) -> str:
        try:
            return (self.root / "audacity.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    # -- the GUI, through xdotool
    def windows(self) -> list[str]:
        if shutil.which("xdotool") is None:
            return []
        out = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", "."], env=self.env,
                             capture_output=True, text=True, timeout=10).stdout
        return out.split()

    def window_name(self, wid: str) -> str:
        return subprocess.run(["xdotool", "getwindowname", wid], env=self.env, capture_output=True,
                              text=True, timeout=10).stdout.strip()

    def dialogs(self) -> list[str]:
        """The names of the windows that are not Audacity's main window (a dialog Audacity opened)."""
        return [self.window_name(w) for w in self.windows() if w not in self.main_windows]

    def close_dialogs(self) -> None:
        for wid in self.windows():
            if wid not in self.main_windows:
                subprocess.run(["xdotool", "windowfocus", "--sync", wid], env=self.env, timeout=10)
                subprocess.run(["xdotool", "key", "Escape"], env=self.env, timeout=10)
        time.sleep(0.3)

    # -- scripting
    def command(self, text: str, timeout_s: float | None = None) -> str:
        return audacity_command(self.pipe, text, timeout_s=timeout_s)

    def json(self, text: str):
        return json.loads(self.command(text))

    def resync(self, late_replies: int) -> None:
        """Read the replies that came after their command timed out (a dialog held them back)."""
        for _ in range(late_replies):
            self.pipe.receive(10)

    def release(self) -> None:
        """Close this side of the pipes (a script is about to use them)."""
        self.pipe.close()

    def reopen(self) -> None:
        self.pipe = PipeTransport(timeout_s=10)

    def reset(self) -> None:
        """An empty project: all tracks removed, nothing selected."""
        self.close_dialogs()
        self.command("SelectAll:")
        self.command("RemoveTracks:")
        self.command("SelectTime: Start=0 End=0 RelativeTo=ProjectStart")
