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
started with ``SWEEPS_RELAY=0`` in the driver's environment. The relay binds 127.0.0.1 and answers
only requests that carry its token (random per driver, passed to the workers in their environment).
Protocol: one JSON object per line each way; a request names an ``op``, a reply is ``{"ok": ...}``
or ``{"error": "..."}``. JSON, never pickle: the relay unpickles nothing a process hands it.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import socket
import socketserver
import threading

from .claims import this_claim
from .tracking import RunLog, TrackingError, TrialRun, failure, final_fields

ADDRESS_ENV = "SWEEPS_RELAY_ADDRESS"  # set for the workers: {"address": "127.0.0.1:<port>", "token": ...}
SWITCH_ENV = "SWEEPS_RELAY"  # "0" in the driver's environment: trials of a local runtime write directly


def wanted() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class Relay:
    """The driver's side: a loopback server running each trial's store operations (one at a time)."""

    def __init__(self):
        self.token = secrets.token_hex(16)
        self._runs: dict[str, TrialRun] = {}
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.relay = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="sweeps-relay", daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        """The workers' environment variable that points them here."""
        host, port = self._server.server_address[:2]
        return {ADDRESS_ENV: json.dumps({"address": f"{host}:{port}", "token": self.token})}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def handle(self, request: dict):
        with self._lock:
            op = request.get("op")
            if op == "open":
                run = TrialRun(**request["run"], claim=request["claim"]).open(request.get("resumed_at_epoch"))
                handle = None if run.skip else secrets.token_hex(8)  # a skipped run is never written to
                if handle:
                    self._runs[handle] = run
                return {"handle": handle, "run_id": run.run_id, "skip": run.skip, "other_id": run.other_id,
                        "other_final": run.other_final, "checkpoint_dir": run.checkpoint_dir,
                        "logged_epoch": run.logged_epoch, "logged_round": run.logged_round}
            run = self._runs.get(request.get("handle"))
            if run is None:
                raise TrackingError(f"no open run for handle {request.get('handle')!r} (op {op!r})")
            run._pending += [tuple(m) for m in request.get("pending", ())]
            if op == "flush":
                run.flush(request.get("tags"))
            elif op == "checkpoint_dir":
                run.set_checkpoint_dir(request["location"])
            elif op == "resumed":
                run.resumed(request["epoch"])
            elif op == "export":
                run.log_export(request["path"])
            elif op == "finish":
                run.finish(request["result"])
                del self._runs[request["handle"]]
            elif op == "fail":
                run.end_failed(request["status"], request["reason"])
                del self._runs[request["handle"]]
            else:
                raise TrackingError(f"unknown relay op {op!r}")
            return None


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    relay: Relay


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        relay = self.server.relay
        for line in self.rfile:
            try:
                request = json.loads(line)
                if not hmac.compare_digest(str(request.get("token", "")), relay.token):
                    self.wfile.write(b'{"error": "the relay refused a request without its token"}\n')
                    return
                reply = {"ok": relay.handle(request)}
            except Exception as e:  # noqa: BLE001 - the trial gets the store's error, the relay carries on
                reply = {"error": f"{type(e).__name__}: {e}"[:4000]}
            self.wfile.write((json.dumps(reply, default=float) + "\n").encode())


class _Link:
    """A worker's connection to the relay (one per process, shared by its trials' runs)."""

    def __init__(self, address: str, token: str):
        self.address, self.token = address, token
        self._lock = threading.Lock()
        self._file = None

    def call(self, request: dict):
        with self._lock:
            if self._file is None:
                host, port = self.address.rsplit(":", 1)
                try:
                    sock = socket.create_connection((host, int(port)), timeout=30)
                except OSError as e:
                    raise TrackingError(f"cannot reach the driver's MLflow relay at {self.address}: {e}") from e
                sock.settimeout(None)  # an operation may wait for another sweep's store lock
                self._file = sock.makefile("rwb")
            try:
                self._file.write((json.dumps({**request, "token": self.token}, default=float) + "\n").encode())
                self._file.flush()
                line = self._file.readline()
            except OSError as e:
                self._file = None
                raise TrackingError(f"lost the driver's MLflow relay at {self.address}: {e}") from e
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
        _link = _Link(spec["address"], spec["token"])
    return _link


class RemoteRun(RunLog):
    """``tracking.TrialRun``'s interface for a trial's process, each store operation run by the relay."""

    def __init__(self, link: _Link, uri: str, experiment_id: str, *, sweep: str, cell: str, flat: dict,
                 run_key: str, trial_id: str | None = None, tags: dict | None = None):
        super().__init__(run_key)
        self._link, self._handle = link, None
        self._spec = {"uri": uri, "experiment_id": experiment_id, "sweep": sweep, "cell": cell, "flat": flat,
                      "run_key": run_key, "trial_id": trial_id, "tags": dict(tags or {})}
        self.other_id: str | None = None
        self.other_final: dict = {}

    def open(self, resumed_at_epoch: int | None = None) -> "RemoteRun":
        state = self._link.call({"op": "open", "run": self._spec, "claim": this_claim(),
                                 "resumed_at_epoch": resumed_at_epoch})
        self._handle = state.pop("handle")
        for key, value in state.items():
            setattr(self, key, value)
        return self

    def _call(self, op: str, **args) -> None:
        pending, self._pending = self._pending, []  # the relay's run holds them from here (as TrialRun's does)
        self._link.call({"op": op, "handle": self._handle, "pending": pending, **args})

    def flush(self, tags: dict | None = None) -> None:
        self._call("flush", tags={k: str(v) for k, v in (tags or {}).items()})

    def set_checkpoint_dir(self, location: str) -> None:
        if location != self.checkpoint_dir:
            self._call("checkpoint_dir", location=location)
            self.checkpoint_dir = location

    def resumed(self, epoch: int | None) -> None:
        if epoch is not None and self.run_id is not None:
            self._call("resumed", epoch=epoch)

    def log_export(self, path: str) -> None:
        self._call("export", path=path)  # a path on this host: the relay serves a local runtime only

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
