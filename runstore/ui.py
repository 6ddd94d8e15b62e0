"""How MLflow's UI opens a study: the experiment kind, the runs-table view (grouped by cell and density)
and the link.

MLflow's UI (3.17, 3.18) opens an experiment on its GenAI overview unless told otherwise: its experiment page
takes the kind from the workflow switch (``?workflowType=`` in the URL, else the browser's saved choice,
which defaults to ``genai``), and the experiment tag ``mlflow.experimentKind`` is what the UI's kind
selector writes and reads. Every experiment made or written to here carries ``custom_model_development``
and every link we print carries ``workflowType=machine_learning``, plus ``viewStateShareKey=study``: a
view of the runs table stored as the experiment tag ``mlflow.sharedViewState.study``, which is how the
UI's "share view" works: runs grouped by cell and density (``GROUP_BY``, the seeds averaged), a sweep's
groups collapsed (``experiments.collapse_groups``), best validation accuracy first.
"""

from __future__ import annotations

import json
import socket
from typing import Iterable

from .store import sqlite_path

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


def free_port(preferred: int = 5000) -> int:
    """``preferred`` if nothing listens on 127.0.0.1 there now, else a port the OS says is free."""
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
