"""Claims: at most one live MLflow run per run_key, even with several sweeps on one store.

A trial writes ``claimed_by`` (host/pid/start of its process) and a ``heartbeat`` to its run.
Another trial of the same run_key treats that run as taken while the claim is live: on the same
host while that process runs (a killed driver takes its trials' processes with it, so their runs
become orphans at once), on another host while the heartbeat is younger than ``LEASE_S``. A
SQLite store is locked (``store_lock``) around schema creation and around check-then-claim, so
two drivers can start together on a new file; other stores are claimed optimistically.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from runstore import TrackingError
from runstore import proc_start as _proc_start, this_claim  # noqa: F401 - a claim names one process (host/pid/start)

# A claim on another host is live while its heartbeat (refreshed at every flush, i.e. every checkpoint)
# is younger than this; on the same host, while the claiming process runs.
LEASE_S = 900.0
OPEN_STATUSES = ("RUNNING", "SCHEDULED")


@contextlib.contextmanager
def store_lock(uri: str):
    """Exclusive lock of a SQLite store across processes (``<db>.lock`` next to it; yields True), so
    that two drivers never both create MLflow's schema and two trials never both claim a run_key.
    Other stores yield False: runs are then claimed optimistically (see ``TrialRun.open``)."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    if path is None or fcntl is None:
        yield False
        return
    try:
        f = open(path + ".lock", "a")
    except OSError as e:  # e.g. a read-only folder
        raise TrackingError(f"cannot lock the MLflow store: {path}.lock: {e.strerror or e}; the store needs a "
                            f"writable folder") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)



def claim_alive(run, now: float | None = None) -> bool:
    """Whether the process that claimed this (non-terminal) run still runs. Runs without a claim (from
    older versions) are orphans."""
    claim = run.data.tags.get("claimed_by", "")
    if run.info.status not in OPEN_STATUSES or claim.count("/") < 2:
        return False
    host, pid, start = claim.rsplit("/", 2)
    if host == socket.gethostname():
        return pid.isdigit() and _proc_start(int(pid)) == start
    try:
        beat = float(run.data.tags.get("heartbeat", "0"))
    except ValueError:
        return False
    return (time.time() if now is None else now) - beat < LEASE_S


def runs_of_key(c, experiment_id: str, run_key: str) -> list:
    """Every (not deleted) run of ``run_key`` in the experiment, oldest first."""
    runs = c.search_runs([experiment_id], filter_string=f"tags.run_key = '{run_key}'", max_results=1000)
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def live_claims(c, experiment_id: str) -> dict[str, Any]:
    """run_key -> a RUNNING run whose claiming process is alive (trials running now, e.g. in
    another sweep on this store); ``c`` is an MlflowClient."""
    runs = c.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=50000)
    now = time.time()
    return {r.data.tags["run_key"]: r for r in runs if r.data.tags.get("run_key") and claim_alive(r, now)}
