"""A packed Tune trial: several configs trained together by ``sparse_core.runner.run_packed``, each
copy its own MLflow run (``sweeps/packing.py`` forms the packs; ``sweeps/trainable.py`` dispatches here).

Config ``{"trials": [{"cell", "flat"}, ...], "meta": {...}}``. Per copy, exactly as a single trial:
its run_key's run is claimed (``tracking.TrialRun.open``: a copy whose run_key is FINISHED or claimed
by a live trial is skipped, the others train), continued from its newest checkpoint
(``state_<run_key>.pt`` in this trial's checkpoints, or in the trial dir its run records, where a
single trial's ``state.pt`` also counts), logged step by step, finished with its own final metrics,
tags and artifacts. A copy that fails alone (``run_packed`` returns its exception, e.g. a diverged
loss) ends FAILED at once while the others carry on: such a failure repeats on a retry. Anything that
ends the whole pack (a crash, ``train.fail_at_epoch``) fails every unfinished copy's run, and Tune's
retry continues each copy from its own checkpoint (``retries``, ``resumed_at_epoch`` per run).
Copies that share a pre-training (``sparse_core/prefix.py``: e.g. several cells of one seed) get
its epochs logged when it ends, without a state: their first snapshot is one of their own steps.

The subtle point is the checkpoint. One Tune checkpoint holds every copy's state, and no state may
be newer than the epochs already logged to its run (a retry never logs a step before its state
again; it logs those of the state's epochs that never reached the store: ``tracking.RunLog.restore``).
So when a checkpoint is due (a stage end, or ``CHECKPOINT_EVERY_S`` since the last), each copy snapshots
its own state inside its own log call (serialised at once, since the trainer moves on), and the checkpoint is written when every running copy has one, or when a copy that has one
logs its next step (a copy that failed alone, or waits at another plan position, keeps its older
snapshot). Tune sees pack-level reports: the mean of the copies' values and the slowest copy's epoch.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import tempfile
import time

import torch
from ray import tune

from sparse_core.checkpoint import CheckpointError
from sparse_core.config import from_flat, run_key, to_flat
from sparse_core.plan import build as build_plan
from sparse_core.train import total_epochs

from . import relay, tracking
from .trial_state import (CHECKPOINT_EVERY_S, CHECKPOINT_FILE, REPORTED, copy_file, location, newest_state, setup,
                          write_checkpoint)


class _Copy:
    """One config of the pack: its MLflow run, plan position and newest snapshot."""

    def __init__(self, cell: str, cfg, mlrun: tracking.RunLog):
        self.cell, self.cfg, self.mlrun, self.key = cell, cfg, mlrun, mlrun.run_key
        self.steps, self.epochs = len(build_plan(cfg)), total_epochs(cfg)
        self.pos = self.epoch = 0  # plan steps done, training epochs done
        self.stage = ""
        self.started = False  # has logged a step in this process
        self.snapshot: bytes | None = None  # serialised state, never newer than the epochs logged to the run
        self.snapped = False  # a snapshot was taken since the checkpoint became due
        self.report: dict = {}  # the latest values for Tune
        self.state: dict | None = None
        self.result: dict | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.pos >= self.steps

    def snap(self, state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        self.snapshot, self.snapped = buf.getvalue(), True


def _mean(values) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


class _Pack:
    """The log callbacks of the copies that train, and the pack's Tune reports and checkpoints."""

    def __init__(self, copies: list[_Copy], report_every_s: float):
        self.copies, self.report_every_s = copies, report_every_s
        self.due = False
        self.last_sync = self.last_report = time.monotonic()

    def log_for(self, c: _Copy):
        return lambda metrics, checkpoint: self._log(c, metrics, checkpoint)

    def _log(self, c: _Copy, metrics: dict, checkpoint) -> None:
        c.mlrun.log_step(metrics)
        c.pos += 1
        c.started = True
        again = c.snapped  # a step after this copy's snapshot for the due checkpoint: do not wait for the rest
        stage = metrics["stage"]
        if stage == "rigl_init" or (stage == "prune" and not metrics["last_prune"]):
            return  # cheap steps: not worth a report each (SynFlow has 100 rounds)
        if stage == "prune":
            c.report = {"val_acc": metrics["val_acc_after_prune"], "test_acc": metrics["test_acc_after_prune"],
                        "density": metrics["density"], "seconds": metrics["seconds"]}
        else:
            c.epoch = metrics["epoch"]
            c.report = {k: metrics[k] for k in REPORTED if k in metrics}
        c.stage = stage
        now = time.monotonic()
        if metrics["stage_end"] or now - self.last_sync >= CHECKPOINT_EVERY_S:
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
        out = {k: _mean(c.report.get(k) for c in live) for k in REPORTED}
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


def _row(c: _Copy) -> dict:
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
        row.update(status="finished", mlflow_run_id=c.mlrun.run_id, val_acc=r["val_acc"], test_acc=r["test_acc"],
                   best_val_acc=r["best_val_acc"], density_achieved=r["density"], seconds=r["seconds"],
                   n_collapsed_layers=len(r["collapsed_layers"]))
    return row


def _final(copies: list[_Copy]) -> dict:
    rows = [_row(c) for c in copies]
    scored = [r for r in rows if r["status"] == "finished" or r.get("skipped") == "finished"]
    epochs = max(c.epochs for c in copies)
    return {"final": 1, "copies": len(rows), "stage": "final", "epoch": epochs, "epochs": epochs,
            "finished_copies": sum(r["status"] == "finished" for r in rows),
            "skipped_copies": sum(r["status"] == "skipped" for r in rows),
            "failed_copies": sum(r["status"] == "failed" for r in rows),
            "val_acc": _mean(r["val_acc"] for r in scored), "test_acc": _mean(r["test_acc"] for r in scored),
            "runs": json.dumps(rows)}


def train_pack(config: dict) -> None:
    specs, meta = config["trials"], config["meta"]
    tags = {**setup(meta), "pack_size": len(specs)}
    trial_id = tune.get_context().get_trial_id()
    copies = []
    for spec in specs:
        cfg = from_flat(spec["flat"])
        mlrun = relay.trial_run(meta["tracking_uri"], meta["experiment_id"], sweep=meta["sweep"], cell=spec["cell"],
                                flat=to_flat(cfg), run_key=run_key(cfg), trial_id=trial_id,
                                tags=tags, parent_run_id=meta.get("parent_run_id")).open()
        copies.append(_Copy(spec["cell"], cfg, mlrun))
    checkpoint = tune.get_checkpoint()
    for c in copies:
        if c.mlrun.skip:  # FINISHED already, or claimed by a live trial of another sweep on this store
            continue
        try:
            c.state = newest_state(checkpoint, c.mlrun.checkpoint_dir, (copy_file(c.key), CHECKPOINT_FILE), c.cfg)
        except CheckpointError as e:  # never a silent start from scratch: this copy fails, the rest train
            c.error = e
            c.mlrun.fail(e)
            continue
        if c.state is not None:
            c.pos, c.epoch = c.state["step_idx"], len(c.state["history"])
            c.mlrun.resumed(c.epoch)
            c.mlrun.restore(c.state["history"])  # its epochs that never reached the run (flushes are not writes)
            c.snap(c.state)  # kept in every checkpoint until this copy logs a newer one
            c.snapped = False
    train = [c for c in copies if not c.mlrun.skip and c.error is None]
    if train:
        _train(train, meta)
    tune.report(_final(copies))


def _train(train: list[_Copy], meta: dict) -> None:
    from sparse_core.runner import run_packed

    pack = _Pack(train, float(meta.get("report_every_s", 0.0)))
    try:
        with tempfile.TemporaryDirectory() as d:  # meta["export"]: each compact model as its run's artifact
            paths = [os.path.join(d, f"{i}.safetensors") if meta.get("export") else None for i in range(len(train))]
            states = [c.state for c in train]
            for c in train:
                c.state = None  # run_packed holds them now
            results = run_packed([c.cfg for c in train], [pack.log_for(c) for c in train], states, paths)
            del states
            for c, result, path in zip(train, results, paths):
                if isinstance(result, BaseException):  # this copy alone failed (e.g. diverged); the rest carry on
                    c.error = result
                    c.mlrun.fail(result)
                    continue
                if path:
                    c.mlrun.log_export(path)
                c.mlrun.finish(result)
                c.result = result
    except BaseException as e:
        for c in train:
            if c.result is None and c.error is None:
                c.error = e
                c.mlrun.fail(e)
        raise
