"""The relay's wire, shared by the driver's server and the workers' link: where a worker finds the
relay, the token file, the limits, and the line format (one JSON object per line each way; a request
names an ``op``, a reply is ``{"ok": ...}`` or ``{"error": "..."}``; JSON, never pickle)."""

from __future__ import annotations

import json
import os
import stat

from .tracking import TrackingError

ADDRESS_ENV = "SWEEPS_RELAY_ADDRESS"  # for the workers: {"address": "127.0.0.1:<port>", "token_file": <path>}

MAX_HELLO = 4096  # bytes of the first line (the token), before which nothing larger is read
MAX_LINE = 8 * 2**20  # bytes of a request line
MAX_METRICS = 20_000  # metrics per request (a RemoteRun sends more as several)
EXPORT_CHUNK = 2 * 2**20  # raw bytes of an exported model per request (base64 in the line)
MAX_EXPORT = 2 * 2**30  # bytes of one exported model
MAX_CONNECTIONS = 256
MAX_UNAUTHENTICATED = 32
HELLO_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 600.0
BUSY = ("the relay serves at most", "too many connections")  # how the errors of a relay at a cap begin


def line(message: dict) -> bytes:
    """``message`` as one line of the wire."""
    return (json.dumps(message, default=float) + "\n").encode()


def write_token(path: str, token: str) -> None:
    """Write the relay's token to a new file only this user can read (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)


def read_token(path: str) -> str:
    """The relay's token from its file, which must be this user's and readable by no one else."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        info = os.fstat(f.fileno())
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise TrackingError(f"the relay's token file {path} is not this user's private file")
        return f.read(MAX_HELLO).strip()
