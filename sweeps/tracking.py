"""MLflow: one run per trial (the store itself, experiments and reading runs back: ``runstore``).

Every trial (every copy of a packed trial, ``sweeps/trainable.py``) is one run:
params = the flat config (on a tracking server also ``claim.<n>``: ``claims.py``),
metrics ``epoch/<key>`` and ``trainer/<key>`` (step = global epoch),
``prune/<key>`` (step = pruning round) and ``final/<key>`` (once, at the end; ``runstore`` says why), tags
(run_key, sweep, cell, trial_id, provenance; ``pack_size`` for a copy of a packed trial, ``pretraining_shared_by``
for a run whose pre-training was trained once for several, ``sparse_core/prefix.py``) and ``layer_density.json``. A trial finds its run
by run_key (``TrialRun.open``, claims in ``claims.py``): a retried, resumed or re-run trial
continues it, so there is one run per run_key and no epoch is logged twice. When a run's rows reach the
store: ``sweeps/run_log.py`` (``RunLog``: few, large writes; a retry logs its checkpoint's missing epochs). On
a local runtime a trial buffers the same way and the driver writes its run (``sweeps/relay.py``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from runstore import (DEFAULT_TRACKING_URI, EPOCH_PREFIX, FINAL_FIELDS, FINAL_METRICS, PARENT_TAG,  # noqa: F401
                      PRUNE_PREFIX, TrackingError, check_reachable, client, experiment_id, final_fields,
                      final_metrics, final_record, load_runs, resolve_tracking_uri, search, sqlite_path,
                      unwritable)

from sparse_core.results import RunResult

from .claims import (OPEN_STATUSES, arbitrate, claim_alive, claim_generation, current_claim, runs_of_key, store_lock,
                     take, this_claim)
from .run_log import FLUSH_EVERY_S, RunLog  # noqa: F401 - FLUSH_EVERY_S: the flush policy's, read by its tests

EXPORT_ARTIFACT = "model.safetensors"  # a trial's compact model (sparse_core.export), with --export


# ---- provenance ----------------------------------------------------------------------------
def git_commit(repo_root: str | Path) -> str | None:
    """HEAD of the checkout at repo_root (suffix ``-dirty`` when tracked files differ), else
    ``$GIT_COMMIT`` (``ray job submit`` uploads no .git: pass it with --runtime-env-json), else None."""
    if not Path(repo_root, ".git").exists():
        return os.environ.get("GIT_COMMIT") or None
    try:
        head = subprocess.run(["git", "-C", str(repo_root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo_root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


# ---- write: one run per trial ----------------------------------------------------------------
def retry(fn, *args, attempts: int = 4, **kwargs):
    """SQLite allows one writer at a time; concurrent trials occasionally see 'database is locked'."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - MLflow wraps store errors in several types
            if i == attempts - 1 or "locked" not in str(e).lower():
                raise
            time.sleep(0.2 * 2 ** i)


def failure(error: BaseException) -> tuple[str, str]:
    """The status and ``error`` tag of a run that ends with ``error``: FAILED for an exception, KILLED
    when interrupted (Tune stopping a trial raises SystemExit in it)."""
    status = "FAILED" if isinstance(error, Exception) else "KILLED"
    reason = "stopped by Tune (scheduler or end of sweep)" if isinstance(error, SystemExit) else \
        f"{type(error).__name__}: {error}"
    return status, reason[:4000]


class TrialRun(RunLog):
    """The MLflow run of one trial, found by its run_key.

    ``open`` claims the run_key: a FINISHED run means nothing to train (``skip = "finished"``); a run
    whose claiming process is alive means another trial (another sweep on this store) trains it
    (``skip = "claimed"``). Otherwise the trial's own earlier run (a Ray retry, ``--resume``) or an
    orphan of the same run_key (its driver was killed; an interrupted sweep; a run that FAILED) is continued, with its
    ``retries`` tag counting the restarts, else a new run is created. On SQLite the check and the
    claim happen under ``store_lock``; on a tracking server the store arbitrates (``claims.take``,
    ``claims.arbitrate``: write-once ``claim.<n>`` params) and the loser skips. ``claim``: the process
    that trains the run (``claims.this_claim`` of the trial's process; default this process).
    """

    def __init__(self, uri: str, experiment_id: str, *, sweep: str, cell: str, flat: dict, run_key: str,
                 trial_id: str | None = None, tags: dict | None = None, claim: str | None = None,
                 parent_run_id: str | None = None):
        super().__init__(run_key)
        self.uri, self.experiment_id = uri, experiment_id
        self.sweep, self.cell, self.flat, self.trial_id = sweep, cell, flat, trial_id
        self.tags = dict(tags or {})
        if parent_run_id:
            self.tags[PARENT_TAG] = parent_run_id
        self.client = client(uri)
        self.reused = False
        self.other = None  # the run behind skip
        self._tags: dict = {}  # tags for the next write
        self._claim = claim or this_claim()

    def open(self, resumed_at_epoch: int | None = None) -> "TrialRun":
        with store_lock(self.uri) as locked:
            runs = retry(runs_of_key, self.client, self.experiment_id, self.run_key)
            done = [r for r in runs if r.info.status == "FINISHED"]
            if done:
                self.skip, self.other = "finished", done[-1]
                for r in runs:  # orphans beside it (duplicates left by older versions): not RUNNING forever
                    if r.info.status in OPEN_STATUSES and not claim_alive(r):
                        retry(self.client.set_tag, r.info.run_id, "superseded_by", done[-1].info.run_id)
                        retry(self.client.set_terminated, r.info.run_id, "KILLED")
                return self
            mine = [r for r in runs if self.trial_id and r.data.tags.get("trial_id") == self.trial_id]
            others = [r for r in runs if not (self.trial_id and r.data.tags.get("trial_id") == self.trial_id)]
            live = [r for r in others if current_claim(r)[0] != self._claim and claim_alive(r)]
            if live:
                self.skip, self.other = "claimed", live[0]
                return self
            # continue our own run, else the newest orphan (open, KILLED by an interrupted sweep, or FAILED:
            # a re-run continues it, from its checkpoint where it has one, rather than adding a second run)
            orphans = [r for r in others if r.info.status in OPEN_STATUSES + ("KILLED", "FAILED")]
            chosen = mine[-1] if mine else (orphans[-1] if orphans else None)
            if chosen is not None:
                if not (locked or self._take(chosen)):
                    return self
                self._reopen(chosen, resumed_at_epoch)
            else:
                self._create()
                if not (locked or self._arbitrate()):
                    return self
            for r in orphans + mine:
                if r.info.run_id != self.run_id and r.info.status in OPEN_STATUSES:  # never left RUNNING
                    retry(self.client.set_tag, r.info.run_id, "superseded_by", self.run_id)
                    retry(self.client.set_terminated, r.info.run_id, "KILLED")
        return self

    @property
    def other_id(self) -> str | None:
        """The run behind ``skip``: its id."""
        return self.other.info.run_id if self.other is not None else None

    @property
    def other_final(self) -> dict:
        """The run behind ``skip == "finished"``: its final metrics (``runstore.final_metrics``)."""
        return final_metrics(self.other.data.metrics, self.other.data.tags) if self.skip == "finished" else {}

    def _claim_tags(self) -> dict:
        return {"claimed_by": self._claim, "heartbeat": f"{time.time():.0f}"}

    def _create(self) -> None:
        from mlflow.entities import Param

        tags = {"run_key": self.run_key, "sweep": self.sweep, "cell": self.cell, **self.tags, **self._claim_tags()}
        if self.trial_id:
            tags["trial_id"] = self.trial_id
        name = f"{self.cell} d={self.flat['prune.density']:g} s={self.flat['seed']}"
        run = retry(self.client.create_run, self.experiment_id, tags={k: str(v) for k, v in tags.items()},
                    run_name=name)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in self.flat.items()]
        for i in range(0, len(params), 100):
            retry(self.client.log_batch, self.run_id, params=params[i:i + 100])

    def _reopen(self, existing, resumed_at_epoch: int | None) -> None:
        from mlflow.entities import RunTag

        self.run_id, self.reused = existing.info.run_id, True
        old = existing.data.tags
        self.checkpoint_dir = old.get("checkpoint_dir")
        tags = {**self._claim_tags(), "retries": str(int(old.get("retries", "0") or 0) + 1)}
        if self.trial_id:
            tags["trial_id"] = self.trial_id
        if PARENT_TAG in self.tags and PARENT_TAG not in old:  # a run from before sweeps had a run
            tags[PARENT_TAG] = self.tags[PARENT_TAG]
        if "error" in old:  # the error that made Ray retry: keep it, but not as 'error'
            tags["retried_after"] = old["error"]
        retry(self.client.log_batch, self.run_id, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
        if "error" in old:
            retry(self.client.delete_tag, self.run_id, "error")
        retry(self.client.update_run, self.run_id, status="RUNNING")
        history = self.client.get_metric_history
        self.logged_epoch = max((m.step for m in history(self.run_id, EPOCH_PREFIX + "test_acc")), default=0)
        self.logged_round = max((m.step for m in history(self.run_id, PRUNE_PREFIX + "test_acc")), default=0)
        self.resumed(resumed_at_epoch)

    def resumed(self, epoch: int | None) -> None:
        """Record that the trial continues after ``epoch`` (tag ``resumed_at_epoch``, a list)."""
        if epoch is None or self.run_id is None:
            return
        old = self.client.get_run(self.run_id).data.tags.get("resumed_at_epoch")
        retry(self.client.set_tag, self.run_id, "resumed_at_epoch", str(epoch) if not old else f"{old},{epoch}")

    def _take(self, run) -> bool:
        """Without a lock (a tracking server): take the run's next claim generation (``claims.take``);
        False, with ``skip = "claimed"``, when another trial took it first."""
        if retry(take, self.client, run.info.run_id, claim_generation(run) + 1, self._claim):
            return True
        self.skip, self.other = "claimed", run
        return False

    def _arbitrate(self) -> bool:
        """Without a lock, after creating a run: ``claims.arbitrate`` among the runs of this run_key
        created at the same moment. False when another creator wins: this run is deleted and
        ``skip = "claimed"`` (or ``"finished"`` if one finished meanwhile)."""
        runs = retry(runs_of_key, self.client, self.experiment_id, self.run_key)
        done = [r for r in runs if r.info.status == "FINISHED"]
        rival = done[-1] if done else retry(arbitrate, self.client, runs, self._claim)
        if rival is None:
            return True
        retry(self.client.delete_run, self.run_id)
        self.skip, self.other, self.run_id = "finished" if done else "claimed", rival, None
        return False

    def set_checkpoint_dir(self, location: str) -> None:
        """Where this trial's checkpoints are (tag ``checkpoint_dir``, with the next write): a later sweep
        continuing this run after its driver died starts from the newest of them."""
        if location != self.checkpoint_dir:
            self._tags["checkpoint_dir"] = location
            self.checkpoint_dir = location

    @staticmethod
    def trial_runs(c, experiment_id: str, trial_id: str, status: str = "RUNNING") -> list:
        """The runs of one Tune trial in ``status`` (a packed trial has one per copy)."""
        return c.search_runs([experiment_id], max_results=1000, filter_string=f"tags.trial_id = '{trial_id}' "
                                                                              f"and attributes.status = '{status}'")

    def flush(self) -> None:
        """Before a checkpoint: write what is buffered when ``due`` (else it waits for a later write)."""
        if self.due():
            self.write()

    def write(self, tags: dict | None = None) -> None:
        """Write the buffered metrics and tags, and ``tags``, with the first batch (nothing to write: no
        call): batches of 1,000 entities, metrics and tags together (MLflow's client splits larger calls)."""
        from mlflow.entities import Metric, RunTag

        if not (self._pending or tags or self._tags):
            return
        beat = {"heartbeat": f"{time.time():.0f}"}  # keeps this run's claim live (see claim_alive)
        tags, self._tags = {**beat, **self._tags, **(tags or {})}, {}
        batch_tags = [RunTag(k, str(v)) for k, v in tags.items()]
        while self._pending or batch_tags:
            batch = [Metric(*m) for m in self._pending[:1000 - len(batch_tags)]]
            retry(self.client.log_batch, self.run_id, metrics=batch, tags=batch_tags)
            del self._pending[:len(batch)]
            batch_tags = []
        self.wrote()

    def finish(self, result: RunResult | dict) -> None:
        """The run's result (a ``RunResult``, or ``train.run``'s dict of one): ``write_final``."""
        self.write_final(final_fields(result))

    def write_final(self, fields: dict) -> None:
        """A result's ``final_fields``: its metrics and tags (``final_record``; the metrics charted in a
        section after the per-epoch curves, step = training epochs), the layer densities; the run ends
        FINISHED."""
        metrics, tags = final_record(fields)
        self._log(metrics, fields["epochs"])
        self.write(tags)  # with the final metrics: one store call, not four
        retry(self.client.log_dict, self.run_id, fields["layer_density"], "layer_density.json")
        retry(self.client.set_terminated, self.run_id, "FINISHED")

    def log_export(self, path: str) -> None:
        """The trial's exported model file, as the artifact ``EXPORT_ARTIFACT``."""
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            shutil.copyfile(path, os.path.join(d, EXPORT_ARTIFACT))
            retry(self.client.log_artifact, self.run_id, os.path.join(d, EXPORT_ARTIFACT))

    def fail(self, error: BaseException) -> None:
        """Mark the run FAILED (an exception) or KILLED (interrupted); never leave it RUNNING."""
        self.end_failed(*failure(error))

    def end_failed(self, status: str, reason: str) -> None:
        """``fail`` with the status and reason made (``failure``)."""
        if self.run_id is None:
            return
        try:
            self.write()  # the epochs before the error belong to the run (and a retry skips them)
            retry(self.client.set_tag, self.run_id, "error", reason)
            retry(self.client.set_terminated, self.run_id, status)
        except Exception:  # noqa: BLE001 - the original error matters more than this one
            pass


def close_unfinished(uri: str, experiment_id: str, trial_ids: Iterable[str], status: str, reason: str) -> int:
    """Set runs of these trials (every copy of a packed one) that are still RUNNING to ``status`` (from
    the driver)."""
    c = client(uri)
    n = 0
    for tid in trial_ids:
        for run in TrialRun.trial_runs(c, experiment_id, tid):
            for attempt in range(3):
                try:
                    retry(c.set_tag, run.info.run_id, "error", reason)
                    retry(c.set_terminated, run.info.run_id, status)
                    n += 1
                    break
                except Exception as e:  # noqa: BLE001 - e.g. the trial's own process tags it at the same moment
                    if attempt == 2:  # left RUNNING: an orphan, which the next sweep of its run_key continues
                        logging.getLogger(__name__).warning("could not close run %s: %s", run.info.run_id, e)
                    time.sleep(0.5)
    return n


# ---- read (the rest is in runstore) -------------------------------------------------------
def finished_by_run_key(uri: str, experiment: str) -> dict[str, Any]:
    """run_key -> the latest FINISHED run with that key (the idempotency check of a sweep)."""
    out: dict[str, Any] = {}
    for run in search(uri, experiment, "attributes.status = 'FINISHED'"):
        key = run.data.tags.get("run_key")
        if key and (key not in out or run.info.end_time > out[key].info.end_time):
            out[key] = run
    return out
