"""Read sweep runs from MLflow into one typed DataFrame (one row per run).

Columns: every flat config key of ``sparse_core`` (typed by ``from_flat``, so ``prune.density`` is a
float and ``post.soft_skip`` a bool), the final metrics (``final/test_acc`` read as ``test_acc``; runs
logged before the prefix read the same, see ``runstore``), the tags
``cell``, ``run_key``, ``sweep``, ``role`` (``analysis.table.baseline_rule``), ``collapsed_layers``, and
``run_id``, ``experiment``, ``status``.
The subtle point: runs that are not FINISHED (a FAILED trial, a RUNNING one mid-sweep) would bias a
mean, so they are left out by default and the count per status is logged, never dropped silently;
so are the runs of Optuna searches (cell ``optuna``: their tuned knobs differ from run to run) unless
``include_search``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from typing import Iterable, Sequence

import pandas as pd
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from runstore import RUN_TAGS, SEARCH_CELL, TRAINER_PREFIX, members, run_rows, search_ids
from runstore import client as store_client
from runstore import no_progress_bars
from sparse_core.config import FIELD_TYPES, parse_bool

log = logging.getLogger("analysis")

TAGS = RUN_TAGS  # the tags a row carries (runstore.run_row)
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
    wanted = {s.upper() for s in statuses}
    left_out: Counter = Counter()
    extra_keys: set[str] = set()
    skip = {ANALYSIS_CELL: None}  # the report's own run: not a trial, and not worth a message
    if not include_search:
        skip[SEARCH_CELL] = f"Optuna search runs (cell {SEARCH_CELL!r}; --include-search to use them)"
    found = run_rows(search_ids(client, ids.values(), order_by=["attributes.start_time DESC"]), wanted, skip,
                     newest_per_key=True, left_out=left_out, extra_keys=extra_keys)
    rows = [{**{k: v for k, v in row.items() if k not in ("status", "start_time")},
             "cell": row["cell"] or "(no cell tag)", "experiment": names[run.info.experiment_id],
             "status": row["status"], "start_time": row["start_time"]} for run, row in found]
    artifact_uris = {run.info.run_id: run.info.artifact_uri for run, _ in found}
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


def sweep_members(df: pd.DataFrame, sweeps: Sequence[str]) -> set[str]:
    """The run_keys the parent runs of ``sweeps`` list (``runstore.members``), in ``df``'s store and experiments."""
    uri = df.attrs.get("tracking_uri")
    if uri is None:
        return set()
    client = store_client(uri)
    try:
        return members(client, experiment_ids(client, df.attrs.get("experiments", [])).values(), sweeps)
    except ValueError as e:  # a malformed members file: say which, do not guess
        raise AnalysisError(str(e)) from e


def apply_filters(df: pd.DataFrame, filters: Iterable[str] | None) -> pd.DataFrame:
    """Keep rows matching every ``key=value``; a key given twice means either value. ``sweep=<name>`` keeps the
    sweep's runs: those it trained (tag ``sweep``) and those it found FINISHED by another sweep and counted as its
    own (the run_keys its parent run lists, ``runstore.members``)."""
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
        if key == "sweep" and "run_key" in out.columns:
            keep |= out["run_key"].isin(sweep_members(df, values))
        if not keep.any():
            present = ", ".join(sorted({str(v) for v in out[key]}))
            raise AnalysisError(f"--filter {key}={'|'.join(values)} matches no run; values present: {present}")
        out = out[keep]
    out = out.reset_index(drop=True)
    out.attrs = dict(df.attrs)
    return out


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
    with tempfile.TemporaryDirectory() as tmp, no_progress_bars():
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
