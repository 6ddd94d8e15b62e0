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

Its parts: ``relay_protocol`` (the wire: limits, token file, line format), ``relay_scope`` (what a
request may do: ``Scope`` and each field's check), ``relay_server`` (``Relay``: the driver's runs and
operations), ``relay_connection`` (the sockets: caps, timeouts, token and peer check) and
``relay_client`` (a worker's ``Link`` and ``RemoteRun``). This module chooses, in a trial's process,
between the relay and a direct write (``trial_run``), and hands on the names the others use.
"""


from __future__ import annotations

import json
import os

from .claims import this_claim  # noqa: F401 - the claim a worker's requests carry
from .relay_client import Link, RemoteRun
from .relay_connection import peer_claim  # noqa: F401
from .relay_protocol import (ADDRESS_ENV, EXPORT_CHUNK, HELLO_TIMEOUT_S, IDLE_TIMEOUT_S,  # noqa: F401
                             MAX_CONNECTIONS, MAX_EXPORT, MAX_HELLO, MAX_LINE, MAX_METRICS, MAX_UNAUTHENTICATED)
from .relay_protocol import read_token as _read_token  # noqa: F401
from .relay_scope import Refused, Scope  # noqa: F401
from .relay_scope import result as _result  # noqa: F401
from .relay_server import Relay  # noqa: F401
from .tracking import RunLog, TrialRun

SWITCH_ENV = "SWEEPS_RELAY"  # "0" in the driver's environment: trials of a local runtime write directly


def wanted() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


_link: Link | None = None  # this worker's connection to the driver's relay, made at its first run


def _the_link() -> Link | None:
    global _link
    spec = os.environ.get(ADDRESS_ENV)
    if not spec:
        return None
    if _link is None:
        spec = json.loads(spec)
        _link = Link(spec["address"], spec["token_file"])
    return _link


def trial_run(uri: str, experiment_id: str, **kwargs) -> RunLog:
    """The run of one trial (not opened yet): through the driver's relay where the worker has one, else
    written directly (``tracking.TrialRun``)."""
    link = _the_link()
    return RemoteRun(link, uri, experiment_id, **kwargs) if link else TrialRun(uri, experiment_id, **kwargs)
