"""Read sweep runs from MLflow into one typed DataFrame (one row per run).

Columns: every flat config key of ``sparse_core`` (typed by ``from_flat``, so ``prune.density`` is a
float and ``post.soft_skip`` a bool), the final metrics (``final/test_acc`` read as ``test_acc``; runs
logged before the prefix read the same, see ``runstore``), the tags
``cell``, ``run_key``, ``sweep``, ``collapsed_layers``, and ``run_id``, ``experiment``, ``status``.
The subtle point: runs that are not FINISHED (a FAILED trial, a RUNNING one mid-sweep) would bias a
mean, so they are left out by default and the count per status is logged, never dropped silently;
so are the runs of Optuna searches (cell ``optuna``: their tuned knobs differ from run to run) unless
``include_search``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections import Counter
from typing import Iterable, Sequence

import pandas as pd
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from runstore import (ROLE_TAG, SEARCH_CELL, SWEEP_ROLE, TRAINER_PREFIX, final_metrics, parse_bool, search_ids,
                      typed_config)
from runstore import client as store_client
from sparse_core.config import FIELD_TYPES

log = logging.getLogger("analysis")

TAGS = ("cell", "run_key", "sweep", "collapsed_layers", "sparse_core_version", "git_commit")
ANALYSIS_CELL = "analysis"  # the `cell` tag of the run that holds the report (never a trial)
LAYER_DENSITY_ARTIFACT = "layer_density.json"


class AnalysisError(ValueError):
    """Bad input from the user (unknown experiment, metric, key, ...): the CLI exits 2 with this message."""


def split_names(items: Iterable[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (repeatable options that also take comma lists)."""
    return [part.strip() for item in items or () for part in item.split(",") if part.strip()]


def experiment_ids(client: MlflowClient, names: Sequence[str]) -> dict[str, str]:
    """{name: id}; an unknown name is an error that lists the experiments that exist."""
    if not names:
        raise AnalysisError("no experiment given: pass --experiment NAME" + _existing(client))
    out = {}
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            raise AnalysisError(f"experiment {name!r} not found at {client.tracking_uri}" + _existing(client))
        out[name] = exp.experiment_id
    return out


def _existing(client: MlflowClient) -> str:
    names = sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
    return "; existing experiments: " + (", ".join(names) if names else "(none)")


def load_runs(uri: str, experiments: Sequence[str], statuses: Sequence[str] = ("FINISHED",),
              include_search: bool = False) -> pd.DataFrame:
    """All trial runs of ``experiments`` whose status is in ``statuses``, one row each.

    Left out, with a logged count per reason: other statuses, the analysis run itself, runs of Optuna
    searches (unless ``include_search``) and runs whose params are not a sparse_core config. Runs that
    repeat a run_key (same config run twice) keep the newest.
    """
    client = store_client(uri)
    ids = experiment_ids(client, experiments)
    names = {v: k for k, v in ids.items()}
    runs = search_ids(client, ids.values(), order_by=["attributes.start_time DESC"])
    wanted = {s.upper() for s in statuses}
    left_out: Counter = Counter()
    extra_keys: set[str] = set()
    rows, seen, artifact_uris = [], set(), {}
    for run in runs:
        tags = run.data.tags
        if tags.get("cell") == ANALYSIS_CELL:
            continue  # the report's own run: not a trial, and not worth a message
        if tags.get(ROLE_TAG) == SWEEP_ROLE:
            continue  # a sweep's parent run: its summary, not a trial
        if tags.get("cell") == SEARCH_CELL and not include_search:
            left_out[f"Optuna search runs (cell {SEARCH_CELL!r}; --include-search to use them)"] += 1
            continue
        if run.info.status not in wanted:
            left_out[run.info.status] += 1
            continue
        config, extra = typed_config(run.data.params)
        if config is None:
            left_out["params not a valid sparse_core config"] += 1
            continue
        extra_keys.update(extra)
        key = tags.get("run_key") or run.info.run_id
        if key in seen:  # newest first, so the older copy of the same config (and seed) goes
            left_out["duplicate run_key (kept the newest)"] += 1
            continue
        seen.add(key)
        row = {**config, **final_metrics(run.data.metrics, tags)}
        row.update({t: tags.get(t, "") for t in TAGS})  # the tag wins over a same-named per-round metric
        row["cell"] = row["cell"] or "(no cell tag)"
        row.update(run_id=run.info.run_id, experiment=names[run.info.experiment_id], status=run.info.status,
                   start_time=run.info.start_time)
        rows.append(row)
        artifact_uris[run.info.run_id] = run.info.artifact_uri
    where = ", ".join(repr(n) for n in ids)
    summary = f"loaded {len(rows)} run(s) from {where} (status {', '.join(sorted(wanted))})"
    if left_out:
        summary += "; left out " + ", ".join(f"{n} {why}" for why, n in sorted(left_out.items()))
    log.info(summary)
    if extra_keys:
        log.warning("ignored params that are not sparse_core config keys: %s", ", ".join(sorted(extra_keys)))
    if not rows:
        raise AnalysisError(f"no runs to analyse in {where}: " + summary)
    df = pd.DataFrame(rows).sort_values(["experiment", "cell", "start_time"], kind="stable").reset_index(drop=True)
    df.attrs["left_out"] = dict(left_out)
    df.attrs["tracking_uri"] = uri
    df.attrs["experiments"] = list(ids)
    df.attrs["artifact_uris"] = artifact_uris  # run_id -> artifact root, for layer_densities
    return df


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric columns that are MLflow metrics (not config keys, not bookkeeping)."""
    skip = set(FIELD_TYPES) | set(TAGS) | {"run_id", "experiment", "status", "start_time"}
    return [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]


def _coerce(column: pd.Series, key: str, value: str):
    typ = FIELD_TYPES.get(key)
    if typ is bool or pd.api.types.is_bool_dtype(column):
        parsed = parse_bool(value)
        if parsed is not None:
            return parsed
        raise AnalysisError(f"--filter {key}={value}: {key} is true or false")
    if typ in (int, float) or pd.api.types.is_numeric_dtype(column):
        try:
            return (typ or float)(value)
        except ValueError:
            raise AnalysisError(f"--filter {key}={value}: {key} is a number") from None
    return value


def apply_filters(df: pd.DataFrame, filters: Iterable[str] | None) -> pd.DataFrame:
    """Keep rows matching every ``key=value``; a key given twice means either value."""
    wanted: dict[str, list[str]] = {}
    for item in filters or ():
        if "=" not in item:
            raise AnalysisError(f"--filter {item!r} must look like key=value, e.g. --filter train.lr=0.05")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in df.columns:
            raise AnalysisError(f"--filter: unknown key {key!r}; valid keys: {', '.join(map(str, df.columns))}")
        wanted.setdefault(key, []).append(value)
    out = df
    for key, values in wanted.items():
        keep = out[key].isin([_coerce(out[key], key, v) for v in values])
        if not keep.any():
            present = ", ".join(sorted({str(v) for v in out[key]}))
            raise AnalysisError(f"--filter {key}={'|'.join(values)} matches no run; values present: {present}")
        out = out[keep]
    out = out.reset_index(drop=True)
    out.attrs = dict(df.attrs)
    return out


@contextlib.contextmanager
def _no_progress_bars():
    """One tqdm bar per tiny JSON download buries the useful lines on stderr."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def metric_histories(uri: str, run_ids: Iterable[str], keys: Sequence[str]) -> pd.DataFrame:
    """Long form (run_id, epoch, key, value) of per-epoch ``trainer/<key>`` metrics of ``run_ids``."""
    client = store_client(uri)
    rows = [(run_id, m.step, key, m.value) for run_id in run_ids for key in keys
            for m in client.get_metric_history(run_id, TRAINER_PREFIX + key)]
    return pd.DataFrame(rows, columns=["run_id", "epoch", "key", "value"])


def layer_densities(uri: str, run_ids: Iterable[str],
                    artifact_uris: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """{run_id: {param name: kept fraction}} from each run's layer_density.json (runs without it are skipped).

    ``artifact_uris`` (run_id -> artifact root, ``load_runs`` keeps it in ``df.attrs``) saves the two
    ``get_run`` a download by run id makes: 2-3x the cost of reading the small file itself."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = store_client(uri)
    out: dict[str, dict[str, float]] = {}
    missing = 0
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bars():
        for run_id in run_ids:
            dst = os.path.join(tmp, run_id)
            os.makedirs(dst)
            try:
                if run_id in (artifact_uris or {}):
                    repo = get_artifact_repository(artifact_uris[run_id], tracking_uri=uri)
                    path = repo.download_artifacts(LAYER_DENSITY_ARTIFACT, dst)
                else:
                    path = client.download_artifacts(run_id, LAYER_DENSITY_ARTIFACT, dst)
            except Exception:  # noqa: BLE001 - MLflow raises different types per artifact store
                missing += 1
                continue
            with open(path) as f:
                out[run_id] = {k: float(v) for k, v in json.load(f).items()}
    if missing:
        log.warning("%d run(s) have no %s artifact; left out of the per-layer plot", missing, LAYER_DENSITY_ARTIFACT)
    return out
