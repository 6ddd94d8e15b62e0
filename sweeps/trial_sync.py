"""What a Tune trial tells Tune: its reports and its checkpoints (``sweeps/trainable.py`` claims the runs,
trains and finishes them; this module owns what goes to Tune meanwhile).

Every Tune trial is a pack of copies (``sweeps/packing.py``; a single trial is a pack of one), each copy
its own MLflow run. ``Copy`` is one copy's plan position and newest snapshot, ``TrialSync`` the log
callbacks of the copies that train with the trial's Tune reports and checkpoints, ``final_report`` its
last report. The checkpoint files: ``state_<run_key>.pt`` per copy (``copy_file``; ``state.pt``,
``CHECKPOINT_FILE``, in a checkpoint of the single-trial shape of earlier versions, still resumed),
found by ``newest_state`` next to Tune's checkpoint or in the trial dir a run records, written by
``write_checkpoint`` (with an injectable full disk).

The subtle point is the checkpoint. One Tune checkpoint holds every copy's state, and no state may
be newer than the epochs already written to its run (a retry never logs a step before its state
again). So when a checkpoint is due (a stage end, or ``CHECKPOINT_EVERY_S`` since the last), each
copy snapshots its own state inside its own log call (serialised at once, since the trainer moves
on), and the checkpoint is written when every running copy has one, or when a copy that has one
logs its next step (a copy that failed alone, or waits at another plan position, keeps its older
snapshot). Each checkpoint costs a ``torch.save``, a copy into Tune's storage and an experiment-state
snapshot on the driver (and the MLflow write of the buffered epochs before it); done every epoch they
doubled the time of a digits-MLP trial (benchmarks/sweep_efficiency.py), so inside a stage they are at
least ``CHECKPOINT_EVERY_S`` apart (a crash loses at most that much work). Tune sees pack-level
reports: the mean of the copies' values (for a pack of one, that copy's) and the slowest copy's epoch,
every step unless ``meta["report_every_s"]`` asks for at most one report per that many seconds between
checkpoints (each waits for the driver to take it, ~8 ms here; a scheduler such as ASHA needs every
epoch, ablation grids use 1 s).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import math
import os
import posixpath
import re
import statistics
import tempfile
import time

import torch
from ray import tune

from sparse_core.checkpoint import CheckpointError, load_state
from sparse_core.plan import build as build_plan
from sparse_core.results import RunResult, StepEvent
from sparse_core.train import total_epochs

CHECKPOINT_FILE = "state.pt"
# Scalars passed to Tune (schedulers, searchers, progress); MLflow gets every metric.
REPORTED = ("val_acc", "val_loss", "test_acc", "test_loss", "train_loss", "density", "seconds")
CHECKPOINT_EVERY_S = 10.0  # wall seconds between checkpoints inside a stage (stage ends always checkpoint)
# TESTING ONLY: "N" makes every checkpoint write from a trial process's Nth on fail as on a full disk (ENOSPC).
FAULT_ENOSPC_ENV = "SWEEPS_FAULT_ENOSPC_AT"
_checkpoint_writes = 0


def write_checkpoint(path: str, state: dict | None = None, data: bytes | None = None) -> None:
    """A trial's checkpoint file: ``state`` (``torch.save``d) or its bytes already serialised."""
    global _checkpoint_writes
    _checkpoint_writes += 1
    at = os.environ.get(FAULT_ENOSPC_ENV)
    if at and _checkpoint_writes >= int(at):
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {FAULT_ENOSPC_ENV})", path)
    if data is None:
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            f.write(data)


def location(checkpoint: tune.Checkpoint) -> str:
    """The trial dir holding ``checkpoint``, as a path or URI that ``pyarrow.fs`` opens again."""
    parent = posixpath.dirname(checkpoint.path.rstrip("/"))
    kind = checkpoint.filesystem.type_name
    return parent if kind == "local" else f"{kind}://{parent}"


def copy_file(key: str) -> str:
    """The checkpoint file of one copy of a packed trial (``state_<run_key>.pt``)."""
    return f"state_{key}.pt"


def newest_state(checkpoint: tune.Checkpoint | None, run_dir: str | None, key: str, cfg=None) -> dict | None:
    """The newest loadable trainer state of run_key ``key`` among the checkpoints next to Tune's
    ``checkpoint`` and in ``run_dir`` (the trial dir recorded in the MLflow run this trial continues):
    in a checkpoint dir its own ``state_<key>.pt``, else a ``state.pt`` (the single-trial shape of
    earlier versions, whose checkpoints held one run's state).

    Tune's own pick can be stale: a driver killed between two snapshots of its experiment state
    restores a trial from an older checkpoint (or from one already deleted) though newer ones exist.
    A damaged checkpoint (the crash hit its copy), or with ``cfg`` one whose content is not a state of
    ``cfg``'s run (``sparse_core.checkpoint.check_state``), is passed over; if none loads, the trial
    fails with the loader's one-line reason rather than silently starting again.
    """
    import pyarrow.fs as pafs

    names = (copy_file(key), CHECKPOINT_FILE)
    places = [location(checkpoint)] if checkpoint is not None else []
    places += [run_dir] if run_dir and run_dir not in places else []
    found = []  # (mtime, dir name, filesystem, dir path, file name)
    for place in places:
        try:
            fs, base = pafs.FileSystem.from_uri(place)
            for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
                if info.type == pafs.FileType.Directory and re.fullmatch(r"checkpoint_\d+", info.base_name):
                    for name in names:
                        state_file = fs.get_file_info(f"{info.path}/{name}")
                        if state_file.type == pafs.FileType.File:
                            found.append((state_file.mtime_ns or 0, info.base_name, fs, info.path, name))
                            break
        except (OSError, ValueError, pafs.ArrowException) as e:  # e.g. the old trial dir is gone
            logging.getLogger(__name__).warning("cannot list checkpoints in %s: %s", place, e)
    if not found and checkpoint is not None:  # Tune's checkpoint outside a trial dir's checkpoint_N layout
        fs = checkpoint.filesystem
        there = [n for n in names if fs.get_file_info(f"{checkpoint.path}/{n}").type == pafs.FileType.File]
        if there:
            found.append((0, "", fs, checkpoint.path, there[0]))
    errors = []
    for _, _, fs, path, name in sorted(found, key=lambda f: f[:2], reverse=True):
        try:
            with tune.Checkpoint(path, filesystem=fs).as_directory() as d:
                return load_state(os.path.join(d, name), cfg)
        except (CheckpointError, OSError) as e:
            logging.getLogger(__name__).warning("skipping checkpoint %s: %s", path, e)
            errors.append(e)
    if errors:
        raise CheckpointError(f"no usable checkpoint for this trial: {errors[0]}")
    return None


class Copy:
    """One config of the pack: its MLflow run, plan position and newest snapshot."""

    def __init__(self, cell: str, cfg, mlrun):
        self.cell, self.cfg, self.mlrun, self.key = cell, cfg, mlrun, mlrun.run_key
        self.steps, self.epochs = len(build_plan(cfg)), total_epochs(cfg)
        self.pos = self.epoch = 0  # plan steps done, training epochs done
        self.stage = ""
        self.started = False  # has logged a step in this process
        self.snapshot: bytes | None = None  # serialised state, never newer than the epochs written to the run
        self.snapped = False  # a snapshot was taken since the checkpoint became due
        self.report: dict = {}  # the latest values for Tune
        self.state: dict | None = None
        self.result: RunResult | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.pos >= self.steps

    def snap(self, state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        self.snapshot, self.snapped = buf.getvalue(), True


def mean(values) -> float:
    """The mean of the finite numbers among ``values`` (NaN if none)."""
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def reported(event: StepEvent) -> dict:
    """The scalars of one step that Tune gets: a training epoch's ``REPORTED`` values, or a pruning
    round's accuracies after pruning."""
    if event.stage == "prune":
        return {"val_acc": event.val_acc_after_prune, "test_acc": event.test_acc_after_prune,
                "density": event.density, "seconds": event.seconds}
    return {k: getattr(event, k) for k in REPORTED if getattr(event, k) is not None}


class TrialSync:
    """The log callbacks of the copies that train, and the trial's Tune reports and checkpoints."""

    def __init__(self, copies: list[Copy], report_every_s: float):
        self.copies, self.report_every_s = copies, report_every_s
        self.due = False
        self.last_sync = self.last_report = time.monotonic()

    def log_for(self, c: Copy):
        return lambda metrics, checkpoint: self._log(c, metrics, checkpoint)

    def _log(self, c: Copy, metrics: dict, checkpoint) -> None:
        event = StepEvent.from_dict(metrics)
        c.mlrun.log_step(event)
        c.pos += 1
        c.started = True
        again = c.snapped  # a step after this copy's snapshot for the due checkpoint: do not wait for the rest
        if event.stage == "rigl_init" or (event.stage == "prune" and not event.last_prune):
            return  # cheap steps: not worth a report each (SynFlow has 100 rounds)
        if event.is_epoch:
            c.epoch = event.epoch
        c.report, c.stage = reported(event), event.stage
        now = time.monotonic()
        if event.stage_end or now - self.last_sync >= CHECKPOINT_EVERY_S:
            self.due = True
        if (self.due or c.done) and checkpoint is not None:  # the final state too: a retry must not train it again
            c.snap(checkpoint())  # (None: an epoch of a shared pre-training, handed over without its state)
        waiting = [x for x in self.copies if x.started and not x.done and x.error is None]
        if self.due and (again or all(x.snapped for x in waiting)):
            self.checkpoint()
        elif now - self.last_report >= self.report_every_s:
            tune.report(self.report())
            self.last_report = now

    def report(self) -> dict:
        live = [c for c in self.copies if c.error is None]
        out = {k: mean(c.report.get(k) for c in live) for k in REPORTED}
        slowest = min(live, key=lambda c: c.epoch, default=None)
        out.update(epoch=slowest.epoch if slowest else 0, epochs=max((c.epochs for c in self.copies), default=0),
                   stage=slowest.stage if slowest else "", copies=len(self.copies))
        return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}

    def checkpoint(self) -> None:
        """Every copy's buffered epochs to its run, then one Tune checkpoint with every copy's snapshot."""
        for c in self.copies:
            if c.error is None:
                c.mlrun.flush()  # before the checkpoint: a retry from it finds these epochs in the run
        with tempfile.TemporaryDirectory() as d:
            for c in self.copies:
                if c.snapshot is not None:
                    write_checkpoint(os.path.join(d, copy_file(c.key)), data=c.snapshot)
            tune.report(self.report(), checkpoint=tune.Checkpoint.from_directory(d))
        saved = tune.get_checkpoint()  # the persisted copy: its trial dir goes into each copy's run, once
        for c in self.copies:
            c.snapped = False
            # only where the copy's state is in it: an epoch of a shared pre-training has none of its own yet
            if saved is not None and c.error is None and c.snapshot is not None:
                c.mlrun.set_checkpoint_dir(location(saved))
        self.due = False
        self.last_sync = self.last_report = time.monotonic()


def outcome(c: Copy) -> dict:
    """One copy's outcome for the driver (``Progress``, the sweep's counts)."""
    row = {"cell": c.cell, "density": c.cfg.prune.density, "seed": c.cfg.seed, "run_key": c.key}
    if c.mlrun.skip:
        metrics = c.mlrun.other_final
        row.update(status="skipped", skipped=c.mlrun.skip, mlflow_run_id=c.mlrun.other_id,
                   val_acc=metrics.get("val_acc", math.nan), test_acc=metrics.get("test_acc", math.nan))
    elif c.result is None:
        row.update(status="failed", mlflow_run_id=c.mlrun.run_id,
                   error=f"{type(c.error).__name__}: {c.error}"[:300])
    else:
        r = c.result
        row.update(status="finished", mlflow_run_id=c.mlrun.run_id, val_acc=r.val_acc, test_acc=r.test_acc,
                   best_val_acc=r.best_val_acc, density_achieved=r.density, seconds=r.seconds,
                   n_collapsed_layers=r.n_collapsed_layers)
    return row


def final_report(copies: list[Copy]) -> dict:
    """A trial's last report: its copies' outcomes (``runs``, JSON), their counts, and the mean validation
    and test accuracy of the copies with a result (for a pack of one, that copy's: what a searcher reads)."""
    rows = [outcome(c) for c in copies]
    scored = [r for r in rows if r["status"] == "finished" or r.get("skipped") == "finished"]
    epochs = max(c.epochs for c in copies)
    return {"final": 1, "copies": len(rows), "stage": "final", "epoch": epochs, "epochs": epochs,
            "finished_copies": sum(r["status"] == "finished" for r in rows),
            "skipped_copies": sum(r["status"] == "skipped" for r in rows),
            "failed_copies": sum(r["status"] == "failed" for r in rows),
            "val_acc": mean(r["val_acc"] for r in scored), "test_acc": mean(r["test_acc"] for r in scored),
            "runs": json.dumps(rows)}
