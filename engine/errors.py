"""One exception tree for the engine, the client and the CLI. Each class has a stable ``code``
that travels on the wire and in sidecar files; messages are one line naming what and where.

    UnbakeError                      E_INTERNAL
     ├── BadAudio                    E_BAD_AUDIO       unreadable, empty, NaN/Inf, too many channels
     ├── BadRequest                  E_BAD_REQUEST     an option out of range, a bad stem name
     ├── OutputError                 E_OUTPUT          cannot write where asked
     └── ModelError                  E_MODEL
          ├── UnknownModel           E_UNKNOWN_MODEL   not in the catalog nor in --repo
          ├── WeightsMissing         E_WEIGHTS_MISSING not installed (run `unbake fetch NAME`)
          ├── ChecksumMismatch       E_CHECKSUM        a file's sha256 is not the catalog's
          ├── CheckpointError        E_CHECKPOINT      a verified file whose content cannot be loaded
          └── DownloadError          E_DOWNLOAD        no source could be reached (offline)

This module is imported by the torch-free client: stdlib only.
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


class OutputError(UnbakeError):
    code = "E_OUTPUT"


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


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


BY_CODE = {c.code: c for c in [UnbakeError, *_all_subclasses(UnbakeError)]}


def from_code(code: str, message: str) -> UnbakeError:
    """Rebuild the typed error a peer sent (unknown codes become UnbakeError)."""
    return BY_CODE.get(code, UnbakeError)(message)
