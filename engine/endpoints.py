"""Where the engine listens, and who can reach it: endpoint syntax, the private runtime folder, the
endpoint's lock file, and the ipc socket file. Standard library and ``engine.errors`` only (the
torch-free client uses it through ``engine.protocol``).

Endpoints (``check_endpoint``): ``ipc://PATH`` (a socket file: created 0600, in the 0700 runtime
folder by default, so only its user, or root, connects) or ``tcp://HOST:PORT`` (lowercase schemes;
PORT 1..65535). Anything else (``ws://``, ``udp://``, ``TCP://``, garbage) is one ``BadRequest``
line before libzmq sees it. Linux abstract sockets ``ipc://@NAME`` are refused: they have no file
permissions, so every local user could connect, and nothing would say so; use ``ipc://PATH``, or
TCP with CURVE.

Nothing here follows a symbolic link it did not expect or changes a file that is not the user's:

- ``runtime_dir``: ``$XDG_RUNTIME_DIR/unbake``, else ``/run/user/UID/unbake``, else
  ``$TMPDIR/unbake-UID``, created with ``mkdir`` (which never follows a link) and checked with
  ``lstat`` and an ``O_NOFOLLOW`` open: a real directory, owned by this user, not writable by
  others. A folder of this user with another mode without group/other write is set to 0700 through its
  own descriptor; anything else (a symlink, another owner, group/other write) is ``NotPrivate``, left
  as it is.
- ``open_lock``: lock files are opened ``O_NOFOLLOW`` and must be this user's regular files.
- ``check_socket_path`` / ``clear_stale_socket``: an ipc path may hold nothing, or a socket of this
  user that nobody answers on (stale: it is removed before binding). A regular file, a folder, a
  symlink, another user's socket or a live one is ``NotPrivate`` / ``EngineUnavailable``, left as
  it is (libzmq would unlink whatever is there).
"""
from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import stat
import tempfile

from .errors import BadRequest, EngineUnavailable, NotPrivate

ENDPOINT_ENV = "UNBAKE_ENDPOINT"
# `unbake serve --allow-any-local-user` for an engine that a client starts (autostart): "1" only
ALLOW_ANY_LOCAL_USER_ENV = "UNBAKE_ALLOW_ANY_LOCAL_USER"
SCHEMES = ("ipc", "tcp")
MAX_IPC_PATH_BYTES = 107          # sun_path is 108 bytes with its NUL
_HOST = re.compile(r"\*|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\]")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def _show(value: str, limit: int = 120) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def check_endpoint(endpoint) -> str:
    """``endpoint`` (str) as it is when it is ``ipc://PATH`` or ``tcp://HOST:PORT``.

    Raises BadRequest (one line naming the endpoint and the problem) for another scheme (``ws://``,
    ``udp://``, upper case), no scheme, an empty or too long ipc path (``MAX_IPC_PATH_BYTES``), an
    abstract socket ``ipc://@NAME``, a tcp address without a host or a numeric PORT in 1..65535,
    NUL or other control characters."""
    if not isinstance(endpoint, str) or not endpoint:
        raise BadRequest(f"endpoint {endpoint!r}: expected ipc://PATH or tcp://HOST:PORT")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in endpoint):
        raise BadRequest(f"endpoint {_show(endpoint)}: contains a control character")
    m = _SCHEME.match(endpoint)
    if m is None:
        raise BadRequest(f"endpoint {_show(endpoint)}: no scheme; expected ipc://PATH or tcp://HOST:PORT")
    scheme, rest = m.group(1), endpoint[m.end():]
    if scheme not in SCHEMES:
        hint = f" (schemes are lower case: {scheme.lower()}://)" if scheme.lower() in SCHEMES else ""
        raise BadRequest(f"endpoint {_show(endpoint)}: unknown scheme {scheme!r}{hint}; "
                         f"expected ipc://PATH or tcp://HOST:PORT")
    if scheme == "ipc":
        if not rest:
            raise BadRequest(f"endpoint {_show(endpoint)}: no socket path after ipc://")
        if rest.startswith("@"):
            raise BadRequest(f"endpoint {_show(endpoint)}: abstract sockets (ipc://@NAME) have no file "
                             f"permissions, so every local user could reach the engine; use ipc://PATH")
        if len(os.fsencode(rest)) > MAX_IPC_PATH_BYTES:
            raise BadRequest(f"endpoint {_show(endpoint)}: the socket path is {len(os.fsencode(rest))} bytes, "
                             f"the limit is {MAX_IPC_PATH_BYTES}")
        return endpoint
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or not port.isascii():
        raise BadRequest(f"endpoint {_show(endpoint)}: expected tcp://HOST:PORT with PORT in 1..65535")
    if not _HOST.fullmatch(host):
        raise BadRequest(f"endpoint {_show(endpoint)}: {_show(host, 60)} is not a host name or address")
    return endpoint


def ipc_path(endpoint: str) -> str | None:
    """The socket file's path of an ``ipc://`` endpoint (str), else None."""
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def is_loopback(endpoint: str) -> bool:
    """True for ipc:// (and inproc://), and for tcp:// bound to a loopback address only
    (``localhost``, 127.0.0.0/8, ::1); False for ``*``, interface and host names."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a host name
        return False


def ipc_is_private(endpoint: str) -> bool:
    """May a peer of a daemon bound at ``endpoint`` name files on its machine (``open.repo``)?

    True only for ``ipc://PATH`` with a file-system path (the daemon creates the socket file 0600,
    in the 0700 runtime folder by default, so only its own user, or root, can connect) and
    ``inproc://`` (the same process). False for ``tcp://`` (any local user reaches 127.0.0.1; CURVE
    peers are remote) and for Linux abstract sockets ``ipc://@NAME``, which have no file
    permissions (``check_endpoint`` refuses them anyway)."""
    if endpoint.startswith("inproc://"):
        return True
    path = ipc_path(endpoint)
    return bool(path) and not path.startswith("@")


# -- private folders and files ----------------------------------------------------------------------

def _kind(mode: int) -> str:
    return ("a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode)
            else "a regular file" if stat.S_ISREG(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "a device or other special file")


def _check_parent(path: str) -> None:
    """The folder holding ``path`` must be root's or ours, and sticky where others may write in it
    (else they could swap what we check for something else). Raises NotPrivate."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(parent)
    except OSError as e:
        raise NotPrivate(f"{parent}: cannot use this folder ({e.strerror})") from None
    if st.st_uid not in (0, os.getuid()):
        raise NotPrivate(f"{path}: its folder {parent} belongs to another user (uid {st.st_uid}); refused")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise NotPrivate(f"{path}: its folder {parent} is writable by other users and not sticky; refused")


def private_dir(path: str) -> str:
    """Make or check the folder ``path`` (str) as this user's alone; returns ``path``.

    Created with mode 0700 when absent (``mkdir`` never follows a symlink). An existing one must be
    a real directory (``lstat``: not a symlink) owned by this user and not writable by group or
    others; other modes (0755, say) are set to 0700 through the folder's own descriptor (opened
    ``O_NOFOLLOW``). Raises NotPrivate (one line naming the folder and the problem; nothing is
    changed then)."""
    _check_parent(path)
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    except OSError as e:
        raise NotPrivate(f"{path}: cannot create unbake's runtime folder ({e.strerror})") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotPrivate(f"{path}: unbake's runtime folder is {_kind(st.st_mode)}, not a folder; refused "
                         f"(left as it is: remove it, or set XDG_RUNTIME_DIR or TMPDIR elsewhere)")
    if st.st_uid != os.getuid():
        raise NotPrivate(f"{path}: unbake's runtime folder belongs to another user (uid {st.st_uid}); refused "
                         f"(left as it is: remove it, or set XDG_RUNTIME_DIR or TMPDIR elsewhere)")
    if not created and st.st_mode & 0o022:
        raise NotPrivate(f"{path}: unbake's runtime folder is writable by other users (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); refused (left as it is: remove it)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise NotPrivate(f"{path}: cannot open unbake's runtime folder ({e.strerror}); refused") from None
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise NotPrivate(f"{path}: unbake's runtime folder changed while it was checked; refused")
        if stat.S_IMODE(now.st_mode) != 0o700:
            os.fchmod(fd, 0o700)  # our own real folder, through its descriptor: no link followed
    finally:
        os.close(fd)
    return path


def runtime_dir() -> str:
    """The user's private runtime folder for unbake (str): ``$XDG_RUNTIME_DIR/unbake``, else
    ``/run/user/UID/unbake``, else ``$TMPDIR/unbake-UID`` (the first whose parent is a folder this
    user can write to), made or checked by ``private_dir``. Raises NotPrivate when that folder is
    not this user's alone (nothing is changed), or when there is no usable parent at all."""
    candidates = [os.path.join(d, "unbake") for d in (os.environ.get("XDG_RUNTIME_DIR"),
                                                      f"/run/user/{os.getuid()}") if d]
    candidates.append(os.path.join(tempfile.gettempdir(), f"unbake-{os.getuid()}"))
    for path in candidates:
        parent = os.path.dirname(path)
        if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
            return private_dir(path)
    raise NotPrivate(f"no folder for unbake's runtime files among {', '.join(candidates)} "
                     f"(set XDG_RUNTIME_DIR or TMPDIR to a folder of yours)")


def default_endpoint() -> str:
    """``$UNBAKE_ENDPOINT``, else ``ipc://<runtime_dir>/engine.sock`` (str). Raises NotPrivate
    (``runtime_dir``). The value of ``$UNBAKE_ENDPOINT`` is returned as it is: callers check it
    (``check_endpoint``)."""
    return os.environ.get(ENDPOINT_ENV) or f"ipc://{os.path.join(runtime_dir(), 'engine.sock')}"


def lock_path(endpoint: str) -> str:
    """The file a daemon holds locked (flock) while it serves ``endpoint``: one daemon per endpoint.
    ``PATH.lock`` beside an ipc socket, else a file in ``runtime_dir`` (NotPrivate from there)."""
    path = ipc_path(endpoint)
    if path is not None:
        return path + ".lock"
    safe = "".join(ch if ch.isalnum() else "-" for ch in endpoint)
    return os.path.join(runtime_dir(), f"{safe}.lock")


def open_lock(path: str, create: bool = True) -> int:
    """A descriptor of the lock file ``path`` (O_RDWR; created 0600 when ``create``), never through
    a symlink; it must be a regular file of this user. Raises NotPrivate (a symlink, another
    owner, not a regular file, or it cannot be opened), FileNotFoundError when absent and not
    ``create``."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        if not create:
            raise
        raise NotPrivate(f"{path}: cannot create the lock file (its folder does not exist)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotPrivate(f"{path}: the lock file is a symbolic link; refused (left as it is)") from None
        raise NotPrivate(f"{path}: cannot open the lock file ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        what = _kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else f"a file of another user (uid {st.st_uid})"
        raise NotPrivate(f"{path}: the lock file is {what}; refused (left as it is)")
    return fd


def check_socket_path(path: str) -> None:
    """Before anything is created: ``path`` (the socket file of an ipc endpoint) must be absent or
    a socket of this user. Raises NotPrivate naming what is there (left as it is)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise NotPrivate(f"{path}: cannot check the socket path ({e.strerror})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise NotPrivate(f"{path}: {_kind(st.st_mode)} is in the way of the engine's socket; refused "
                         f"(left as it is: choose another --endpoint, or remove it)")
    if st.st_uid != os.getuid():
        raise NotPrivate(f"{path}: a socket of another user (uid {st.st_uid}); refused (left as it is)")


def clear_stale_socket(path: str) -> None:
    """Remove ``path`` if it is a stale socket of this user (one nobody answers on: the caller holds
    the endpoint's lock, so no unbake engine serves it). Nothing there: nothing to do. Raises
    NotPrivate (not a socket, another user's: ``check_socket_path``), EngineUnavailable (another
    program answers on it)."""
    check_socket_path(path)
    if not os.path.lexists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        check_socket_path(path)  # still the same kind of thing
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except OSError as e:
        raise NotPrivate(f"{path}: cannot tell whether this socket is in use ({e.strerror}); "
                         f"left as it is") from None
    finally:
        probe.close()
    raise EngineUnavailable(f"{path}: another program answers on this socket; left as it is "
                            f"(choose another --endpoint)")


def socket_identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the socket file at ``path``, or None when there is no socket there."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None
