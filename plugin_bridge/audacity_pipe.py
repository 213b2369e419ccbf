"""mod-script-pipe, Audacity's scripting pipes, torch-free: one command line out, one reply back.

A reply, as Audacity 3.x writes it, is: optional empty lines (3.2 starts every reply of a command
that prints nothing, and every GetInfo reply, with one), the command's output lines, the status
line ``BatchCommand finished: OK`` (or ``Failed!``), and one empty line that ends the reply. The
readers here skip the leading empty lines (as Audacity's own ``pipe_test.py`` does) and read up to
and including that empty line, so that they never fall one reply behind.

``PipeTransport`` waits at most ``timeout_s`` seconds for a reply (POSIX): a command that should
answer at once and does not (a modal dialog is open in Audacity, or Audacity is busy) is reported in
seconds instead of hanging the script.
"""
from __future__ import annotations

import errno
import os
import select
import sys
import time
from collections.abc import Callable

from engine.errors import UnbakeError

__all__ = ["AudacityError", "PipeTransport", "FINISHED", "COMMAND_TIMEOUT_S", "take_reply", "read_reply_lines"]

FINISHED = "BatchCommand finished:"
COMMAND_TIMEOUT_S = 5.0   # seconds a command that answers at once may take (all but Export2/Import2)
REOPEN_WAIT_S = 1.0       # seconds to wait for Audacity to listen again after another client closed the pipe
_HINT = "is Audacity running, with mod-script-pipe enabled (Edit > Preferences > Modules, then restart Audacity)?"


class AudacityError(UnbakeError):
    """Audacity answered a scripting command with a failure, or not at all (never on the wire)."""


def take_reply(pending: str) -> tuple[str, str] | None:
    """Split one whole reply off the front of ``pending`` (text read from the reply pipe, "\\n" line
    ends). Returns (reply, rest): the reply without its leading empty lines nor its terminating empty
    line ("...BatchCommand finished: OK\\n"), and what follows it; None while the reply is incomplete."""
    text = pending.lstrip("\n")
    at = 0
    while True:
        i = text.find(FINISHED, at)
        if i < 0:
            return None
        eol = text.find("\n", i)
        if eol < 0 or eol + 1 >= len(text):
            return None  # the status line or its terminating empty line is still to come
        if (i == 0 or text[i - 1] == "\n") and text[eol + 1] == "\n":
            return text[:eol + 1], text[eol + 2:]
        at = i + 1


def read_reply_lines(readline: Callable[[], str]) -> str:
    """One reply read line by line with ``readline`` (a text pipe's ``readline``: "" at the end of
    the file): leading empty lines skipped, up to the status line, then its terminating empty line
    consumed. Returns the reply as ``take_reply`` does. Raises AudacityError when the pipe closes."""
    lines: list[str] = []
    while True:
        line = readline()
        if line == "":
            raise AudacityError("Audacity closed its reply pipe (did it quit?)")
        line = line.replace("\r", "").rstrip("\0")
        if not lines and not line.strip():
            continue  # the empty line 3.x sends before a reply
        lines.append(line if line.endswith("\n") else line + "\n")
        if line.startswith(FINISHED):
            readline()  # the empty line that ends the reply
            return "".join(lines)


class PipeTransport:
    """mod-script-pipe's named pipes: ``/tmp/audacity_script_pipe.to.<uid>`` and ``.from.<uid>`` on
    Linux and macOS, ``\\\\.\\pipe\\ToSrvPipe`` and ``\\\\.\\pipe\\FromSrvPipe`` on Windows.

    ``send(command, timeout_s=None)`` writes one command line and returns Audacity's reply (see
    ``take_reply``: "BatchCommand finished: OK" included, no empty lines around it). ``timeout_s``
    (seconds; default the transport's ``timeout_s``, ``COMMAND_TIMEOUT_S``): how long to wait for the
    reply, POSIX only (Windows' pipes are read blocking). Raises AudacityError when Audacity is not
    listening, closes the pipe, or does not answer in time.
    """

    def __init__(self, to_path: str | None = None, from_path: str | None = None, *,
                 timeout_s: float = COMMAND_TIMEOUT_S):
        if sys.platform == "win32":
            self.to_path = to_path or r"\\.\pipe\ToSrvPipe"
            self.from_path = from_path or r"\\.\pipe\FromSrvPipe"
            self.eol = "\r\n\0"
        else:
            uid = os.getuid()
            self.to_path = to_path or f"/tmp/audacity_script_pipe.to.{uid}"
            self.from_path = from_path or f"/tmp/audacity_script_pipe.from.{uid}"
            self.eol = "\n"
        self.timeout_s = float(timeout_s)
        self._to = self._from = None
        self._pending = ""

    def _open(self) -> None:
        if sys.platform == "win32":
            try:
                self._to = open(self.to_path, "wt+")  # as Audacity's own pipe_test.py
                self._from = open(self.from_path, "rt")
            except OSError as e:
                raise AudacityError(f"cannot open {self.to_path}: {e.strerror or e}; {_HINT}") from None
            return
        if not (os.path.exists(self.to_path) and os.path.exists(self.from_path)):
            raise AudacityError(f"Audacity is not listening (no pipe {self.to_path}); {_HINT}")
        deadline = time.monotonic() + REOPEN_WAIT_S
        while True:
            try:  # non-blocking first: a pipe nobody reads is refused (ENXIO) instead of hanging
                fd = os.open(self.to_path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                if e.errno == errno.ENXIO and time.monotonic() < deadline:
                    time.sleep(0.05)  # Audacity reopens its end a moment after the previous client left
                    continue
                raise AudacityError(f"Audacity is not listening on {self.to_path} ({e.strerror or e}); "
                                    f"{_HINT}") from None
        os.set_blocking(fd, True)
        self._to = fd
        # Audacity opens its reply pipe for writing once it has our command pipe open: this returns then
        self._from = os.open(self.from_path, os.O_RDONLY | os.O_NONBLOCK)

    def send(self, command: str, timeout_s: float | None = None) -> str:
        if self._to is None:
            self._open()
        name = command.split(":")[0]
        if sys.platform == "win32":
            self._to.write(command + self.eol)
            self._to.flush()
            return read_reply_lines(self._from.readline)
        data = (command + self.eol).encode("utf-8")
        while data:
            data = data[os.write(self._to, data):]
        return self.receive(timeout_s, name)

    def receive(self, timeout_s: float | None = None, name: str = "") -> str:
        """Read one reply without sending anything (POSIX): a reply that came late, after ``send``
        gave up waiting for it, is read so, and the pipe is in step again. Raises as ``send``."""
        wait_s = self.timeout_s if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + wait_s
        while (split := take_reply(self._pending)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from], [], [], left)[0]:
                raise AudacityError(f"Audacity did not answer {name or 'a command'!r} within {wait_s:g} s: is a dialog "
                                    f"open in Audacity? Close it and run again")
            try:
                chunk = os.read(self._from, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                if self._writer_seen:
                    raise AudacityError(f"Audacity closed {self.from_path} (did it quit?)")
                time.sleep(0.01)  # Audacity has not opened its end yet
                continue
            self._writer_seen = True
            self._pending += chunk.decode("utf-8", errors="replace").replace("\r", "")
        reply, self._pending = split
        return reply

    _writer_seen = False

    def close(self) -> None:
        for handle in (self._to, self._from):
            if handle is None:
                continue
            if isinstance(handle, int):
                os.close(handle)
            else:
                handle.close()
        self._to = self._from = None

    def __enter__(self) -> PipeTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
