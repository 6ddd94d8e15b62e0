"""Which runs belong to a sweep: the run_keys of its trials, recorded on its parent run.

A sweep skips a trial whose run_key another sweep has FINISHED and counts that run as its own (one FINISHED run
per run_key, whichever sweep trained it), so the sweep's tag on a run names only the sweep that trained it. The
sweep's parent run (tags ``role=sweep``, ``sweep=<name>``) therefore keeps ``trials.json``: the run_keys of every
trial any invocation of the sweep has covered (a re-run adding densities adds its keys). A reader takes a sweep's
runs as those tagged with its name or whose run_key is listed there (``analysis.load.apply_filters``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Iterable

from .names import ROLE_TAG, SWEEP_ROLE
from .rows import search_ids
from .store import no_progress_bars

MEMBERS_ARTIFACT = "trials.json"  # {"run_keys": [...]} on a sweep's parent run
_RUN_KEY = re.compile(r"[0-9a-f]{12}")  # sparse_core.config.run_key: 12 hex chars


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def parents(client, experiment_ids: Iterable[str], sweep: str) -> list:
    """The parent runs of ``sweep`` in these experiments, oldest first."""
    runs = search_ids(client, list(experiment_ids),
                      f"tags.{ROLE_TAG} = '{SWEEP_ROLE}' and tags.sweep = '{_quoted(sweep)}'")
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def read_members(client, run_id: str) -> set[str]:
    """The run_keys listed on parent run ``run_id`` (empty if it has no list); anything but a list of run_keys in
    the file is refused (it is read from a store others write to). A list that exists but cannot be read raises
    (MLflow's error): ``add_members`` must never take an unreadable list for an empty one and write over it."""
    if MEMBERS_ARTIFACT not in {a.path for a in client.list_artifacts(run_id)}:
        return set()
    with tempfile.TemporaryDirectory() as tmp, no_progress_bars():
        path = client.download_artifacts(run_id, MEMBERS_ARTIFACT, tmp)
        if os.path.getsize(path) > 16 * 2**20:
            raise ValueError(f"{MEMBERS_ARTIFACT} of sweep run {run_id} is over 16 MiB: not a list of run_keys")
        with open(path) as f:
            data = json.load(f)
    keys = data.get("run_keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not all(isinstance(k, str) and _RUN_KEY.fullmatch(k) for k in keys):
        raise ValueError(f"{MEMBERS_ARTIFACT} of sweep run {run_id} is not {{\"run_keys\": [12-hex-char keys]}}")
    return set(keys)


def add_members(client, run_id: str, run_keys: Iterable[str]) -> set[str]:
    """List ``run_keys`` on parent run ``run_id`` beside those listed already; returns the whole list."""
    keys = read_members(client, run_id) | set(run_keys)
    client.log_dict(run_id, {"run_keys": sorted(keys)}, MEMBERS_ARTIFACT)
    return keys


def members(client, experiment_ids: Iterable[str], sweeps: Iterable[str]) -> set[str]:
    """Every run_key the parent runs of ``sweeps`` list, in these experiments."""
    ids = list(experiment_ids)
    return {key for sweep in sweeps for run in parents(client, ids, sweep) for key in read_members(client, run.info.run_id)}
