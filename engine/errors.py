"""One exception tree for the engine, the client and the CLI. Each class has a stable ``code``
that travels on the wire and in sidecar files; messages are one line naming what and where.

    UnbakeError                      E_INTERNAL
     ├── BadAudio                    E_BAD_AUDIO       unreadable, empty, NaN/Inf, too many channels
     ├── BadRequest                  E_BAD_REQUEST     an option out of range, a bad stem name
     │    ├── UnknownSession         E_UNKNOWN_SESSION no such session (closed, cancelled, expired)
     │    └── NotPermitted           E_NOT_PERMITTED   a request this peer may not make (a TCP peer naming
     │                                                 a folder on the engine's machine)
     ├── OutputError                 E_OUTPUT          cannot write where asked
     ├── ProtocolError               E_PROTOCOL        a message that breaks the wire protocol
     │    └── LimitExceeded          E_LIMIT           a size or count over the daemon's limits
     ├── QueueFull                   E_QUEUE_FULL      too many sessions or queued requests; retry later
     ├── Cancelled                   E_CANCELLED       the session was cancelled before this finished
     ├── EngineUnavailable           E_UNAVAILABLE     no daemon answered in time, or it is shutting down
     └── ModelError                  E_MODEL
          ├── UnknownModel           E_UNKNOWN_MODEL   not in the catalog nor in --repo
          ├── WeightsMissing         E_WEIGHTS_MISSING not installed (run `unbake fetch NAME`)
          ├── ChecksumMismatch       E_CHECKSUM        a file's sha256 is not the catalog's
          ├── CheckpointError        E_CHECKPOINT      a verified file whose content cannot be loaded
          └── DownloadError          E_DOWNLOAD        no source could be reached (offline)
    UnbakeError
     └── NotPrivate                  E_NOT_PRIVATE     a runtime folder, lock file or socket path that must be
                                                       this user's alone is not (a symlink, another owner, open
                                                       to others, a file in the way): refused, nothing changed

The client raises the same classes with the daemon's code (``from_code``); ``ModelError`` is what
"model unavailable" means to a caller. This module is imported by the torch-free client: stdlib only.
"""
from __future__ import annotations


class UnbakeError(Exception):
    code = "E_INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadAudio(UnbakeError):
    code = "E_BAD_AUDIO"


class BadRequest(UnbakeError):
    code = "E_BAD_REQUEST"


class UnknownSession(BadRequest):
    code = "E_UNKNOWN_SESSION"


class NotPermitted(BadRequest):
    code = "E_NOT_PERMITTED"


class OutputError(UnbakeError):
    code = "E_OUTPUT"


class ProtocolError(UnbakeError):
    code = "E_PROTOCOL"


class LimitExceeded(ProtocolError):
    code = "E_LIMIT"


class QueueFull(UnbakeError):
    code = "E_QUEUE_FULL"


class Cancelled(UnbakeError):
    code = "E_CANCELLED"


class EngineUnavailable(UnbakeError):
    code = "E_UNAVAILABLE"


class ModelError(UnbakeError):
    code = "E_MODEL"


class UnknownModel(ModelError):
    code = "E_UNKNOWN_MODEL"


class WeightsMissing(ModelError):
    code = "E_WEIGHTS_MISSING"


class ChecksumMismatch(ModelError):
    code = "E_CHECKSUM"


class CheckpointError(ModelError):
    code = "E_CHECKPOINT"


class DownloadError(ModelError):
    code = "E_DOWNLOAD"


class NotPrivate(UnbakeError):
    code = "E_NOT_PRIVATE"


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


BY_CODE = {c.code: c for c in [UnbakeError, *_all_subclasses(UnbakeError)]}


def from_code(code: str, message: str) -> UnbakeError:
    """Rebuild the typed error a peer sent (unknown codes become UnbakeError)."""
    return BY_CODE.get(code, UnbakeError)(message)
