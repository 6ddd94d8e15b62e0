"""The MLflow store of a study: where it is, its experiments, and reading runs back.

Shared by ``sweeps`` (which writes one run per trial) and ``analysis`` (which reads them); it
imports neither, nor Ray. Its parts, each a leaf or over the ones before it:

- ``names``: what a run's data is called (``epoch/``, ``final/``, ``prune/``, ``trainer/`` keys, tags, params);
- ``store``: the tracking URI, whether the store can be used, a client (SQLite in WAL mode);
- ``process``: the processes that claim a run (``host/pid/start``);
- ``ui``: how MLflow's UI opens a study (experiment kind, the runs-table view, the link);
- ``experiments``: a study's experiments, found or made, tagged for that view;
- ``records``: a run's metrics and tags, derived from the typed step events and results it logs;
- ``rows``: reading runs back as typed configs, results and flat rows;
- ``members``: which runs belong to a sweep (the run_keys its parent run lists, whichever sweep trained them).

Every public name is also here, so ``runstore.X`` is all a reader needs.
"""

from __future__ import annotations

from .experiments import collapse_groups, experiment_id, mark_training_experiment
from .names import (BASELINE_ROLE, CLAIM_PARAM, CURVES, EPOCH_PREFIX, FINAL_AS_METRICS, FINAL_PREFIX, PARENT_TAG, PRUNE_PREFIX,
                    METHOD_ROLE, ROLE_TAG, SEARCH_CELL, SWEEP_ROLE, TRAINER_PREFIX)
from .records import FINAL_FIELDS, FINAL_METRICS, NOT_LOGGED, final_fields, final_record, finite, step_metrics
from .process import claim_alive_here, proc_start, this_claim
from .members import MEMBERS_ARTIFACT, add_members, members, parents, read_members
from .rows import RUN_TAGS, final_metrics, load_runs, run_row, run_rows, search, search_ids, typed_config
from .store import (DEFAULT_TRACKING_URI, QUICK_CHECK_MAX_BYTES, TrackingError, check_reachable, client,
                    no_progress_bars, resolve_tracking_uri, sqlite_path, sqlite_problem, tune_sqlite, unwritable)
from .ui import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, GENAI_KINDS, GROUP_BY, STUDY_VIEW, UI_QUERY, VIEW_TAG, free_port,
                 group_id, study_view, ui_link)

__all__ = [
    "BASELINE_ROLE", "CLAIM_PARAM", "CURVES", "DEFAULT_TRACKING_URI", "EPOCH_PREFIX", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG",
    "FINAL_AS_METRICS", "FINAL_FIELDS", "FINAL_METRICS", "FINAL_PREFIX", "GENAI_KINDS", "GROUP_BY", "METHOD_ROLE", "NOT_LOGGED",
    "PARENT_TAG", "PRUNE_PREFIX",
    "QUICK_CHECK_MAX_BYTES", "ROLE_TAG", "RUN_TAGS", "SEARCH_CELL", "STUDY_VIEW", "SWEEP_ROLE", "TRAINER_PREFIX",
    "TrackingError", "UI_QUERY", "VIEW_TAG", "check_reachable", "claim_alive_here", "client", "collapse_groups",
    "experiment_id", "final_fields", "final_metrics", "final_record", "finite", "free_port", "group_id", "load_runs", "mark_training_experiment", "proc_start",
    "resolve_tracking_uri", "run_row", "run_rows", "search", "search_ids", "sqlite_path", "sqlite_problem",
    "step_metrics", "study_view", "this_claim", "tune_sqlite", "typed_config", "ui_link", "unwritable",
]
