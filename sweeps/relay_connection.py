"""The relay's connections: a thread each on the loopback interface, up to the caps; a connection
presents the token (a line of at most ``MAX_HELLO`` bytes within the hello timeout), must come from
this user's process (procfs), then sends requests, each line read within its size and idle limits.
What a request may do is the relay's (``relay_server.Relay.handle``), which this module asks through
``authentic``, ``handle`` and the two timeouts only."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import threading
import time

from runstore import proc_start

from .relay_protocol import BUSY, MAX_HELLO, MAX_LINE, line


class Connections(socketserver.ThreadingTCPServer):
    """The relay's listening socket on 127.0.0.1: at most ``max_connections`` connections, of which at
    most ``max_unauthenticated`` have not presented the token yet; past a cap a connection is told so
    and closed."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, relay, max_connections: int, max_unauthenticated: int):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.relay = relay  # relay_server.Relay: authentic, handle, hello_timeout_s, idle_timeout_s
        self.max_connections = max_connections
        self.all = threading.BoundedSemaphore(max_connections)
        self.unauthenticated = threading.BoundedSemaphore(max_unauthenticated)

    def process_request(self, request, client_address):
        """A thread per connection up to the caps; past them the connection is told so and closed."""
        if not self.all.acquire(blocking=False):
            _refuse(request, f"{BUSY[0]} {self.max_connections} connections")
            return self.shutdown_request(request)
        if not self.unauthenticated.acquire(blocking=False):
            self.all.release()
            _refuse(request, f"{BUSY[1]} are waiting to present the relay's token")
            return self.shutdown_request(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.all.release()


def _refuse(sock, message: str) -> None:
    try:
        sock.settimeout(0.5)
        sock.sendall(line({"error": message}))
    except OSError:
        pass


class _TooLong(Exception):
    pass


class _Handler(socketserver.BaseRequestHandler):
    """One connection: the token first, then requests, each line read within its size and time limits."""

    def setup(self) -> None:
        self.buf = bytearray()
        self.authenticated = False

    def handle(self) -> None:
        relay = self.server.relay
        try:
            peer = self._hello(relay)
            if not self.authenticated:
                return
            while True:
                request = json.loads(self._line(MAX_LINE, relay.idle_timeout_s))
                try:
                    reply = {"ok": relay.handle(request, peer)}
                except Exception as e:  # noqa: BLE001 - the trial gets the store's error, the relay carries on
                    reply = {"error": f"{type(e).__name__}: {e}"[:4000]}
                self._send(reply)
        except _TooLong as e:
            with contextlib.suppress(OSError):
                self._send({"error": str(e)})
        except (OSError, EOFError, ValueError):  # closed, timed out, or not JSON: the connection ends
            pass
        finally:
            if not self.authenticated:
                self.server.unauthenticated.release()

    def _hello(self, relay) -> str | None:
        """The token and the peer check: the caller's claim (``peer_claim``) once the connection is
        authenticated; an error reply and not authenticated where either fails."""
        try:
            request = json.loads(self._line(MAX_HELLO, relay.hello_timeout_s))
        except ValueError:
            request = None
        if not (isinstance(request, dict) and relay.authentic(request.get("token"))):
            self._send({"error": "the relay refused a connection without its token"})
            return None
        allowed, peer = peer_claim(self.request)
        if not allowed:
            self._send({"error": "the relay serves this user's processes only"})
            return None
        self.authenticated = True
        self.server.unauthenticated.release()
        self._send({"ok": {"idle_timeout_s": relay.idle_timeout_s}})
        return peer

    def _send(self, reply: dict) -> None:
        self.request.settimeout(30)
        self.request.sendall(line(reply))

    def _line(self, limit: int, timeout_s: float) -> bytes:
        """The next line, read within ``timeout_s``; never more than ``limit`` bytes of it are held."""
        deadline = time.monotonic() + timeout_s
        scanned = 0
        while True:
            end = self.buf.find(b"\n", scanned)
            if end >= 0:
                if end > limit:
                    break
                found = bytes(self.buf[:end])
                del self.buf[:end + 1]
                return found
            scanned = len(self.buf)
            if scanned > limit:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.request.settimeout(left)
            chunk = self.request.recv(min(1 << 20, limit + 1 - scanned + 1))
            if not chunk:
                raise EOFError
            self.buf += chunk
        raise _TooLong(f"the relay refused a request line over {limit} bytes")


def _tcp_owner(sock: socket.socket) -> tuple[int, str] | None:
    """(uid, inode) of the socket at the other end of a loopback connection (Linux ``/proc/net/tcp``)."""
    here, there = sock.getsockname()[1], sock.getpeername()[1]
    want = (f"0100007F:{there:04X}", f"0100007F:{here:04X}")
    try:
        with open("/proc/net/tcp") as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if (fields[1], fields[2]) == want:
                    return int(fields[7]), fields[9]
    except (OSError, IndexError, ValueError):
        pass
    return None


def peer_claim(sock: socket.socket) -> tuple[bool, str | None]:
    """(allowed, claim): whether the process at the other end of ``sock`` runs as this user, and its claim
    (``host/pid/start``, as ``claims.this_claim`` gives it in that process) where procfs tells; (True,
    None) where it cannot be known."""
    owner = _tcp_owner(sock)
    if owner is None:
        return True, None
    uid, inode = owner
    if uid != os.getuid():
        return False, None
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                return True, f"{socket.gethostname()}/{pid}/{proc_start(int(pid))}"
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return True, None
