"""A study's experiments: found or made (artifacts beside a SQLite store), tagged for the UI's training view."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .store import TrackingError, client, sqlite_path
from .ui import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, GENAI_KINDS, VIEW_TAG, group_id, study_view


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
