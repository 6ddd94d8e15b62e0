"""Reading runs back: searches over all pages, a run's typed config and results, flat rows."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from .names import CLAIM_PARAM, FINAL_PREFIX, ROLE_TAG, SWEEP_ROLE
from .store import client


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


RUN_TAGS = ("cell", "run_key", "sweep", ROLE_TAG, "collapsed_layers", "sparse_core_version", "git_commit")  # a row's tags


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
