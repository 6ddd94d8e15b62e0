"""The driver's side of the relay: ``Relay`` runs each trial's store operations (one at a time) with a
``tracking.TrialRun`` of its own, within the ``Scope`` that ``serve`` sets. ``open`` takes only run_keys
of the sweep's trial set (each at most once per claim, i.e. per trial process) and returns a handle
(128 random bits); every other operation names a handle that ``open`` returned to its caller and comes
from that caller. ``export`` takes the model's bytes, never a path; ``checkpoint_dir`` must lie in the
sweep's Tune storage."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hmac
import json
import os
import secrets
import shutil
import tempfile
import threading

from .relay_connection import Connections
from .relay_protocol import (ADDRESS_ENV, EXPORT_CHUNK, HELLO_TIMEOUT_S, IDLE_TIMEOUT_S, MAX_CONNECTIONS, MAX_EXPORT,
                             MAX_UNAUTHENTICATED, write_token)
from .relay_scope import Refused, Scope, check, check_open, inside, pending, result
from .tracking import TrialRun

OPS = {"log": (), "flush": (), "checkpoint_dir": ("location",), "resumed": ("epoch",),  # op -> its own fields
       "export": ("data", "last"), "finish": ("result",), "fail": ("status", "reason")}


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
        write_token(self.token_file, self._token)
        self.idle_timeout_s, self.hello_timeout_s = idle_timeout_s, hello_timeout_s
        self.scope: Scope | None = None
        self._runs: dict[str, _Open] = {}  # handle -> the run it opened
        self._opened: set[tuple[str, str]] = set()  # (run_key, claim) opened in this scope
        self._lock = threading.Lock()
        self._server = Connections(self, max_connections, max_unauthenticated)
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
        check(request, dict, "a request")
        if peer is not None:
            request = {**request, "claim": peer}
        with self._lock:
            if request.get("op") == "open":
                return self._open(request)
            return self._on_handle(request)

    def _open(self, request: dict) -> dict:
        scope = self.scope
        key, claim, trial_id, resumed, tags, (cell, flat) = check_open(request, scope)
        if (key, claim) in self._opened:
            raise Refused(f"open: run_key {key} was opened by {claim} already")
        self._opened.add((key, claim))
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
        if op not in OPS:
            raise Refused(f"unknown relay op {op!r}; valid: {['open', *OPS]}")
        unknown = sorted(set(request) - {"op", "handle", "claim", "pending", *OPS[op]})
        if unknown:
            raise Refused(f"{op}: unknown field(s) {unknown}; valid: {sorted({'handle', 'pending', *OPS[op]})}")
        entry.run._pending += pending(request)
        getattr(self, f"_op_{op}")(entry, request)
        if op in ("finish", "fail"):
            del self._runs[handle]
        return None

    def _op_log(self, entry: _Open, request: dict) -> None:
        pass  # the metrics are buffered; the next flush writes them

    def _op_flush(self, entry: _Open, request: dict) -> None:
        entry.run.write()  # the trial's RemoteRun found it due

    def _op_checkpoint_dir(self, entry: _Open, request: dict) -> None:
        location = check(request.get("location"), str, "location")
        if len(location) > 4096 or "\0" in location or not inside(location, self.scope and self.scope.storage):
            raise Refused(f"checkpoint_dir: {location[:200]!r} is not inside the sweep's Tune storage")
        entry.run.set_checkpoint_dir(location)

    def _op_resumed(self, entry: _Open, request: dict) -> None:
        epoch = check(request.get("epoch"), int, "epoch")
        if epoch < 0:
            raise Refused(f"resumed: epoch must be >= 0, not {epoch}")
        entry.run.resumed(epoch)

    def _op_export(self, entry: _Open, request: dict) -> None:
        """A chunk of the exported model's bytes; the last one stores the file as the run's artifact."""
        try:
            data = base64.b64decode(check(request.get("data"), str, "data"), validate=True)
        except ValueError as e:
            raise Refused(f"export: data is not base64: {e}") from None
        if len(data) > EXPORT_CHUNK or entry.exported + len(data) > MAX_EXPORT:
            raise Refused(f"export: at most {EXPORT_CHUNK} bytes a request and {MAX_EXPORT} in all")
        if entry.export is None:
            entry.export = tempfile.NamedTemporaryFile(dir=self._dir, suffix=".safetensors")
        entry.export.write(data)
        entry.exported += len(data)
        if check(request.get("last"), bool, "last"):
            entry.export.flush()
            try:
                entry.run.log_export(entry.export.name)
            finally:
                entry.export.close()
                entry.export, entry.exported = None, 0

    def _op_finish(self, entry: _Open, request: dict) -> None:
        entry.run.write_final(result(request.get("result")))

    def _op_fail(self, entry: _Open, request: dict) -> None:
        status, reason = request.get("status"), check(request.get("reason"), str, "reason")
        if status not in ("FAILED", "KILLED"):
            raise Refused(f"fail: status must be FAILED or KILLED, not {status!r}")
        entry.run.end_failed(status, reason[:4000])
