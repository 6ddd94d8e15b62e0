"""The MLflow store of a study: where it is, its experiments, and reading runs back.

Shared by ``sweeps`` (which writes one run per trial) and ``analysis`` (which reads them); it
imports neither, nor Ray. One naming rule lives here: per-epoch accuracy and loss are ``epoch/<key>``,
results once at the end ``final/<key>`` (tags; four of them also metrics: ``FINAL_AS_METRICS``),
per pruning round ``prune/<key>`` and the other
per-epoch values ``trainer/<key>`` (MLflow charts one section per prefix, in name order, so a run's
page shows the curves first and the final values next); readers take ``final/`` as the plain key,
and runs logged before the prefixes read the same.

The subtle point is the experiment kind. MLflow 3.17's UI opens an experiment on its GenAI
overview unless told otherwise: its experiment page takes the kind from the workflow switch
(``?workflowType=`` in the URL, else the browser's saved choice, which defaults to ``genai``), and
the experiment tag ``mlflow.experimentKind`` is what the UI's kind selector writes and reads.
Every experiment made or written to here carries ``custom_model_development`` and every link we
print carries ``workflowType=machine_learning``, plus ``viewStateShareKey=study``: a view of the
runs table stored as the experiment tag ``mlflow.sharedViewState.study``, which is how the UI's
"share view" works: runs grouped by cell and density (``GROUP_BY``, the seeds averaged), a sweep's
groups collapsed (``collapse_groups``), best validation accuracy first.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Iterable

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow's "Machine learning" kind (not GenAI)
GENAI_KINDS = ("genai_development", "genai_development_inferred")
UI_QUERY = "workflowType=machine_learning"  # the UI's workflow switch, set by the link itself
STUDY_VIEW = "study"  # ?viewStateShareKey= of the runs-table view below
VIEW_TAG = "mlflow.sharedViewState." + STUDY_VIEW
GROUP_BY = {"aggregateFunction": "average",  # the runs table's "Group by", seeds averaged in each group
            "groupByKeys": [{"mode": "tag", "groupByData": "cell"}, {"mode": "param", "groupByData": "prune.density"}]}
_VIEW_STATE = {  # column ids as the UI writes them: <type>.`<key>`
    "selectedColumns": ["tags.`cell`", "params.`prune.density`", "metrics.`final/val_acc`",
                        "metrics.`final/test_acc`", "metrics.`final/n_collapsed_layers`", "tags.`at_chance`"],
    "orderByKey": "metrics.`final/val_acc`", "orderByAsc": False, "groupBy": GROUP_BY, "groupsExpanded": {},
    "useGroupedValuesInCharts": True}
PARENT_TAG = "mlflow.parentRunId"  # MLflow's nesting: a trial's run is a child of its sweep's run
ROLE_TAG, SWEEP_ROLE = "role", "sweep"  # the sweep's own (parent) run: tags role=sweep, sweep=<name>


def group_id(cell: str, density: float | str) -> str:
    """The runs table's id of the (cell, density) group (``groupsExpanded`` keys): ``tag.cell.<cell>,
    param.prune.density.<param value>``."""
    return f"tag.cell.{cell},param.prune.density.{density}"


def study_view(collapsed: Iterable[str] = (), current: str | None = None) -> str:
    """The view's JSON, with the groups ``collapsed`` (``group_id``s) added to those ``current`` (the
    experiment's view tag) has collapsed: one row per cell and density, the seeds averaged."""
    state = dict(_VIEW_STATE)
    try:
        old = json.loads(current).get("groupsExpanded", {}) if current else {}
    except (ValueError, AttributeError):
        old = {}
    state["groupsExpanded"] = {**(old if isinstance(old, dict) else {}), **{g: False for g in collapsed}}
    return json.dumps(state, sort_keys=True)


# Metric names: MLflow 3.17 charts a run in one section per ``prefix/``, sections sorted by name, and
# puts unprefixed metrics last, so the per-epoch curves get the prefix that sorts first.
EPOCH_PREFIX = "epoch/"  # per training epoch (step = global epoch): the accuracy and loss curves
FINAL_PREFIX = "final/"  # once, at the end (step = number of epochs): the results
# Every result is a tag ``final/<key>`` (full precision, never charted); these are also metrics, rounded
# to 4 decimals, which the runs table shows, sorts and averages (the run's page charts each as one dot).
FINAL_AS_METRICS = ("val_acc", "test_acc", "n_collapsed_layers", "at_chance")  # the runs table averages them (at_chance: the share of seeds)
PRUNE_PREFIX = "prune/"  # per pruning round (step = round): right after pruning
TRAINER_PREFIX = "trainer/"  # per epoch, the rest: learning rate, density, mask and soft-schedule state, seconds
CURVES = ("train_loss", "val_acc", "val_loss", "test_acc", "test_loss")  # the epoch/ keys
# A run's claims on a tracking server (sweeps/claims.py): params ``claim.<n>``, not config keys.
CLAIM_PARAM = "claim."
SEARCH_CELL = "optuna"  # the cell tag of Optuna search trials (their tuned knobs differ run to run)


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI, deleted experiment)."""


# ---- where ---------------------------------------------------------------------------------
def resolve_tracking_uri(cli_value: str | None = None) -> str:
    """``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.

    A relative SQLite path is made absolute here (against the current directory), because Ray
    workers run elsewhere. The plain file store (``./mlruns``) is refused by MLflow >= 3.13.
    """
    uri = (cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI).strip()
    if uri.startswith("sqlite://"):
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            raise TrackingError(f"tracking URI {uri!r}: give a database file, e.g. {DEFAULT_TRACKING_URI}")
        return "sqlite:///" + os.path.abspath(path)
    if "://" not in uri or uri.startswith("file:"):
        raise TrackingError(f"tracking URI {uri!r} is a file store, which MLflow >= 3.13 refuses; use "
                            f"{DEFAULT_TRACKING_URI} or an http(s) tracking server")
    return uri


def sqlite_path(uri: str) -> str | None:
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def unwritable(path: str, *, directory: bool = True) -> str | None:
    """Why ``path`` (a directory, or a file when ``directory`` is False) cannot be created or written
    there, or None. Checks the path and its nearest existing ancestor, touching nothing."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path):
        if directory and not os.path.isdir(path):
            return f"{path} is a file, not a directory"
        if not directory and os.path.isdir(path):
            return f"{path} is a directory"
        if not os.access(path, os.W_OK | (os.X_OK if directory else 0)):
            return f"no write permission on {path}"
        return None
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no write permission in {parent}"
    return None


def check_reachable(uri: str, timeout: float = 5.0, writable: bool = False) -> None:
    """Fail fast (seconds, not MLflow's minutes of retries) if the store cannot be reached (a SQLite store:
    a database file, undamaged, and with ``writable`` one this user can write beside)."""
    path = sqlite_path(uri)
    if path is not None:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise TrackingError(f"tracking URI {uri}: directory {parent} does not exist")
        if os.path.isdir(path):
            raise TrackingError(f"tracking URI {uri}: {path} is a directory; give a database file, e.g. "
                                f"sqlite:///{path.rstrip('/')}/mlflow.db")
        why = writable and (unwritable(path, directory=False) or unwritable(path + ".lock", directory=False))
        if why:
            raise TrackingError(f"tracking URI {uri}: {why}; the store needs a writable file and folder")
        problem = sqlite_problem(path)
        if problem:
            raise TrackingError(f"tracking URI {uri}: {path} {problem}; restore it from a backup or pass another "
                                f"--mlflow-uri")
        return
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            urllib.request.urlopen(url, timeout=timeout).read(64)
        except urllib.error.HTTPError:
            return  # it answered: reachable (auth or routing problems surface from MLflow itself)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(f"MLflow tracking server {uri} is not reachable ({reason}); start it "
                                f"(mlflow server ...) or pass another --mlflow-uri") from None


_SQLITE_HEADER = b"SQLite format 3\x00"
QUICK_CHECK_MAX_BYTES = 256 * 2**20  # larger stores get the header and schema check only (quick_check reads it all)


def sqlite_problem(path: str) -> str | None:
    """What is wrong with the existing file at ``path`` as an SQLite database ("is not an SQLite
    database (...)", "is damaged (...)": another kind of file, corrupt, truncated), or None (also when
    there is no file yet). Read-only; never runs MLflow."""
    import sqlite3

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"is unreadable ({e.strerror or e})"
    if size == 0:
        return None  # an empty file: SQLite makes it a database
    if head != _SQLITE_HEADER:
        return "is not an SQLite database (no SQLite header: another kind of file, or overwritten)"
    try:
        db = sqlite3.connect(Path(path).as_uri() + "?mode=ro", uri=True, timeout=5)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            if size <= QUICK_CHECK_MAX_BYTES:
                verdict = db.execute("PRAGMA quick_check").fetchone()[0]
                if verdict != "ok":
                    return f"is damaged (quick_check: {str(verdict)[:120]})"
        finally:
            db.close()
    except sqlite3.Error as e:
        if "locked" in str(e).lower():
            return None  # another process writes it now: not damage
        return f"is damaged ({type(e).__name__}: {str(e)[:120]})"
    return None


# ---- processes that claim a run ------------------------------------------------------------------
def proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` (Linux: clock ticks after boot; elsewhere "0"), None if it is
    gone or a zombie. Pid and start time together name one process: pids are reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else fields[19]
    except FileNotFoundError:
        return None
    except (OSError, IndexError):  # no procfs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "0"


def this_claim() -> str:
    """``host/pid/start``: the process that runs a trial, written to its run as tag ``claimed_by``."""
    return f"{socket.gethostname()}/{os.getpid()}/{proc_start(os.getpid())}"


def claim_alive_here(claim: str) -> bool | None:
    """Whether the process a claim (``this_claim``) names still runs: True or False on this host, None for
    a claim made on another host (or not a claim)."""
    if claim.count("/") < 2:
        return None
    host, pid, start = claim.rsplit("/", 2)
    if host != socket.gethostname():
        return None
    return pid.isdigit() and proc_start(int(pid)) == start


# ---- the SQLite store's settings ----------------------------------------------------------------
_sqlite_listener = False  # registered in this process (see tune_sqlite)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    """WAL journal and synchronous=NORMAL on every new SQLite connection (any engine in this process).

    A write then appends to the ``-wal`` file beside the database and syncs only at checkpoints:
    ``log_batch`` costs 1.2-1.5x less CPU and 1.5-1.7x less wall than with the rollback journal, and readers
    never block the writer. Durability: a killed process (SIGKILL, OOM) loses nothing committed; only
    an OS crash or power loss can lose the last transactions (never corrupting the file). The WAL mode
    is stored in the file; ``synchronous`` is per connection (MLflow sets ``busy_timeout`` itself).
    """
    import sqlite3

    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cursor = dbapi_connection.cursor()
    try:
        if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            cursor.execute("PRAGMA journal_mode=WAL")  # no-op (stays 'memory') for an in-memory database
        cursor.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error:  # a read-only file, or locked for longer than the connection's timeout: keep defaults
        pass
    finally:
        cursor.close()


def tune_sqlite() -> None:
    """Register ``_sqlite_pragmas`` for every SQLAlchemy engine of this process (once); ``client`` calls
    it, so it is in place before MLflow opens its first connection in the driver and in each worker."""
    global _sqlite_listener
    if not _sqlite_listener:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "connect", _sqlite_pragmas)
        _sqlite_listener = True


def client(uri: str):
    """An ``MlflowClient`` of ``uri``, with the SQLite settings above (use it rather than MlflowClient)."""
    from mlflow import MlflowClient

    tune_sqlite()
    return MlflowClient(tracking_uri=uri)


# ---- experiments -----------------------------------------------------------------------------
def mark_training_experiment(c, exp) -> None:
    """Tag ``exp`` as a model-training experiment (unless it has another non-GenAI kind already) and
    give it the runs-table view our links open."""
    tags = exp.tags or {}
    if tags.get(EXPERIMENT_KIND_TAG) in (None, "", *GENAI_KINDS):
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    view = study_view(current=tags.get(VIEW_TAG))
    if tags.get(VIEW_TAG) != view:
        c.set_experiment_tag(exp.experiment_id, VIEW_TAG, view)


def collapse_groups(uri: str, exp_id: str, groups: Iterable[tuple[str, float | str]]) -> None:
    """Show these (cell, density) groups collapsed in the experiment's runs-table view (one averaged row
    each); groups of earlier sweeps stay as they were."""
    c = client(uri)
    current = c.get_experiment(exp_id).tags.get(VIEW_TAG)
    view = study_view((group_id(cell, d) for cell, d in groups), current)
    if view != current:
        c.set_experiment_tag(exp_id, VIEW_TAG, view)


def experiment_id(uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (artifacts next to a SQLite db), tagged as
    a model-training experiment either way."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it or choose another --experiment")
        mark_training_experiment(c, exp)
        return exp.experiment_id
    location = None
    path = sqlite_path(uri)
    if path is not None:  # MLflow's default (./mlruns of whichever process creates it) would scatter them
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        location = Path(os.path.dirname(path), "mlartifacts", safe).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location,
                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, VIEW_TAG: study_view()})
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        mark_training_experiment(c, exp)
        return exp.experiment_id


def free_port(preferred: int = 5000) -> int:
    """``preferred`` if nothing listens on 127.0.0.1 there now, else a port the OS says is free."""
    import socket

    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    return preferred


def ui_link(uri: str, exp_id: str | None = None, port: int | None = None) -> tuple[str | None, str]:
    """(command that serves the UI or None when ``uri`` is a server, URL that opens the experiment's
    runs in the training view); ``port``: default a free one on 127.0.0.1 (5000 when free)."""
    port = port or free_port()
    path = sqlite_path(uri)
    if path is not None:
        command = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port {port}"
        base = f"http://127.0.0.1:{port}"
    elif uri.startswith(("http://", "https://")):
        command, base = None, uri.rstrip("/")
    else:
        command, base = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port {port}", f"http://127.0.0.1:{port}"
    page = (f"/#/experiments/{exp_id}/runs?viewStateShareKey={STUDY_VIEW}&{UI_QUERY}" if exp_id
            else f"/#/experiments?{UI_QUERY}")
    return command, base + page


# ---- read ------------------------------------------------------------------------------------
def search_ids(c, experiment_ids: Iterable[str], filter_string: str = "", order_by: list[str] | None = None,
               view_type=None) -> list:
    """Every run of these experiments matching ``filter_string``, all pages."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = c.search_runs(list(experiment_ids), filter_string=filter_string, max_results=1000,
                             order_by=order_by, page_token=token, run_view_type=view_type or ViewType.ACTIVE_ONLY)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def search(uri: str, experiment: str, filter_string: str = "") -> list:
    """Every run of ``experiment`` (by name) matching ``filter_string`` (all pages); [] if it does not exist."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else search_ids(c, [exp.experiment_id], filter_string)


def typed_config(params: dict[str, str]) -> tuple[dict | None, list[str]]:
    """(the run's flat sparse_core config, typed, defaults filled in; param keys that are not config
    keys, claims aside). None when no param is a config key or the values do not parse."""
    from sparse_core.config import FIELD_TYPES, from_flat

    known = {k: v for k, v in params.items() if k in FIELD_TYPES}
    extra = sorted(k for k in set(params) - set(known) if not k.startswith(CLAIM_PARAM))
    if not known:
        return None, extra
    try:
        return from_flat(known).to_flat(), extra
    except ValueError:
        return None, extra


def final_metrics(metrics: dict[str, float], tags: dict[str, str] | None = None) -> dict[str, float]:
    """A run's results by plain key: MLflow's latest value of each metric, ``final/<key>`` metrics and
    ``final/<key>`` tags (the results that are not charted: ``FINAL_AS_METRICS``) with the prefix
    stripped, so ``final/test_acc`` wins over the per-epoch ``test_acc`` (runs without the prefix read
    as logged, runs with every result as a metric read the same)."""
    out = {k: float(v) for k, v in metrics.items() if not k.startswith(FINAL_PREFIX)}
    out.update({k[len(FINAL_PREFIX):]: float(v) for k, v in metrics.items() if k.startswith(FINAL_PREFIX)})
    for k, v in (tags or {}).items():
        if k.startswith(FINAL_PREFIX):
            try:
                out[k[len(FINAL_PREFIX):]] = float(v)
            except ValueError:
                pass
    return out


RUN_TAGS = ("cell", "run_key", "sweep", "collapsed_layers", "sparse_core_version", "git_commit")  # a row's tags


def run_row(run, extra_keys: set | None = None) -> dict | None:
    """A flat row (typed config, final metrics, ``RUN_TAGS`` over same-named metrics, run_id, status, start_time),
    None if the params are not a sparse_core config; param keys that are not config keys go into ``extra_keys``."""
    config, extra = typed_config(run.data.params)
    if config is None:
        return None
    if extra_keys is not None:
        extra_keys.update(extra)
    tags = run.data.tags
    row = {**config, **final_metrics(run.data.metrics, tags)}
    row.update({t: tags.get(t, "") for t in RUN_TAGS})
    row.update(run_id=run.info.run_id, status=run.info.status, start_time=run.info.start_time)
    return row


def run_rows(runs: Iterable, statuses: Iterable[str] | None = None, skip_cells: dict[str, str | None] | None = None,
             newest_per_key: bool = False, left_out: Counter | None = None, extra_keys: set | None = None) -> list:
    """(run, ``run_row``) of ``runs`` (newest first), leaving out a sweep's parent run and, counted in ``left_out``
    by reason: a cell in
    ``skip_cells`` (reason None: uncounted), a status not in ``statuses``, params not a config, a run_key seen."""
    left_out, out, seen = Counter() if left_out is None else left_out, [], set()
    for run in runs:
        cell = run.data.tags.get("cell")
        if run.data.tags.get(ROLE_TAG) == SWEEP_ROLE:
            continue  # a sweep's parent run: its summary, not a trial
        if cell in (skip_cells or {}):
            left_out.update([skip_cells[cell]] if skip_cells[cell] else [])
        elif statuses is not None and run.info.status not in statuses:
            left_out[run.info.status] += 1
        elif (row := run_row(run, extra_keys)) is None:
            left_out["params not a valid sparse_core config"] += 1
        elif newest_per_key and (row["run_key"] or row["run_id"]) in seen:
            left_out["duplicate run_key (kept the newest)"] += 1
        else:
            seen.add(row["run_key"] or row["run_id"])
            out.append((run, row))
    return out


def load_runs(uri: str, experiment: str, sweep: str | None = None, status: str | None = "FINISHED") -> list[dict]:
    """Rows (see ``run_row``) of an experiment, optionally of one sweep and one status."""
    clauses = [f"attributes.status = '{status}'"] if status else []
    if sweep:
        clauses.append(f"tags.sweep = '{sweep}'")
    return [row for _, row in run_rows(search(uri, experiment, " and ".join(clauses)))]
