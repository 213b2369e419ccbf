"""The real daemon as a process on an ipc:// endpoint in a temp folder, and a raw DEALER peer.

Tests drive it through the wire protocol itself (``Peer``) or through plugin_bridge.client.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

from engine import protocol as P

REPO = Path(__file__).resolve().parents[2]


class EngineProcess:
    """``python -m engine.daemon --endpoint ENDPOINT ARGS...``; ``start()`` waits until it answers.
    ``cwd``: the checkout whose engine runs (default: this one; benchmarks run an older one too)."""

    def __init__(self, endpoint: str, *args: str, env: dict | None = None, log: Path | None = None,
                 cwd: Path | None = None):
        self.endpoint, self.args = endpoint, [str(a) for a in args]
        self.cwd = Path(cwd) if cwd is not None else REPO
        self.env = {**os.environ, **(env or {})}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0, wait: bool = True) -> "EngineProcess":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.daemon", "--endpoint", self.endpoint,
                                      *self.args], cwd=self.cwd, env=self.env, stdout=out, stderr=out)
        if wait:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            try:
                with Peer(self.endpoint) as peer:
                    return peer.call(P.HELLO, timeout_s=0.5)
            except TimeoutError:
                continue
        raise RuntimeError(f"daemon did not answer within {timeout_s} s: {self.log_text()[-2000:]}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def status(self) -> dict:
        with Peer(self.endpoint) as peer:
            return peer.call(P.STATUS, timeout_s=5)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        try:
            self.stop()
        except Exception:
            self.kill()


class Peer:
    """A raw DEALER speaking the wire protocol, for tests that must send what a Client never would."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None):
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.next_id = 1

    def send(self, frames: list) -> None:
        self.sock.send_multipart(frames, copy=False)

    def recv(self, timeout_s: float = 10.0) -> tuple[dict, list[bytes]]:
        if not self.sock.poll(timeout_s * 1000):
            raise TimeoutError(f"no reply in {timeout_s} s")
        frames = self.sock.recv_multipart()
        return P.unpack_header(frames[0], P.Limits()), frames[1:]

    def request(self, op: str, pcm=(), **fields) -> int:
        rid = self.next_id
        self.next_id += 1
        self.send(P.request(op, rid, list(pcm), **fields))
        return rid

    def replies(self, rid: int, timeout_s: float = 30.0) -> list[tuple[dict, list[bytes]]]:
        """Every reply to request ``rid`` up to its terminal one."""
        out = []
        while True:
            header, pcm = self.recv(timeout_s)
            if header.get("re") != rid:
                continue
            out.append((header, pcm))
            if header["kind"] in P.TERMINAL:
                return out

    def call(self, op: str, pcm=(), timeout_s: float = 30.0, **fields) -> dict:
        """The terminal reply's header."""
        return self.replies(self.request(op, pcm, **fields), timeout_s)[-1][0]

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")
