"""Claims: at most one live MLflow run per run_key, even with several sweeps on one store.

A trial writes ``claimed_by`` (host/pid/start of its process) and a ``heartbeat`` to its run.
Another trial of the same run_key treats that run as taken while the claim is live: on the same
host while that process runs (a killed driver takes its trials' processes with it, so their runs
become orphans at once), on another host while the heartbeat is younger than ``LEASE_S``.

Who claims: a SQLite store is locked (``store_lock``) around schema creation and around
check-then-claim, so two drivers can start together on a new file. A tracking server has no lock
to offer; there the store itself arbitrates, through a write-once param: MLflow never changes a
logged param (the backend's primary key on (run, key) refuses a second writer, so of two
concurrent ``log_param`` calls exactly one lands). Claiming generation ``n`` of a run is logging
``claim.<n>`` = ``<claim>@<unix time>`` (``take``): continuing an orphan takes its next generation,
so of two trials that found the same orphan one wins. Runs created at the same moment for one
run_key share no run to take; each creator takes ``claim.1`` of every new run of the key it sees,
oldest first, and stops at the first it cannot take (``arbitrate``): two creators that see each
other's runs meet on the same first run, and a creator that missed the other's run is seen by it,
so exactly one of them takes all it sees and trains. (Ordering by start time alone was not enough:
start times are the clients' clocks, so a run created after a rival's recheck could still sort first,
and both trained.) The params stay as the run's record of who claimed it when.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from runstore import CLAIM_PARAM  # + generation: the write-once claims of a run on a tracking server
from runstore import TrackingError
from runstore import proc_start as _proc_start, this_claim  # noqa: F401 - a claim names one process (host/pid/start)

# A claim on another host is live while its heartbeat (refreshed at every write: ``tracking.FLUSH_EVERY_S``)
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



def _number(text: str | None) -> float:
    try:
        return float(text or 0)
    except ValueError:
        return 0.0


def claim_generation(run) -> int:
    """The newest generation ``n`` of the run's ``claim.<n>`` params; 0 when it has none."""
    gens = [k[len(CLAIM_PARAM):] for k in run.data.params if k.startswith(CLAIM_PARAM)]
    return max((int(g) for g in gens if g.isdigit()), default=0)


def newest_take(run) -> tuple[str, float] | None:
    """(claim, unix time) of the run's newest ``claim.<n>`` param; None when it has none."""
    n = claim_generation(run)
    if not n:
        return None
    who, _, when = run.data.params[f"{CLAIM_PARAM}{n}"].rpartition("@")
    return who, _number(when)


def current_claim(run) -> tuple[str, float]:
    """(the claim on the run, its last sign of life in unix seconds). The newest ``claim.<n>`` param
    wins over the ``claimed_by`` tag: a trial takes the param first and writes its tags after."""
    tags = run.data.tags
    claim, beat = tags.get("claimed_by", ""), _number(tags.get("heartbeat"))
    taken = newest_take(run)
    if taken is not None:
        beat = max(beat, taken[1]) if taken[0] == claim else taken[1]
        claim = taken[0]
    return claim, beat


def claim_alive(run, now: float | None = None) -> bool:
    """Whether the process that claimed this (non-terminal) run still runs. Runs without a claim (from
    older versions) are orphans. A KILLED or FAILED run counts as open while a generation taken after
    it ended is live: a trial continuing it takes the claim before it sets the run RUNNING again."""
    claim, beat = current_claim(run)
    if run.info.status not in OPEN_STATUSES:
        taken = newest_take(run)
        if run.info.status == "FINISHED" or taken is None or taken[1] * 1000 <= (run.info.end_time or 0):
            return False
    if claim.count("/") < 2:
        return False
    host, pid, start = claim.rsplit("/", 2)
    if host == socket.gethostname():
        return pid.isdigit() and _proc_start(int(pid)) == start
    return (time.time() if now is None else now) - beat < LEASE_S


def take(c, run_id: str, generation: int, claim: str) -> bool | None:
    """Claim generation ``generation`` of a run for ``claim`` (write-once param ``claim.<n>``): True if
    it is ours (now, or already), False if another claim has it, None if the run was deleted meanwhile
    (a creator that lost ``arbitrate`` deletes its run)."""
    key = f"{CLAIM_PARAM}{generation}"
    try:
        c.log_param(run_id, key, f"{claim}@{time.time():.3f}")
        return True
    except Exception as e:  # noqa: BLE001 - MLflow's error for a changed param; read what is there
        error = e
    run = c.get_run(run_id)
    if run.info.lifecycle_stage != "active":
        return None
    if key not in run.data.params:
        raise error
    return run.data.params[key].rpartition("@")[0] == claim


def arbitrate(c, runs: list, claim: str):
    """Of runs of one run_key created at the same moment (``runs``: as the search returns them after
    this process created its own; oldest first), take ``claim.1`` of every open one in that order
    and stop at the first another claim has (module doc). None: every one is ours, this process
    trains; else the run it could not take."""
    for r in runs:
        if r.info.status in OPEN_STATUSES and take(c, r.info.run_id, 1, claim) is False:
            return r
    return None


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
