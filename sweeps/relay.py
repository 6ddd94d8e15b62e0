"""A local sweep's trials write their MLflow runs through the driver.

On a local runtime (the driver started Ray on this host), a trial's process imports no MLflow:
``RemoteRun`` buffers what ``tracking.TrialRun`` would write (the same ``tracking.RunLog``) and hands
every store operation to ``Relay``, a server on the loopback interface in the driver, which runs it
with a ``TrialRun`` of its own. A worker so saves ~4.5 CPU s of imports (``mlflow``, SQLAlchemy and
MLflow's SQL store) before its first epoch, and a SQLite store has one writing process instead of one
per trial slot. What lands in the store is the same: the driver's ``TrialRun`` claims the run for the
trial's process (``claimed_by`` names it, not the driver), so a retried, resumed or killed trial is
treated exactly as one that writes directly.

Trials on a cluster (``RAY_ADDRESS``: workers on other hosts) write directly, as does a local runtime
started with ``SWEEPS_RELAY=0`` in the driver's environment.

The relay is a capability, not a password. It binds 127.0.0.1; its token lives in a file only this
user can read (mode 0600 in a 0700 folder): the workers' environment (which Ray writes to its logs)
carries the file's path, never the token. A connection first presents the token (a line of at most
``MAX_HELLO`` bytes within ``HELLO_TIMEOUT_S``), then sends requests. What a request may do is fixed
by the driver's ``Scope`` (``Relay.serve``): the store, experiment and sweep are the driver's (a
request cannot name them), ``open`` takes only run_keys of the sweep's trial set (each at most once
per claim, i.e. per trial process), and every other operation names a handle that ``open`` returned
to its caller (128 random bits) and comes from that caller. On Linux the relay also knows the caller:
the process at the other end of the connection (``/proc/net/tcp`` and the processes' open files) must
run as this user, even with the token, and its claim is what the relay records, whatever a request
says. ``export`` sends the model's bytes, never a path; ``checkpoint_dir`` must lie in the sweep's
Tune storage. Limits: a request line of at most ``MAX_LINE`` bytes (counted while it is read, before
it is parsed), ``MAX_UNAUTHENTICATED`` connections awaiting their token and ``MAX_CONNECTIONS`` in
all (a thread each), and a connection idle for ``IDLE_TIMEOUT_S`` is closed (a worker's link
reconnects by itself, and waits for a free slot when the relay is at its cap).
Protocol: one JSON object per line each way; a request names an ``op``, a reply is ``{"ok": ...}``
or ``{"error": "..."}``. JSON, never pickle: the relay unpickles nothing a process hands it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hmac
import json
import math
import os
import re
import secrets
import shutil
import socket
import socketserver
import stat
import tempfile
import threading
import time
from typing import Callable

from runstore import proc_start

from .claims import this_claim
from .tracking import FINAL_METRICS, RunLog, TrackingError, TrialRun, failure, final_fields

ADDRESS_ENV = "SWEEPS_RELAY_ADDRESS"  # for the workers: {"address": "127.0.0.1:<port>", "token_file": <path>}
SWITCH_ENV = "SWEEPS_RELAY"  # "0" in the driver's environment: trials of a local runtime write directly

MAX_HELLO = 4096  # bytes of the first line (the token), before which nothing larger is read
MAX_LINE = 8 * 2**20  # bytes of a request line
MAX_METRICS = 20_000  # metrics per request (a RemoteRun sends more as several)
EXPORT_CHUNK = 2 * 2**20  # raw bytes of an exported model per request (base64 in the line)
MAX_EXPORT = 2 * 2**30  # bytes of one exported model
MAX_CONNECTIONS = 256
MAX_UNAUTHENTICATED = 32
HELLO_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 600.0
_PROVENANCE_TAGS = ("sparse_core_version", "git_commit", "pack_size")  # the tags a trial may set
_CLAIM = re.compile(r"[A-Za-z0-9_.\-]{1,253}/\d{1,10}/[0-9A-Za-z]{1,24}")
_TRIAL_ID = re.compile(r"[A-Za-z0-9_\-]{1,128}")
_METRIC_PREFIXES = ("epoch/", "trainer/", "prune/", "final/")


def wanted() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class Refused(TrackingError):
    """A request the relay does not serve (outside its scope, malformed): the reply's error."""


@dataclasses.dataclass(frozen=True)
class Scope:
    """What the relay serves while a sweep runs: its store, experiment and sweep, its trial set
    (``trials(run_key, requested flat)`` -> (cell, flat) of that trial, None when it is not one of the
    sweep's), the Tune storage its trials' checkpoints live in (None: anywhere), and the sweep's parent
    run (``sweep_run.py``), whose child every run it opens is (None: no parent)."""

    uri: str
    experiment_id: str
    sweep: str
    trials: Callable[[str, dict], "tuple[str, dict] | None"]
    storage: str | None = None
    parent_run_id: str | None = None

    @classmethod
    def of(cls, uri: str, experiment_id: str, sweep: str, trials, storage: str | None = None,
           parent_run_id: str | None = None) -> "Scope":
        """A fixed trial set: objects with ``run_key``, ``cell`` and ``flat`` (``designs.Trial``)."""
        table = {t.run_key: (t.cell, dict(t.flat)) for t in trials}
        return cls(uri, experiment_id, sweep, lambda key, _flat: table.get(key), storage, parent_run_id)


def _inside(location: str, storage: str | None) -> bool:
    if storage is None:
        return True
    if "://" in storage:
        root = storage.rstrip("/") + "/"
        return location.startswith(root) and "/../" not in location + "/"
    return os.path.commonpath([os.path.realpath(location), os.path.realpath(storage)]) == os.path.realpath(storage)


def _check(value, kind, what: str):
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise Refused(f"{what} must be {getattr(kind, '__name__', kind)}, not {type(value).__name__}")
    return value


def _pending(request: dict) -> list[tuple]:
    """The metrics of a request, checked: [key, value, timestamp ms, step] each."""
    items = _check(request.get("pending", []), list, "pending")
    if len(items) > MAX_METRICS:
        raise Refused(f"at most {MAX_METRICS} metrics per request, not {len(items)}")
    out = []
    for m in items:
        if not (isinstance(m, list) and len(m) == 4 and isinstance(m[0], str) and len(m[0]) <= 250
                and m[0].startswith(_METRIC_PREFIXES) and all(isinstance(v, (int, float)) for v in m[1:])
                and all(isinstance(v, int) for v in m[2:])):
            raise Refused(f"a metric is [key starting with one of {_METRIC_PREFIXES}, value, timestamp, step], "
                          f"not {str(m)[:100]}")
        out.append((m[0], float(m[1]), m[2], m[3]))
    return out


def _result(result) -> dict:
    """``finish``'s result, checked: numbers, a list of layer names, a dict of layer densities."""
    _check(result, dict, "result")
    allowed = {*FINAL_METRICS, "collapsed_layers", "device", "sparse_path", "prefix_shared_by", "layer_density",
               "effective_units"}
    unknown = sorted(set(result) - allowed)
    if unknown:
        raise Refused(f"unknown result field(s) {unknown}; valid: {sorted(allowed)}")
    for key in (*FINAL_METRICS, "prefix_shared_by"):
        if key in result:
            _check(result[key], (int, float), f"result[{key!r}]")
    if not isinstance(result.get("epochs"), int) or result["epochs"] < 0:
        raise Refused("result['epochs'] must be an int >= 0")
    layers = _check(result.get("collapsed_layers"), list, "result['collapsed_layers']")
    density = _check(result.get("layer_density"), dict, "result['layer_density']")
    if not all(isinstance(n, str) for n in layers) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isnan(v) or 0 <= v <= 1)
            for v in density.values()):
        raise Refused("result's collapsed_layers must be names and layer_density values in [0, 1]")
    for key in ("device", "sparse_path"):
        if key in result:
            _check(result[key], str, f"result[{key!r}]")
    units = _check(result.get("effective_units", {}), dict, "result['effective_units']")
    if not all(isinstance(n, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for n, v in units.items()):
        raise Refused("result's effective_units must map layer names to unit counts >= 0")
    return result


@dataclasses.dataclass
class _Open:
    run: TrialRun
    claim: str
    export: "tempfile._TemporaryFileWrapper | None" = None
    exported: int = 0


class Relay:
    """The driver's side: a loopback server running each trial's store operations (one at a time),
    within the ``Scope`` that ``serve`` sets (none: every ``open`` is refused)."""

    def __init__(self, *, max_connections: int = MAX_CONNECTIONS, max_unauthenticated: int = MAX_UNAUTHENTICATED,
                 idle_timeout_s: float = IDLE_TIMEOUT_S, hello_timeout_s: float = HELLO_TIMEOUT_S):
        self._token = secrets.token_hex(32)
        self._dir = tempfile.mkdtemp(prefix="sweeps-relay-")  # 0700: only this user can even list it
        self.token_file = os.path.join(self._dir, "token")
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._token)
        self.idle_timeout_s, self.hello_timeout_s = idle_timeout_s, hello_timeout_s
        self.scope: Scope | None = None
        self._runs: dict[str, _Open] = {}  # handle -> the run it opened
        self._opened: set[tuple[str, str]] = set()  # (run_key, claim) opened in this scope
        self._lock = threading.Lock()
        self.max_connections = max_connections
        self._all = threading.BoundedSemaphore(max_connections)
        self._unauthenticated = threading.BoundedSemaphore(max_unauthenticated)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.relay = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="sweeps-relay", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    @property
    def env(self) -> dict[str, str]:
        """The workers' environment variable that points them here (the token file's path, not the token)."""
        return {ADDRESS_ENV: json.dumps({"address": self.address, "token_file": self.token_file})}

    def authentic(self, token) -> bool:
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self._token.encode())

    @contextlib.contextmanager
    def serve(self, scope: Scope):
        """Serve the trials of one sweep (``scope``) for the duration of the block."""
        self.start(scope)
        try:
            yield self
        finally:
            self.stop()

    def start(self, scope: Scope) -> None:
        """Serve the trials of ``scope`` (and no other), until ``stop``."""
        with self._lock:
            self.scope, self._opened = scope, set()

    def stop(self) -> None:
        """Serve no sweep; the handles opened so far are void."""
        with self._lock:
            self.scope = None
            for entry in self._runs.values():
                if entry.export is not None:
                    entry.export.close()
            self._runs.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def handle(self, request: dict, peer: str | None = None):
        """One request (already authenticated): its reply's ``ok`` value; raises for an error reply.
        ``peer``: the claim of the process at the other end of the connection (``peer_claim``), which
        replaces the one the request names; None where it cannot be known (no procfs)."""
        _check(request, dict, "a request")
        if peer is not None:
            request = {**request, "claim": peer}
        with self._lock:
            if request.get("op") == "open":
                return self._open(request)
            return self._on_handle(request)

    def _open(self, request: dict) -> dict:
        fields = {"op", "run_key", "flat", "claim", "trial_id", "tags", "resumed_at_epoch"}
        unknown = sorted(set(request) - fields)
        if unknown:
            raise Refused(f"open: unknown field(s) {unknown} (the driver fixes store, experiment and sweep); "
                          f"valid: {sorted(fields)}")
        scope = self.scope
        if scope is None:
            raise Refused("open: the relay serves no sweep now")
        key, claim = _check(request.get("run_key"), str, "run_key"), _check(request.get("claim"), str, "claim")
        if not _CLAIM.fullmatch(claim):
            raise Refused(f"open: claim {claim[:80]!r} is not host/pid/start")
        trial_id, resumed = request.get("trial_id"), request.get("resumed_at_epoch")
        if trial_id is not None and not (isinstance(trial_id, str) and _TRIAL_ID.fullmatch(trial_id)):
            raise Refused(f"open: trial_id {str(trial_id)[:80]!r} is not a Tune trial id")
        if resumed is not None and not (isinstance(resumed, int) and not isinstance(resumed, bool) and resumed >= 0):
            raise Refused(f"open: resumed_at_epoch must be an int >= 0 or null, not {resumed!r}")
        tags = _check(request.get("tags", {}), dict, "tags")
        bad = sorted(set(tags) - set(_PROVENANCE_TAGS))
        if bad:
            raise Refused(f"open: a trial may not set tag(s) {bad}; valid: {list(_PROVENANCE_TAGS)}")
        trial = scope.trials(key, _check(request.get("flat", {}), dict, "flat"))
        if trial is None:
            raise Refused(f"open: run_key {key[:80]!r} is not one of the trials of sweep {scope.sweep!r}")
        if (key, claim) in self._opened:
            raise Refused(f"open: run_key {key} was opened by {claim} already")
        self._opened.add((key, claim))
        cell, flat = trial
        run = TrialRun(scope.uri, scope.experiment_id, sweep=scope.sweep, cell=cell, flat=flat, run_key=key,
                       trial_id=trial_id, tags={k: str(v)[:250] for k, v in tags.items()}, claim=claim,
                       parent_run_id=scope.parent_run_id).open(resumed)
        handle = None if run.skip else secrets.token_hex(16)  # a skipped run is never written to
        if handle:
            self._runs[handle] = _Open(run, claim)
        return {"handle": handle, "run_id": run.run_id, "skip": run.skip, "other_id": run.other_id,
                "other_final": run.other_final, "checkpoint_dir": run.checkpoint_dir,
                "logged_epoch": run.logged_epoch, "logged_round": run.logged_round}

    def _on_handle(self, request: dict):
        op, handle = request.get("op"), request.get("handle")
        entry = self._runs.get(handle) if isinstance(handle, str) else None
        if entry is None or not (isinstance(request.get("claim"), str) and hmac.compare_digest(
                request["claim"].encode(), entry.claim.encode())):
            raise Refused(f"{op}: no run open for this handle and claim (a handle is its opener's alone)")
        ops = {"log": (), "flush": (), "checkpoint_dir": ("location",), "resumed": ("epoch",),
               "export": ("data", "last"), "finish": ("result",), "fail": ("status", "reason")}
        if op not in ops:
            raise Refused(f"unknown relay op {op!r}; valid: {['open', *ops]}")
        unknown = sorted(set(request) - {"op", "handle", "claim", "pending", *ops[op]})
        if unknown:
            raise Refused(f"{op}: unknown field(s) {unknown}; valid: {sorted({'handle', 'pending', *ops[op]})}")
        run = entry.run
        run._pending += _pending(request)
        getattr(self, f"_op_{op}")(entry, request)
        if op in ("finish", "fail"):
            del self._runs[handle]
        return None

    def _op_log(self, entry: _Open, request: dict) -> None:
        pass  # the metrics are buffered; the next flush writes them

    def _op_flush(self, entry: _Open, request: dict) -> None:
        entry.run.flush()

    def _op_checkpoint_dir(self, entry: _Open, request: dict) -> None:
        location = _check(request.get("location"), str, "location")
        if len(location) > 4096 or "\0" in location or not _inside(location, self.scope and self.scope.storage):
            raise Refused(f"checkpoint_dir: {location[:200]!r} is not inside the sweep's Tune storage")
        entry.run.set_checkpoint_dir(location)

    def _op_resumed(self, entry: _Open, request: dict) -> None:
        epoch = _check(request.get("epoch"), int, "epoch")
        if epoch < 0:
            raise Refused(f"resumed: epoch must be >= 0, not {epoch}")
        entry.run.resumed(epoch)

    def _op_export(self, entry: _Open, request: dict) -> None:
        """A chunk of the exported model's bytes; the last one stores the file as the run's artifact."""
        try:
            data = base64.b64decode(_check(request.get("data"), str, "data"), validate=True)
        except ValueError as e:
            raise Refused(f"export: data is not base64: {e}") from None
        if len(data) > EXPORT_CHUNK or entry.exported + len(data) > MAX_EXPORT:
            raise Refused(f"export: at most {EXPORT_CHUNK} bytes a request and {MAX_EXPORT} in all")
        if entry.export is None:
            entry.export = tempfile.NamedTemporaryFile(dir=self._dir, suffix=".safetensors")
        entry.export.write(data)
        entry.exported += len(data)
        if _check(request.get("last"), bool, "last"):
            entry.export.flush()
            try:
                entry.run.log_export(entry.export.name)
            finally:
                entry.export.close()
                entry.export, entry.exported = None, 0

    def _op_finish(self, entry: _Open, request: dict) -> None:
        entry.run.finish(_result(request.get("result")))

    def _op_fail(self, entry: _Open, request: dict) -> None:
        status, reason = request.get("status"), _check(request.get("reason"), str, "reason")
        if status not in ("FAILED", "KILLED"):
            raise Refused(f"fail: status must be FAILED or KILLED, not {status!r}")
        entry.run.end_failed(status, reason[:4000])


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    relay: Relay

    def process_request(self, request, client_address):
        """A thread per connection up to the caps; past them the connection is told so and closed."""
        relay = self.relay
        if not relay._all.acquire(blocking=False):
            _refuse(request, f"the relay serves at most {relay.max_connections} connections")
            return self.shutdown_request(request)
        if not relay._unauthenticated.acquire(blocking=False):
            relay._all.release()
            _refuse(request, "too many connections are waiting to present the relay's token")
            return self.shutdown_request(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.relay._all.release()


def _refuse(sock, message: str) -> None:
    try:
        sock.settimeout(0.5)
        sock.sendall((json.dumps({"error": message}) + "\n").encode())
    except OSError:
        pass


class _TooLong(Exception):
    pass


class _Busy(Exception):
    """The relay is at a connection cap (``_BUSY``): try again later."""


_BUSY = ("the relay serves at most", "too many connections")


class _Handler(socketserver.BaseRequestHandler):
    """One connection: the token first, then requests, each line read within its size and time limits."""

    def setup(self) -> None:
        self.buf = bytearray()
        self.authenticated = False

    def handle(self) -> None:
        relay = self.server.relay
        try:
            try:
                request = _json(self._line(MAX_HELLO, relay.hello_timeout_s))
            except ValueError:
                request = None
            if not (isinstance(request, dict) and relay.authentic(request.get("token"))):
                return self._send({"error": "the relay refused a connection without its token"})
            allowed, peer = peer_claim(self.request)
            if not allowed:
                return self._send({"error": "the relay serves this user's processes only"})
            self.authenticated = True
            relay._unauthenticated.release()
            self._send({"ok": {"idle_timeout_s": relay.idle_timeout_s}})
            while True:
                request = _json(self._line(MAX_LINE, relay.idle_timeout_s))
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
                relay._unauthenticated.release()

    def _send(self, reply: dict) -> None:
        self.request.settimeout(30)
        self.request.sendall((json.dumps(reply, default=float) + "\n").encode())

    def _line(self, limit: int, timeout_s: float) -> bytes:
        """The next line, read within ``timeout_s``; never more than ``limit`` bytes of it are held."""
        deadline = time.monotonic() + timeout_s
        scanned = 0
        while True:
            end = self.buf.find(b"\n", scanned)
            if end >= 0:
                if end > limit:
                    break
                line = bytes(self.buf[:end])
                del self.buf[:end + 1]
                return line
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


def _json(line: bytes):
    return json.loads(line)


def _tcp_owner(sock: socket.socket) -> tuple[int, str] | None:
    """(uid, inode) of the socket at the other end of a loopback connection (Linux ``/proc/net/tcp``)."""
    here, there = sock.getsockname()[1], sock.getpeername()[1]
    want = (f"0100007F:{there:04X}", f"0100007F:{here:04X}")
    try:
        with open("/proc/net/tcp") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
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


def _read_token(path: str) -> str:
    """The relay's token from its file, which must be this user's and readable by no one else."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        info = os.fstat(f.fileno())
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise TrackingError(f"the relay's token file {path} is not this user's private file")
        return f.read(MAX_HELLO).strip()


class _Link:
    """A worker's connection to the relay (one per process, shared by its trials' runs); it reconnects
    (presenting the token again) when the connection was lost or idle for half the relay's idle timeout."""

    def __init__(self, address: str, token_file: str):
        self.address, self.token_file = address, token_file
        self._lock = threading.Lock()
        self._file = None
        self._idle_s = IDLE_TIMEOUT_S / 2
        self._last = 0.0

    def _connect(self) -> None:
        """Connect and present the token; a relay at its connection cap is tried again for a while."""
        for wait in (0.5, 1, 2, 4, 8, 16, None):
            try:
                return self._connect_once()
            except _Busy:
                if wait is None:
                    raise TrackingError(f"the driver's MLflow relay at {self.address} stayed at its connection "
                                        f"cap") from None
                time.sleep(wait)

    def _connect_once(self) -> None:
        host, port = self.address.rsplit(":", 1)
        try:
            token = _read_token(self.token_file)
            sock = socket.create_connection((host, int(port)), timeout=30)
            self._file = sock.makefile("rwb")
            self._file.write((json.dumps({"token": token}) + "\n").encode())
            self._file.flush()
            line = self._file.readline(MAX_LINE)
        except OSError as e:
            self._file = None
            raise TrackingError(f"cannot reach the driver's MLflow relay at {self.address}: {e}") from e
        reply = json.loads(line) if line else {"error": "closed the connection"}
        if "error" in reply:
            self._file = None
            if reply["error"].startswith(_BUSY):
                raise _Busy
            raise TrackingError(f"the driver's MLflow relay at {self.address}: {reply['error']}")
        self._idle_s = float(reply["ok"]["idle_timeout_s"]) / 2
        sock.settimeout(None)  # an operation may wait for another sweep's store lock

    def call(self, request: dict):
        line = json.dumps({"claim": this_claim(), **request}, default=float).encode() + b"\n"
        if len(line) > MAX_LINE:
            raise TrackingError(f"a relay request of {len(line)} bytes is over the relay's {MAX_LINE}")
        with self._lock:
            if self._file is not None and time.monotonic() - self._last > self._idle_s:
                self._file.close()
                self._file = None
            if self._file is None:
                self._connect()
            try:
                self._file.write(line)
                self._file.flush()
                line = self._file.readline(MAX_LINE)
            except OSError as e:
                self._file = None
                raise TrackingError(f"lost the driver's MLflow relay at {self.address}: {e}") from e
            self._last = time.monotonic()
            if not line:
                self._file = None
                raise TrackingError(f"the driver's MLflow relay at {self.address} closed the connection")
        reply = json.loads(line)
        if "error" in reply:
            raise TrackingError(f"MLflow relay: {reply['error']}")
        return reply["ok"]


_link: _Link | None = None


def _the_link() -> _Link | None:
    global _link
    spec = os.environ.get(ADDRESS_ENV)
    if not spec:
        return None
    if _link is None:
        spec = json.loads(spec)
        _link = _Link(spec["address"], spec["token_file"])
    return _link


class RemoteRun(RunLog):
    """``tracking.TrialRun``'s interface for a trial's process, each store operation run by the relay
    (which fixes the store, experiment, sweep and parent run: ``uri``, ``experiment_id``, ``sweep`` and
    ``parent_run_id`` are not sent)."""

    def __init__(self, link: _Link, uri: str, experiment_id: str, *, sweep: str, cell: str, flat: dict,
                 run_key: str, trial_id: str | None = None, tags: dict | None = None, parent_run_id: str | None = None):
        super().__init__(run_key)
        self._link, self._handle = link, None
        self._spec = {"run_key": run_key, "flat": flat, "trial_id": trial_id,
                      "tags": {k: str(v) for k, v in (tags or {}).items()}}
        self.other_id: str | None = None
        self.other_final: dict = {}

    def open(self, resumed_at_epoch: int | None = None) -> "RemoteRun":
        state = self._link.call({"op": "open", **self._spec, "resumed_at_epoch": resumed_at_epoch})
        self._handle = state.pop("handle")
        for key, value in state.items():
            setattr(self, key, value)
        return self

    def _call(self, op: str, **args) -> None:
        pending, self._pending = self._pending, []  # the relay's run holds them from here (as TrialRun's does)
        while len(pending) > MAX_METRICS:  # a long buffer goes as several requests
            self._link.call({"op": "log", "handle": self._handle, "pending": pending[:MAX_METRICS]})
            del pending[:MAX_METRICS]
        self._link.call({"op": op, "handle": self._handle, "pending": pending, **args})

    def flush(self) -> None:
        self._call("flush")

    def set_checkpoint_dir(self, location: str) -> None:
        if location != self.checkpoint_dir:
            self._call("checkpoint_dir", location=location)
            self.checkpoint_dir = location

    def resumed(self, epoch: int | None) -> None:
        if epoch is not None and self.run_id is not None:
            self._call("resumed", epoch=epoch)

    def log_export(self, path: str) -> None:
        """The exported model's bytes, in requests of at most ``EXPORT_CHUNK`` (the relay takes no path)."""
        with open(path, "rb") as f:
            chunk = f.read(EXPORT_CHUNK)
            while True:
                following = f.read(EXPORT_CHUNK)
                self._call("export", data=base64.b64encode(chunk).decode(), last=not following)
                if not following:
                    return
                chunk = following

    def finish(self, result: dict) -> None:
        self._call("finish", result=final_fields(result))

    def fail(self, error: BaseException) -> None:
        if self.run_id is None:
            return
        status, reason = failure(error)
        try:
            self._call("fail", status=status, reason=reason)
        except Exception:  # noqa: BLE001 - the original error matters more than this one (as in TrialRun)
            pass


def trial_run(uri: str, experiment_id: str, **kwargs) -> RunLog:
    """The run of one trial (not opened yet): through the driver's relay where the worker has one, else
    written directly (``tracking.TrialRun``)."""
    link = _the_link()
    return RemoteRun(link, uri, experiment_id, **kwargs) if link else TrialRun(uri, experiment_id, **kwargs)
