"""The sweep's own MLflow run: the parent of its trials' runs (MLflow's convention for tuning).

One parent per sweep name and experiment, found by its tags (``role=sweep``, ``sweep=<name>``): a
re-run, ``--resume`` or a sweep adding a density reopens it, so every trial run of the sweep is its
child (tag ``mlflow.parentRunId``, set by ``tracking.TrialRun`` from the id the driver gives it; on a
local runtime the relay's ``Scope`` holds it, so a trial cannot choose another). The parent holds
the sweep's invocation (``sweep.json``, and its settings as tags), and at the end its counts, its
summary (``summary.txt`` and the run's description) and the report's files (``report/``).
Which runs exist and which train is unchanged: that is ``tracking.TrialRun.open``'s (one FINISHED
run per run_key, ``claims.py``).
"""

from __future__ import annotations

import os
import time

from runstore import ROLE_TAG, SWEEP_ROLE, add_members, collapse_groups, parents

from .claims import store_lock
from .tracking import retry, client

NOTE_TAG = "mlflow.note.content"  # the run's description on its page (Markdown)


def open_parent(uri: str, experiment_id: str, sweep: str, settings: dict, groups=(), run_keys=()) -> str:
    """The run id of ``sweep``'s parent run, created on its first run and reopened (RUNNING) after;
    ``settings`` (the invocation: preset, design, cells, densities, seeds, overrides) go to
    ``sweep.json`` and, short, to tags. ``groups``: the sweep's (cell, density) pairs, shown as one
    averaged row each in the experiment's runs-table view (``runstore.collapse_groups``). ``run_keys``: the
    invocation's trials, added to the sweep's members (``runstore.members``: a trial skipped because another
    sweep finished its run still belongs to this one), under the store's lock where there is one."""
    c = client(uri)
    with store_lock(uri) as locked:
        runs = retry(parents, c, [experiment_id], sweep)
        if runs:
            run_id = runs[0].info.run_id
            retry(c.update_run, run_id, status="RUNNING")
        else:
            run_id = retry(c.create_run, experiment_id, run_name=f"sweep {sweep}",
                           tags={ROLE_TAG: SWEEP_ROLE, "sweep": sweep}).info.run_id
            if not locked:  # a tracking server: two drivers may create one each at once; the oldest wins
                runs = retry(parents, c, [experiment_id], sweep)
                if runs[0].info.run_id != run_id:
                    retry(c.delete_run, run_id)
                    run_id = runs[0].info.run_id
        if run_keys:  # read, merge, write: under the lock, so two drivers of one sweep keep each other's keys
            retry(add_members, c, run_id, run_keys)
    from mlflow.entities import RunTag

    shown = {f"sweep.{k}": str(v)[:500] for k, v in settings.items()}
    retry(c.log_batch, run_id, tags=[RunTag(k, v) for k, v in shown.items()])
    retry(c.log_dict, run_id, {"sweep": sweep, **settings, "started": time.strftime("%Y-%m-%d %H:%M:%S")},
          "sweep.json")
    if groups:
        collapse_groups(uri, experiment_id, groups)
    return run_id


def close_parent(uri: str, run_id: str, counts: dict, summary: list[str], report: str | None,
                 failed: bool) -> None:
    """The sweep's end on its parent run: ``counts`` as metrics ``sweep/<key>``, the summary lines as
    ``summary.txt`` and the run's description, the report folder's files under ``report/``; FINISHED,
    or FAILED when ``failed`` (a trial failed or is unfinished)."""
    from mlflow.entities import Metric

    c = client(uri)
    now = int(time.time() * 1000)
    metrics = [Metric(f"sweep/{k}", float(v), now, 0) for k, v in counts.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    text = "\n".join(summary)
    note = "```\n" + text + "\n```" + (f"\n\nReport: artifacts `report/index.html`" if report else "")
    retry(c.log_batch, run_id, metrics=metrics)
    retry(c.set_tag, run_id, NOTE_TAG, note[:60000])
    retry(c.log_text, run_id, text + "\n", "summary.txt")
    if report and os.path.isdir(report):
        retry(c.log_artifacts, run_id, report, "report")
    retry(c.set_terminated, run_id, "FAILED" if failed else "FINISHED")
