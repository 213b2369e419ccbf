"""Engine autostart for the client: the hello probe, the daemon's lock, the start lock, spawning
``python -m engine.daemon`` and the tail of its log when it fails (part of ``plugin_bridge.client``).

``Autostart`` is a mixin of ``plugin_bridge.client.Client`` (with ``plugin_bridge.transport.Transport``):
its methods use the Client's ``endpoint``, ``start_timeout_s``, ``daemon_args`` and ``_hello``.
One daemon per endpoint even when several processes start one at once: they serialise on
``<lock_path>.start``. Torch-free.
"""
from __future__ import annotations

import fcntl
import math
import os
import subprocess
import sys
import time

import zmq

import engine
from engine import endpoints, protocol
from engine.errors import EngineUnavailable, ProtocolError, UnbakeError, from_code

from .transport import _REPLY_LIMITS

PROBE_TIMEOUT_S = 0.5      # the hello probe that decides whether a daemon runs
IDLE_EXIT_S = 600          # an autostarted daemon exits after this long without clients
_SPAWNED: list[subprocess.Popen] = []  # keep spawned daemons referenced (no ResourceWarning at GC)


def _tail(path: str, offset: int, max_bytes: int = 2000, lines: int = 6) -> str:
    """The last lines written to ``path`` after ``offset``, joined on one line."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


class Autostart:
    """Probing for and starting the daemon of a ``Client`` (see the module)."""

    def _probe(self, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
        """Does a daemon answer hello at the endpoint within ``timeout_s``? (A fresh socket each time.)"""
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[len("ipc://"):]):
            return False
        sock = self._new_socket()
        try:
            rid = self._new_id()
            sock.send_multipart(protocol.request(protocol.HELLO, rid, client=self._client_name()),
                                flags=zmq.NOBLOCK)
            deadline = time.monotonic() + timeout_s
            while (remaining := deadline - time.monotonic()) > 0:
                if not sock.poll(max(1, math.ceil(remaining * 1000)), zmq.POLLIN):
                    continue
                frames = sock.recv_multipart()
                try:
                    header = protocol.check_reply(protocol.unpack_header(frames[0], _REPLY_LIMITS))
                except ProtocolError:
                    return False
                if header.get("re") not in (rid, None):
                    continue
                if header.get("kind") == protocol.K_ERROR:
                    err = from_code(str(header.get("code")), str(header.get("message")))
                    if isinstance(err, EngineUnavailable):
                        return False  # shutting down: not a daemon to talk to
                    raise err
                self._check_hello(header)
                self._hello = header
                return True
            return False
        except zmq.ZMQError:
            return False
        finally:
            sock.close()

    def _daemon_lock_held(self) -> bool:
        """Is the endpoint's daemon lock (``protocol.lock_path``) held, i.e. a daemon up or starting?"""
        try:
            fd = os.open(protocol.lock_path(self.endpoint), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OSError, UnbakeError):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def _ensure_daemon(self) -> None:
        """Make sure a daemon answers at the endpoint, starting one if needed (one per endpoint even
        when several processes try at once: they serialise on ``<lock_path>.start``)."""
        if self._probe():
            return
        start_lock = protocol.lock_path(self.endpoint) + ".start"
        try:
            os.makedirs(os.path.dirname(start_lock) or ".", mode=0o700, exist_ok=True)
        except OSError as e:
            raise EngineUnavailable(f"cannot start the unbake engine at {self.endpoint}: "
                                    f"{os.path.dirname(start_lock)}: {e.strerror}") from None
        fd = endpoints.open_lock(start_lock)  # never through a symlink; NotPrivate otherwise
        try:
            deadline = time.monotonic() + self.start_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EngineUnavailable(
                            f"another process has been starting the unbake engine at {self.endpoint} for "
                            f"more than {self.start_timeout_s:g} s (lock {start_lock})") from None
                    time.sleep(0.05)
            if self._probe():  # someone else started it meanwhile
                return
            self._start_daemon()
        finally:
            os.close(fd)  # releases the flock

    def _start_daemon(self) -> None:
        log_path = os.path.join(protocol.runtime_dir(), "engine.log")
        cmd = [sys.executable, "-m", "engine.daemon", "--endpoint", self.endpoint,
               "--idle-exit-s", str(IDLE_EXIT_S), *self.daemon_args]
        env = dict(os.environ)  # the daemon runs the engine this client was imported with
        root = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0

        def spawn() -> tuple[subprocess.Popen, bool]:
            busy = self._daemon_lock_held()  # a daemon is exiting (or stuck): ours may refuse
            try:
                log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise EngineUnavailable(f"cannot start the unbake engine: its log {log_path}: {e.strerror}") from None
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        close_fds=True, start_new_session=True, env=env)
            except OSError as e:
                raise EngineUnavailable(f"cannot start the unbake engine ({cmd[0]} -m engine.daemon): {e}") from None
            finally:
                os.close(log)
            _SPAWNED.append(proc)
            return proc, busy

        proc, busy = spawn()
        spawns = 1
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            began = time.monotonic()
            if self._probe():
                return
            code = proc.poll()
            if code is not None and not self._daemon_lock_held():
                if busy and spawns < 3:  # it refused while another daemon was going away: again
                    proc, busy = spawn()
                    spawns += 1
                else:
                    tail = _tail(log_path, offset)
                    raise EngineUnavailable(
                        f"the unbake engine exited with status {code} before answering at {self.endpoint}"
                        f"{': ' + tail if tail else ''} (log: {log_path})")
            if time.monotonic() > deadline:
                raise EngineUnavailable(f"the unbake engine started for {self.endpoint} did not answer within "
                                        f"{self.start_timeout_s:g} s (log: {log_path})")
            time.sleep(max(0.0, 0.1 - (time.monotonic() - began)))
