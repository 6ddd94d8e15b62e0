"""A worker's side of the relay: ``Link``, its one connection to the driver (which presents the token
from the file that the relay's environment variable names), and ``RemoteRun``, a trial's run whose store
operations the driver's relay runs (the worker imports no MLflow)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

from sparse_core.results import RunResult

from .claims import this_claim
from .relay_protocol import BUSY, EXPORT_CHUNK, IDLE_TIMEOUT_S, MAX_LINE, MAX_METRICS, line, read_token
from .tracking import RunLog, TrackingError, failure, final_fields


class _Busy(Exception):
    """The relay is at a connection cap (``BUSY``): try again later."""


class Link:
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
            token = read_token(self.token_file)
            sock = socket.create_connection((host, int(port)), timeout=30)
            self._file = sock.makefile("rwb")
            self._file.write(line({"token": token}))
            self._file.flush()
            reply = self._file.readline(MAX_LINE)
        except OSError as e:
            self._file = None
            raise TrackingError(f"cannot reach the driver's MLflow relay at {self.address}: {e}") from e
        reply = json.loads(reply) if reply else {"error": "closed the connection"}
        if "error" in reply:
            self._file = None
            if reply["error"].startswith(BUSY):
                raise _Busy
            raise TrackingError(f"the driver's MLflow relay at {self.address}: {reply['error']}")
        self._idle_s = float(reply["ok"]["idle_timeout_s"]) / 2
        sock.settimeout(None)  # an operation may wait for another sweep's store lock

    def call(self, request: dict):
        sent = line({"claim": this_claim(), **request})
        if len(sent) > MAX_LINE:
            raise TrackingError(f"a relay request of {len(sent)} bytes is over the relay's {MAX_LINE}")
        with self._lock:
            if self._file is not None and time.monotonic() - self._last > self._idle_s:
                self._file.close()
                self._file = None
            if self._file is None:
                self._connect()
            try:
                self._file.write(sent)
                self._file.flush()
                received = self._file.readline(MAX_LINE)
            except OSError as e:
                self._file = None
                raise TrackingError(f"lost the driver's MLflow relay at {self.address}: {e}") from e
            self._last = time.monotonic()
            if not received:
                self._file = None
                raise TrackingError(f"the driver's MLflow relay at {self.address} closed the connection")
        reply = json.loads(received)
        if "error" in reply:
            raise TrackingError(f"MLflow relay: {reply['error']}")
        return reply["ok"]


class RemoteRun(RunLog):
    """``tracking.TrialRun``'s interface for a trial's process, each store operation run by the relay
    (which fixes the store, experiment, sweep and parent run: ``uri``, ``experiment_id``, ``sweep`` and
    ``parent_run_id`` are not sent)."""

    def __init__(self, link: Link, uri: str, experiment_id: str, *, sweep: str, cell: str, flat: dict,
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
        if self.due():  # else the rows wait here (RunLog.due)
            self.write()

    def write(self) -> None:
        """The driver's run writes what it holds and what this run buffered."""
        self._call("flush")
        self.wrote()

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

    def finish(self, result: RunResult | dict) -> None:
        self._call("finish", result=final_fields(result))

    def fail(self, error: BaseException) -> None:
        if self.run_id is None:
            return
        status, reason = failure(error)
        try:
            self._call("fail", status=status, reason=reason)
        except Exception:  # noqa: BLE001 - the original error matters more than this one (as in TrialRun)
            pass
